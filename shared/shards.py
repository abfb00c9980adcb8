"""Token shards: a corpus that python -m shared.prepare tokenized once, read a window at a
time, so that a run's memory does not grow with the corpus."""
import json
import os
from pathlib import Path

import numpy as np
import torch

from shared import UserError, sha256
from shared.tokenizer import tokenizer_from_identity

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
