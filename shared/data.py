"""Tiny Shakespeare (or any UTF-8 text), a character tokenizer, a train/val split and batches."""
import difflib
import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from shared import UserError, atomic_write

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"
MIN_CHARS = 1000  # below this a 90/10 split leaves too little to validate on


def sha256(path):
    """The file's SHA-256, read a block at a time: a shard of any size takes no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**24):
            digest.update(block)
    return digest.hexdigest()


def download(path, url, checksum, what, otherwise):
    """Fetch what (a few words naming it) from url into path. The file is written (atomically)
    only once its SHA-256 is checksum, so an interrupted download never leaves a file that looks
    complete. otherwise: what else the user can do, for the sentence that says it failed."""
    path = Path(path)
    print(f"downloading {what} to {path}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            content = response.read()
        if hashlib.sha256(content).hexdigest() != checksum:
            raise UserError(f"the file downloaded from {url} has the wrong checksum; "
                            f"try again later, or save it yourself as {path}")
        with atomic_write(path) as f:
            f.write(content)
    except (urllib.error.URLError, OSError) as err:
        raise UserError(f"could not download {what} ({err}); save {url} as {path} "
                        f"by hand, or {otherwise}") from None


def read_text(path=None):
    """Tiny Shakespeare, downloaded on first use and checked on every load; or the user's own
    file."""
    if path is None:
        if not DEFAULT_PATH.exists():
            download(DEFAULT_PATH, URL, SHA256, "Tiny Shakespeare",
                     "train on your own text with --data FILE")
        if sha256(DEFAULT_PATH) != SHA256:
            raise UserError(f"{DEFAULT_PATH} is not the Tiny Shakespeare file this project expects "
                            "(wrong SHA-256); delete it to download it again")
        return DEFAULT_PATH.read_text(encoding="utf-8")
    text = read_file(path)
    if len(text) < MIN_CHARS:
        raise UserError(f"--data {path} has {len(text)} characters; give it at least {MIN_CHARS}")
    return text


def read_file(path, prefix="--data "):
    """The text of a file the user gave, or one sentence saying why it can't be read, prefix (the
    flag that gave it) before its name."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{prefix}{path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"{prefix}{path} is not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"{prefix}{path} cannot be read ({err.strerror})") from None
    if "\x00" in text:
        raise UserError(f"{prefix}{path} looks like a binary file, not text")
    return text


ROLES = ("system", "user", "assistant")


