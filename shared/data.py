"""Tiny Shakespeare (or any UTF-8 text), downloaded and checked; its tokens split 90/10 into
train and val; random batches of them."""
import hashlib
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from shared import UserError, atomic_write, sha256
from shared.shards import TokenShards, load_prepared
from shared.tokenizer import make_tokenizer

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"


MIN_CHARS = 1000  # below this a 90/10 split leaves too little to validate on


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
