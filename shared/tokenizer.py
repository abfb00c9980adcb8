"""Tokenizers: one token per character, a tiktoken byte-pair encoding such as GPT-2's, or a
pretrained model's own through Hugging Face; each rebuilt from the identity a checkpoint keeps."""
import difflib
from pathlib import Path

from shared import UserError
from shared.hub import from_hugging_face


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