def read_conversations(path):
    """Conversations from a JSONL file, one a line as {"messages": [{"role": ..., "content": ...},
    ...]}: the format of Hugging Face chat datasets and of OpenAI's fine-tuning files. Returns the
    conversations that have an assistant turn to learn from, and how many had none (skipped)."""
    conversations, skipped = [], 0
    for number, line in enumerate(read_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = parse_conversation(line)
        except ValueError as problem:
            raise UserError(f"--data {path}, line {number}: {problem}") from None
        if any(m["role"] == "assistant" for m in messages):
            conversations.append(messages)
        else:
            skipped += 1
    if not conversations:
        raise UserError(f"--data {path} has no conversation with an assistant turn to learn from")
    return conversations, skipped


def parse_conversation(line):
    """One JSONL line's messages, each its role and content only; a ValueError saying in a few
    words what keeps the line from being a conversation."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError('not an object with a "messages" list')
    if not record["messages"]:
        raise ValueError("no messages")
    for i, message in enumerate(record["messages"], start=1):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object with a role and a content")
        if message.get("role") not in ROLES:
            raise ValueError(f"message {i} has the role {message.get('role')!r}, "
                             f"not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} has no text as its content")
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]


def load_conversations(path=None):
    """The train and val conversations: a JSONL file's (read_conversations), split 90/10 in the
    file's order, or with no path Tiny Shakespeare's dialogue (shakespeare_conversations)."""
    if path is None:
        return shakespeare_conversations(read_text())
    found, skipped = read_conversations(path)
    if skipped:
        print(f"{skipped} conversation(s) of {path} have no assistant turn: skipped")
    if len(found) < 2:
        raise UserError(f"--data {path} has one conversation to learn from; give it at least "
                        "two, for training and validation")
    n = min(int(0.9 * len(found)), len(found) - 1)
    return found[:n], found[n:]


def shakespeare_conversations(text):
    """Tiny Shakespeare's dialogue as conversations, split 90/10 as the text is, with the speech
    across the 90% mark left out, so that no val reply was in the train text. The play is a
    sequence of speeches, each a speaker's name and a colon on a line of its own, then the lines
    spoken, then a blank line. A conversation is a run of speeches that goes back and forth
    between the same two speakers: the first speaker is the user, the one who answers is the
    assistant; the run ends where a third speaker comes in, and a user's speech left without an
    answer at its end is dropped. Returns the train and val conversations."""
    n = int(0.9 * len(text))
    return dialogue(text[:text.rfind("\n\n", 0, n)]), dialogue(text[text.find("\n\n", n):])


def dialogue(text):
    """The conversations of shakespeare_conversations in one part of the text."""
    speeches = []
    for block in text.split("\n\n"):
        name, _, lines = block.strip().partition(":\n")
        if lines.strip():
            speeches.append((name, lines.strip()))
    runs, run = [], []
    for speaker, lines in speeches:
        # a third speaker, or the same one twice, starts a new run
        if (len(run) >= 2 and speaker != run[-2][0]) or (run and speaker == run[-1][0]):
            runs.append(run)
            run = []
        run.append((speaker, lines))
    runs.append(run)
    return [[{"role": ("user", "assistant")[i % 2], "content": lines}
             for i, (_, lines) in enumerate(run[:len(run) // 2 * 2])]
            for run in runs if len(run) >= 2]


class CharTokenizer:
    """One token per distinct character of the training text, numbered in sorted order."""

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    def encode(self, text):
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as err:
            raise UserError(f"the character {err.args[0]!r} never occurs in the training text, "
                            "so the model has no token for it") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def identity(self):
        return {"kind": "char", "chars": "".join(self.chars)}


class TiktokenTokenizer:
    """A byte-pair encoding from tiktoken, such as GPT-2's 50,257 tokens."""

    def __init__(self, name):
        import tiktoken  # only the BPE stages need it
        try:
            self.encoding = tiktoken.get_encoding(name)
        except ValueError:
            raise UserError(f"--tokenizer {name}: tiktoken has no such encoding "
                            f"(it has {', '.join(tiktoken.list_encoding_names())})") from None
        except OSError as err:
            raise UserError(f"could not fetch tiktoken's files for {name!r} "
                            f"({type(err).__name__}); connect once so tiktoken can cache them, "
                            "or use --tokenizer char, which works offline") from None
        self.name = name
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text):
        return self.encoding.encode_ordinary(text)  # "<|endoftext|>" in the text is just text

    def decode(self, ids):
        return self.encoding.decode(ids)

    def identity(self):
        return {"kind": "tiktoken", "name": self.name}


class HuggingFaceTokenizer:
    """A pretrained model's own tokenizer, through Hugging Face transformers (AutoTokenizer)."""

    def __init__(self, name_or_path):
        self.tokenizer = from_hugging_face("AutoTokenizer", name_or_path)
        self.name = name_or_path
        self.vocab_size = len(self.tokenizer)  # with the special tokens added to its vocabulary

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False)  # the text alone, no BOS token

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def identity(self):
        return {"kind": "huggingface", "name": self.name}


