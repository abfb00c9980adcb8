"""python -m shared.prepare: a corpus of any size, tokenized once into a folder of token shards that
training reads a window at a time (--data FOLDER), so that its memory stays flat.

    python -m shared.prepare corpus/ --tokenizer gpt2 --out data/corpus --workers 2
    python 07_modern.py --data data/corpus --tokenizer gpt2

    python -m shared.prepare --dataset HuggingFaceFW/fineweb-edu --dataset-config sample-10BT \\
        --tokenizer gpt2 --out data/fineweb_edu --workers 8

The inputs are text files, folders (their .txt files, in sorted order) or glob patterns, each
file a document; or a Hugging Face dataset (a name on the hub, or a local folder of its files),
streamed through `datasets` (pip install datasets), each row's --text-field a document.
Documents are joined by the tokenizer's end-of-text token where it has one (GPT-2's
<|endoftext|>; the character tokenizer, whose vocabulary is the corpus's own characters, has
none, and needs files: its vocabulary is read from them first). A document longer than
--piece-chars is tokenized in pieces, cut only between the two newlines of a paragraph break,
where GPT-2's byte-pair encoding never joins a token across (a test checks it gives the whole
file's tokens). The stream of tokens is cut into shards of --shard-tokens tokens, uint16 where
the vocabulary fits and uint32 otherwise, each written atomically; meta.json says what the folder
holds: the tokenizer, each shard's tokens and SHA-256, and where validation begins, the last 10%
of the tokens as for a text file. Running the same command again goes on after the last shard
written: a Ctrl-C leaves only whole shards.
"""
import glob
import hashlib
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from shared import UserError, atomic_write
from shared.cli import Parser, check_out, checked, run
from shared.data import read_file
from shared.shards import PREPARED_META, shard_dtype
from shared.tokenizer import CharTokenizer, make_tokenizer, tokenizer_from_identity

# the share of the tokens at the end of the stream that validation takes, as for a text file
VAL_SHARE = 0.1