class HuggingFaceChat:
    """A Hugging Face model's own chat template (its tokenizer's apply_chat_template) and its
    end-of-turn token: the special token its template puts right after a reply. Few templates mark
    the replies ({% generation %}), so they are found in the rendered text: each message's content
    followed by the end token, searched for in order; the tokens over a reply are learned."""

    def __init__(self, tokenizer):
        self.base = tokenizer
        self.tokenizer = tokenizer.tokenizer
        self.name = tokenizer.name
        self.vocab_size = tokenizer.vocab_size
        if not self.tokenizer.chat_template:
            raise UserError(f"{self.name!r} has no chat template: fine-tune a model that has one "
                            "(an instruct model), or one of this project's")
        probe = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi!"}]
        text = self.tokenizer.apply_chat_template(probe, tokenize=False)
        if "Hi!" not in text:
            raise UserError(f"{self.name!r}'s chat template changes the text of a message, "
                            "so its replies cannot be found to learn them")
        after = text[text.rindex("Hi!") + len("Hi!"):]
        ends = [token.content for token in self.tokenizer.added_tokens_decoder.values()
                if after.startswith(token.content)]
        if not ends:
            raise UserError(f"{self.name!r}'s chat template follows a reply with {after[:20]!r}, "
                            "not a special token that could end its turn")
        self.end_text = max(ends, key=len)
        self.end = self.tokenizer.convert_tokens_to_ids(self.end_text)

    def render(self, messages, reply_next=False):
        """The conversation's token ids and, for each, whether it is learned: a reply's text and
        the end token after it. reply_next adds the template's prompt for a reply."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=reply_next)
        replies, cursor = [], 0
        for message in messages:
            content = message["content"]
            if text.find(content + self.end_text, cursor) < 0:
                # Llama 3's template trims a message's text
                content = content.strip()
            start = text.find(content + self.end_text, cursor)
            if start < 0:
                raise UserError(f"{self.name!r}'s chat template changes the text of a message, "
                                "so its replies cannot be found to learn them")
            cursor = start + len(content) + len(self.end_text)
            if message["role"] == "assistant":
                replies.append((start, cursor))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        learned = [any(a < end and b > start for start, end in replies)
                   for a, b in encoded["offset_mapping"]]
        return encoded["input_ids"], learned

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def identity(self):
        return self.base.identity()


def from_hugging_face(class_name, name_or_path, **options):
    """transformers' class_name (AutoConfig, AutoTokenizer, a model class) from the Hugging Face
    hub by name, or from a folder written by save_pretrained; what goes wrong, in one sentence.
    transformers is an optional extra, imported only here."""
    try:
        import transformers
        from transformers.utils import logging
    except ImportError:
        raise UserError(f"{name_or_path!r} comes from Hugging Face: "
                        "pip install transformers") from None
    logging.disable_progress_bar()
    # its warnings (a weight it could not load, say) become our own errors, one sentence each
    logging.set_verbosity_error()
    load = getattr(transformers, class_name).from_pretrained
    if not Path(name_or_path).is_dir():
        try:
            # downloaded before: no network needed
            return load(name_or_path, local_files_only=True, **options)
        except (OSError, ValueError):
            pass
        endpoint = hub_endpoint_unreachable()
        if endpoint:
            raise UserError(f"could not load {name_or_path!r}: it is not a folder, not in the "
                            f"Hugging Face cache, and {endpoint} cannot be reached; download it "
                            "once on a network (it is then cached), or give a folder written by "
                            "save_pretrained") from None
    try:
        return load(name_or_path, **options)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load {name_or_path!r}: it is not a folder written by "
                        "save_pretrained, and the Hugging Face hub did not provide it "
                        f"({reason})") from None


def hub_endpoint_unreachable():
    """The Hugging Face hub's address if it cannot be reached from here, asked once with a short
    timeout: offline, transformers would retry each file for half a minute before it gave up."""
    from huggingface_hub import constants, get_session
    try:
        get_session().head(constants.ENDPOINT, timeout=3)
    except Exception:
        return constants.ENDPOINT
    return None


def pretrained_context(name_or_path):
    """The longest context, in tokens, that a pretrained model was trained for."""
    return from_hugging_face("AutoConfig", name_or_path).max_position_embeddings


def pretrained_model(name_or_path, model_types):
    """A causal language model from Hugging Face, refused in one sentence unless its config is of
    one of model_types and every one of its weights loaded. transformers builds any model from
    any config, fills each weight it does not find with random numbers, and only warns."""
    config = from_hugging_face("AutoConfig", name_or_path)
    if config.model_type not in model_types:
        raise UserError(f"{name_or_path!r} is a {config.model_type} model; this stage loads "
                        f"{' and '.join(model_types)} models")
    model, loading = from_hugging_face("AutoModelForCausalLM", name_or_path, config=config,
                                       output_loading_info=True, ignore_mismatched_sizes=True)
    problems = {"missing": loading["missing_keys"],
                "of no use": loading["unexpected_keys"],
                "of another shape": [name for name, *_ in loading["mismatched_keys"]]}
    found = [f"{len(names)} {what} (such as {sorted(names)[0]})"
             for what, names in problems.items() if names]
    if found:
        raise UserError(f"{name_or_path!r} does not hold the weights its config describes: "
                        f"{', '.join(found)}; it was altered, or saved from another model")
    return model.eval()


def export_pretrained(base, weights, tokenizer, folder):
    """A save_pretrained folder of the same kind as base's Llama or Qwen3 model (its config), with
    weights (by their Hugging Face names) in place of base's, and tokenizer (a Hugging Face one):
    a folder that transformers, and the tools that read its models, load."""
    model = pretrained_model(base, ["llama", "qwen3"])
    theirs = model.state_dict()
    with torch.no_grad():
        for name, tensor in weights.items():
            theirs[name].copy_(tensor)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def weights_digest(model):
    """The SHA-256 of a model's weights, names and bytes: any change to a weight changes it."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def make_tokenizer(name, text):
    """char: one token per character of text; a tiktoken encoding such as gpt2; any other name,
    a Hugging Face tokenizer, from the hub or a save_pretrained folder."""
    import tiktoken
    if name == "char":
        return CharTokenizer(text)
    if name in tiktoken.list_encoding_names():
        return TiktokenTokenizer(name)
    # a typo of a name above would otherwise be looked for on the hub
    close = difflib.get_close_matches(name.lower(), ["char", *tiktoken.list_encoding_names()],
                                      n=1, cutoff=0.75)
    if close and "/" not in name and not Path(name).exists():
        raise UserError(f"--tokenizer {name}: not char, a tiktoken encoding or a folder; "
                        f"did you mean {close[0]}?")
    return HuggingFaceTokenizer(name)


def tokenizer_from_identity(identity):
    """Rebuild the tokenizer a checkpoint was trained with."""
    if identity["kind"] == "char":
        return CharTokenizer(identity["chars"])
    if identity["kind"] == "huggingface":
        return HuggingFaceTokenizer(identity["name"])
    return TiktokenTokenizer(identity["name"])


def load_dataset(path=None, block_size=8, tokenizer="char"):
    """The text as token ids, split 90/10 into train and val, with its tokenizer (named as
    make_tokenizer takes it). A folder that python -m shared.prepare wrote is read a window at a
    time instead (load_prepared)."""
    if path is not None and Path(path).is_dir():
        return load_prepared(path, block_size, tokenizer)
    text = read_text(path)
    tokenizer = make_tokenizer(tokenizer, text)
    # through numpy, which makes a tensor of a list of a million ints 4 times faster than torch
    data = torch.from_numpy(np.array(tokenizer.encode(text), dtype=np.int64))
    n = int(0.9 * len(data))
    train_data, val_data = data[:n], data[n:]
    if len(val_data) <= block_size:
        raise UserError(f"the validation split has {len(val_data)} tokens, too few for "
                        f"--block-size {block_size}; use a longer text or a smaller block size")
    return tokenizer, train_data, val_data


def check_token_ids(token_lists, vocab_size, model):
    """Refuse token ids the model has no embedding for, which a tokenizer other than the model's
    own can make: one sentence instead of an IndexError from deep inside the embedding."""
    largest = max((int(ids.max() if isinstance(ids, TokenShards) else torch.as_tensor(ids).max())
                   for ids in token_lists if len(ids)), default=-1)
    if largest >= vocab_size:
        raise UserError(f"the tokenizer makes token id {largest}, but {model} has a vocabulary "
                        f"of {vocab_size} tokens: use the tokenizer it was trained with")


# what python -m shared.prepare writes beside the shards
PREPARED_META = "meta.json"