def input_files(inputs):
    """The files that the inputs name, in order: each file, each folder's .txt files (sorted) and
    each glob pattern's matches (sorted)."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(name, recursive=True) if Path(p).is_file())
        if not found:
            raise UserError(f"{name}: no such file, and no text file in it or matching it")
        files += found
    return files


def pieces(text, piece_chars):
    """text cut into pieces of about piece_chars characters, each cut between the two newlines
    of a paragraph break ("...word\\n" | "\\nWord..."), where no token spans the cut."""
    start = 0
    while len(text) - start > piece_chars:
        cut = start + piece_chars
        while cut < len(text) - 1 and not (text[cut - 1] == "\n" and text[cut] == "\n"
                                            and not text[cut - 2].isspace()
                                            and not text[cut + 1].isspace()):
            cut += 1
        if cut >= len(text) - 1:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def file_documents(files):
    for path in files:
        yield read_file(path, "")


def dataset_documents(name, config, split, field):
    """The texts of a Hugging Face dataset's split, streamed: nothing is downloaded whole."""
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset is read through Hugging Face datasets: "
                        "pip install datasets") from None
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
        for row in rows:
            if not isinstance(row.get(field), str):
                raise UserError(f"--dataset {name}: its rows have no text field {field!r} (they "
                                f"have {', '.join(row)}); name it with --text-field")
            yield row[field]
    except (OSError, ValueError, ConnectionError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--dataset {name}: cannot read it ({why})") from None


def units(documents, piece_chars, end_of_text):
    """What is tokenized, in order: (document index, piece of text, whether an end-of-text token
    comes before it), the token before each document but the first: documents joined by it."""
    for i, text in enumerate(documents):
        for j, piece in enumerate(pieces(text, piece_chars)):
            yield i, piece, end_of_text is not None and i > 0 and j == 0


def start_worker(identity):
    global worker_tokenizer, worker_dtype
    worker_tokenizer = tokenizer_from_identity(identity)
    worker_dtype = shard_dtype(worker_tokenizer.vocab_size)


def encode(unit):
    """A unit's tokens (its end-of-text token included), in the shards' type, and its
    document's index."""
    index, text, end_first = unit
    tokens = worker_tokenizer.encode(text)
    if end_first:
        tokens.insert(0, end_of_text_id(worker_tokenizer))
    return np.array(tokens, dtype=worker_dtype), index


def end_of_text_id(tokenizer):
    """The tokenizer's end-of-text token, or None where it has none (the character tokenizer)."""
    if hasattr(tokenizer, "encoding"):
        return tokenizer.encoding.eot_token
    return getattr(getattr(tokenizer, "tokenizer", None), "eos_token_id", None)


def make_tokenizer_for(files, name):
    """The tokenizer: named, or for char the characters of every file."""
    if name != "char":
        return make_tokenizer(name, "")
    chars = set()
    for path in files:
        chars |= set(read_file(path, ""))
    return CharTokenizer("".join(chars))


def write_shard(folder, number, tokens, dtype):
    """tokens as shard number, written atomically; its entry in meta.json."""
    name = f"shard_{number:06d}.bin"
    data = memoryview(np.ascontiguousarray(tokens, dtype=dtype)).cast("B")
    with atomic_write(Path(folder) / name) as f:
        f.write(data)
    return {"file": name, "tokens": len(tokens), "sha256": hashlib.sha256(data).hexdigest(),
            "largest": int(tokens.max()) if len(tokens) else -1}


def write_meta(folder, meta):
    with atomic_write(Path(folder) / PREPARED_META, "w") as f:
        json.dump(meta, f, indent=1)


def prepare(inputs, out, tokenizer_name="char", shard_tokens=100_000_000, workers=1,
            piece_chars=8_000_000, progress=True, dataset=None):
    """The corpus of inputs, or of dataset (load_dataset's name, config, split and the text
    field), as shards in the folder out (see the module's docstring); returns meta.json's
    content. A folder prepared with other settings is refused; one prepared part of the way with
    these is gone on with, from the unit of text its last shard ended in."""
    from tqdm import tqdm
    if dataset and tokenizer_name == "char":
        raise UserError("the character tokenizer's vocabulary is read from files first; with "
                        "--dataset, name a tokenizer such as --tokenizer gpt2")
    files = [] if dataset else input_files(inputs)
    source = {"dataset": dataset} if dataset else {"inputs": [str(p) for p in files]}
    settings = {**source, "tokenizer": tokenizer_name, "shard_tokens": shard_tokens,
                "piece_chars": piece_chars}
    out = Path(out)
    meta_path = out / PREPARED_META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta and meta["settings"] != settings:
        raise UserError(f"{out} holds a corpus prepared from other inputs or with other settings; "
                        "prepare this one into another folder")
    if meta and meta["done"]:
        print(f"{out} is prepared already: {meta['tokens']:,} tokens in {len(meta['shards'])} "
              "shard(s)")
        return meta
    tokenizer = make_tokenizer_for(files, tokenizer_name)
    # where the next shard begins: a unit of text, and how many of its tokens are in shards
    meta = meta or {"settings": settings, "tokenizer": tokenizer.identity(),
                    "vocab_size": tokenizer.vocab_size, "done": False, "shards": [],
                    "resume": {"unit": 0, "skip": 0}}
    out.mkdir(parents=True, exist_ok=True)
    dtype = shard_dtype(tokenizer.vocab_size)
    first = meta["resume"]["unit"]
    documents = dataset_documents(**dataset) if dataset else file_documents(files)
    todo = (unit for i, unit in enumerate(units(documents, piece_chars, end_of_text_id(tokenizer)))
            if i >= first)
    pool = None
    if workers > 1:
        pool = multiprocessing.Pool(workers, start_worker, (tokenizer.identity(),))
    else:
        start_worker(tokenizer.identity())
    bar = tqdm(total=len(files) or None, unit="doc", disable=not progress,
               desc=f"preparing {out}")
    start, made = time.time(), 0
    # documents begun so far
    begun = 0
    buffer, buffered = [], 0
    try:
        encoded = pool.imap(encode, todo) if pool else map(encode, todo)
        for number, (tokens, document) in enumerate(encoded, start=first):
            # of the unit a rerun starts in, the tokens in shards already
            skipped = meta["resume"]["skip"] if number == first else 0
            tokens = tokens[skipped:]
            buffer.append(tokens)
            buffered += len(tokens)
            made += len(tokens)
            begun = document + 1
            bar.update(begun - bar.n)
            bar.set_postfix_str(f"{made / max(time.time() - start, 1e-9):,.0f} tokens/s")
            while buffered >= shard_tokens:
                stream = np.concatenate(buffer)
                shard = write_shard(out, len(meta["shards"]), stream[:shard_tokens], dtype)
                meta["shards"].append(shard)
                buffer, buffered = [stream[shard_tokens:]], len(stream) - shard_tokens
                # the rest of the stream is the end of this unit's tokens
                meta["resume"] = {"unit": number, "skip": skipped + len(tokens) - buffered}
                write_meta(out, meta)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if buffered:
        meta["shards"].append(write_shard(out, len(meta["shards"]), np.concatenate(buffer), dtype))
    meta["tokens"] = sum(shard["tokens"] for shard in meta["shards"])
    if meta["tokens"] < 2:
        raise UserError(f"{dataset['name'] if dataset else ' '.join(inputs)} holds no text to "
                        "train on")
    meta["val_start"] = int((1 - VAL_SHARE) * meta["tokens"])
    meta["done"] = True
    write_meta(out, meta)
    print(f"{out}: {meta['tokens']:,} tokens of {begun:,} document(s) in "
          f"{len(meta['shards'])} shard(s) of {np.dtype(dtype).name}, "
          f"{made / max(time.time() - start, 1e-9):,.0f} tokens/s; validation from token "
          f"{meta['val_start']:,}")
    return meta


def main(argv=None):
    parser = Parser(prog="python -m shared.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", help="text files, folders or glob patterns")
    parser.add_argument("--dataset", metavar="NAME|DIR",
                        help="a Hugging Face dataset instead, streamed (needs datasets)")
    parser.add_argument("--dataset-config", help="the dataset's configuration, e.g. sample-10BT")
    parser.add_argument("--split", default="train",
                        help="the dataset's split (default: %(default)s)")
    parser.add_argument("--text-field", default="text",
                        help="the field of a row that is text (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the folder of shards, for --data")
    parser.add_argument("--tokenizer", default="char",
                        help="char, a tiktoken encoding such as gpt2, or a Hugging Face tokenizer "
                        "(default: %(default)s)")
    parser.add_argument("--shard-tokens", type=checked("shard_tokens", int), default=100_000_000,
                        help="tokens a shard (default: 100,000,000)")
    parser.add_argument("--workers", type=checked("workers", int), default=1,
                        help="processes that tokenize (default: 1)")
    args = parser.parse_args(argv)
    if bool(args.inputs) == bool(args.dataset):
        parser.error("give text files, folders or patterns, or --dataset, and not both")
    check_out(parser, args.out)
    dataset = None
    if args.dataset:
        dataset = {"name": args.dataset, "config": args.dataset_config, "split": args.split,
                   "field": args.text_field}
    prepare(args.inputs, args.out, args.tokenizer, args.shard_tokens, args.workers,
            progress=sys.stderr.isatty(), dataset=dataset)


if __name__ == "__main__":
    run(main, prog="python -m shared.prepare")