def shard_dtype(vocab_size):
    """The type of a prepared corpus's tokens: 2 bytes where the vocabulary fits, else 4."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class TokenShards:
    """The tokens from start to stop of a prepared corpus's stream, across its shard files
    (tokens of dtype, one after another). A slice reads its own tokens and nothing else, with one
    positional read a shard it spans, so the memory a run takes does not grow with the corpus.
    (A memory map would serve the same bytes, but every page it touches, and those the kernel maps
    around it, counts as the process's memory: 520 MB more after 200 batches, measured.)"""

    def __init__(self, paths, sizes, start, stop, largest, dtype):
        self.paths, self.dtype = paths, np.dtype(dtype)
        self.offsets = np.cumsum([0, *sizes])
        self.start, self.stop = start, stop
        self.largest = largest
        self.files = {}

    def __len__(self):
        return self.stop - self.start

    def read(self, shard, begin, end):
        """Tokens begin to end of a shard, read from its file (opened once)."""
        if shard not in self.files:
            self.files[shard] = os.open(self.paths[shard], os.O_RDONLY)
        size = self.dtype.itemsize
        data = os.pread(self.files[shard], (end - begin) * size, begin * size)
        return np.frombuffer(data, dtype=self.dtype)

    def __getitem__(self, index):
        begin, end, _ = index.indices(len(self))
        begin, end = self.start + begin, self.start + max(begin, end)
        parts = [np.zeros(0, dtype=self.dtype)]
        shard = int(np.searchsorted(self.offsets, begin, side="right")) - 1
        while begin < end:
            offset = self.offsets[shard]
            take = min(end, self.offsets[shard + 1])
            parts.append(self.read(shard, begin - offset, take - offset))
            begin, shard = take, shard + 1
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    def max(self):
        return torch.tensor(self.largest)

    def tolist(self):
        return self[:].tolist()


def load_prepared(folder, block_size, tokenizer_name):
    """The tokenizer and the train and val tokens of a folder that python -m shared.prepare
    wrote, each shard checked against its size and SHA-256 first."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / PREPARED_META).read_text())
    except FileNotFoundError:
        raise UserError(f"--data {folder} is a folder without meta.json: prepare a corpus into "
                        f"it with python -m shared.prepare FILES --out {folder}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"--data {folder}/meta.json cannot be read ({err})") from None
    if not meta.get("done"):
        raise UserError(f"--data {folder} was prepared only part of the way; run the same "
                        "python -m shared.prepare command again to finish it")
    tokenizer = tokenizer_from_identity(meta["tokenizer"])
    prepared_with = meta["settings"]["tokenizer"]
    if tokenizer_name != prepared_with:
        raise UserError(f"--data {folder} was prepared with the {prepared_with} tokenizer, not "
                        f"{tokenizer_name}: give --tokenizer {prepared_with}")
    dtype = shard_dtype(meta["vocab_size"])
    paths = [folder / shard["file"] for shard in meta["shards"]]
    for shard, path in zip(meta["shards"], paths, strict=True):
        size = shard["tokens"] * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size != size or sha256(path) != shard["sha256"]:
            raise UserError(f"--data {folder}: {shard['file']} is missing or not the shard that "
                            "was written (its size or SHA-256 differs); prepare the corpus again")
    sizes = [shard["tokens"] for shard in meta["shards"]]
    largest = max(shard["largest"] for shard in meta["shards"])
    train = TokenShards(paths, sizes, 0, meta["val_start"], largest, dtype)
    val = TokenShards(paths, sizes, meta["val_start"], meta["tokens"], largest, dtype)
    if len(val) <= block_size:
        raise UserError(f"the validation split has {len(val)} tokens, too few for "
                        f"--block-size {block_size}; prepare a longer text or use a smaller one")
    return tokenizer, train, val


def characters_per_token(tokenizer, tokens, most=1_000_000):
    """The characters a token of tokens, over its first `most` tokens: a sample that keeps a
    corpus of any size from being decoded whole."""
    sample = tokens[:most]
    return len(tokenizer.decode(sample.tolist())) / len(sample)


def get_batch(data, batch_size, block_size, device, generator=None):
    """batch_size random windows of block_size tokens; the targets are the same windows shifted
    one token to the left, so position t is trained to predict token t + 1."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + block_size + 1] for i in ix])
    return x.to(device), y.to(device)
