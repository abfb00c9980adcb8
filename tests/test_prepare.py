"""python -m shared.prepare: token shards, read back a window at a time as --data FOLDER."""
import contextlib
import io
import json
import os
import sys

import pytest
import torch

from conftest import ROOT, load_stage, quick_flags, stage_error
from shared import UserError, prepare
from shared.cli import run
from shared.data import get_batch, load_dataset
from shared.tokenizer import TiktokenTokenizer

SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"
modern = load_stage("07_modern")


def history(out):
    return [(h["step"], h["train"], h["val"], h["val_bpc"])
            for h in json.loads((out / "metrics.json").read_text())["history"]]


def test_tiny_shakespeare_from_one_shard_trains_to_the_losses_of_the_text(tmp_path):
    meta = prepare.prepare([str(SHAKESPEARE)], tmp_path / "shards", progress=False)
    assert len(meta["shards"]) == 1 and meta["tokens"] == len(SHAKESPEARE.read_text())
    for name, data in (("text", SHAKESPEARE), ("shards", tmp_path / "shards")):
        with contextlib.redirect_stdout(io.StringIO()):
            modern.main([*quick_flags("07_modern", tmp_path / name), "--data", str(data)])
    assert history(tmp_path / "text") == history(tmp_path / "shards")


def test_shards_pieces_and_workers_give_the_tokens_of_the_whole_text(tmp_path, shakespeare):
    gpt2 = TiktokenTokenizer("gpt2")
    whole = gpt2.encode(shakespeare)
    # pieces of 50,000 characters, shards of 100,000 tokens, two processes
    prepare.prepare([str(SHAKESPEARE)], tmp_path, "gpt2", shard_tokens=100_000, workers=2,
                    piece_chars=50_000, progress=False)
    assert len(list(prepare.pieces(shakespeare, 50_000))) == 23
    _, train, val = load_dataset(str(tmp_path), 64, "gpt2")
    assert len(json.loads((tmp_path / "meta.json").read_text())["shards"]) == 4
    assert torch.equal(torch.cat((train[:], val[:])), torch.tensor(whole))
    assert train[99_990:100_010].tolist() == whole[99_990:100_010]  # across two shards


def test_a_batch_reads_its_windows_and_nothing_else(tmp_path, monkeypatch):
    prepare.prepare([str(SHAKESPEARE)], tmp_path, "gpt2", shard_tokens=100_000, progress=False)
    _, train, _ = load_dataset(str(tmp_path), 64, "gpt2")
    read = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: read.append(n) or pread(fd, n, offset))
    x, y = get_batch(train, 8, 64, "cpu")
    # the inputs' windows and the targets', 2 bytes a token (one more read for a window across
    # two shards)
    assert sum(read) == 2 * 8 * 64 * 2 and len(read) <= 2 * 8 + 2
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_documents_are_joined_by_the_end_of_text_token(tmp_path):
    (tmp_path / "docs").mkdir()
    for name, text in (("a.txt", "First document."), ("b.txt", "Second one.")):
        (tmp_path / "docs" / name).write_text(text * 400)
    prepare.prepare([str(tmp_path / "docs")], tmp_path / "out", "gpt2", progress=False)
    _, train, val = load_dataset(str(tmp_path / "out"), 8, "gpt2")
    tokens = torch.cat((train[:], val[:])).tolist()
    gpt2 = TiktokenTokenizer("gpt2")
    assert tokens == [*gpt2.encode("First document." * 400), 50256,
                      *gpt2.encode("Second one." * 400)]
    # a glob names the same files
    glob_meta = prepare.prepare([str(tmp_path / "docs" / "*.txt")], tmp_path / "glob", "gpt2",
                                progress=False)
    assert glob_meta["shards"] == json.loads((tmp_path / "out" / "meta.json").read_text())["shards"]


def test_a_ctrl_c_leaves_whole_shards_and_a_rerun_goes_on_after_them(tmp_path, monkeypatch):
    write_shard = prepare.write_shard
    written = []

    def interrupted(folder, number, tokens, dtype):
        if number == 2 and "rerun" not in written:
            raise KeyboardInterrupt
        written.append(number)
        return write_shard(folder, number, tokens, dtype)

    monkeypatch.setattr(prepare, "write_shard", interrupted)
    flags = dict(tokenizer_name="gpt2", shard_tokens=30_000, piece_chars=50_000, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare([str(SHAKESPEARE)], tmp_path / "parts", **flags)
    assert written == [0, 1] and sorted(p.name for p in (tmp_path / "parts").iterdir()) == [
        "meta.json", "shard_000000.bin", "shard_000001.bin"]
    written.append("rerun")
    prepare.prepare([str(SHAKESPEARE)], tmp_path / "parts", **flags)
    assert written[:4] == [0, 1, "rerun", 2]  # shards 0 and 1 were not made again
    monkeypatch.undo()
    prepare.prepare([str(SHAKESPEARE)], tmp_path / "whole", **flags)
    parts, whole = (json.loads((tmp_path / name / "meta.json").read_text())
                    for name in ("parts", "whole"))
    assert parts["shards"] == whole["shards"] and len(whole["shards"]) == 12


def test_bad_folders_get_one_sentence(tmp_path, capsys):
    prepare.prepare([str(SHAKESPEARE)], tmp_path / "good", progress=False)
    flags = [*quick_flags("07_modern", tmp_path / "run")]
    assert "was prepared with the char tokenizer, not gpt2: give --tokenizer char" in stage_error(
        capsys, modern.main, *flags, "--data", str(tmp_path / "good"), "--tokenizer", "gpt2")
    (tmp_path / "empty").mkdir()
    assert "is a folder without meta.json" in stage_error(
        capsys, modern.main, *flags, "--data", str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text((tmp_path / "good" / "meta.json").read_text())
    assert "shard_000000.bin is missing or not the shard that was written" in stage_error(
        capsys, modern.main, *flags, "--data", str(bad))
    shard = (tmp_path / "good" / "shard_000000.bin").read_bytes()
    (bad / "shard_000000.bin").write_bytes(shard[:100] + bytes([shard[100] ^ 1]) + shard[101:])
    assert "SHA-256" in stage_error(capsys, modern.main, *flags, "--data", str(bad))
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({**meta, "done": False}))
    assert "prepared only part of the way" in stage_error(capsys, modern.main, *flags, "--data",
                                                          str(bad))
    with pytest.raises(UserError, match="prepared from other inputs or with other settings"):
        prepare.prepare([str(SHAKESPEARE)], tmp_path / "good", "gpt2", progress=False)


def test_the_command_says_what_it_wrote_and_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["python -m shared.prepare"])
    run(lambda: prepare.main([str(SHAKESPEARE), "--out", str(tmp_path)]),
        prog="python -m shared.prepare")
    assert "1,115,394 tokens of 1 document(s) in 1 shard(s) of uint16" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        run(lambda: prepare.main([str(tmp_path / "nothing*.txt"), "--out", str(tmp_path / "x")]),
            prog="python -m shared.prepare")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no such file, and no text file in it" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe not text")
    with pytest.raises(SystemExit):
        run(lambda: prepare.main([str(tmp_path / "binary.txt"), "--out", str(tmp_path / "y")]),
            prog="python -m shared.prepare")
    err = capsys.readouterr().err.strip()
    assert err == f"python -m shared.prepare: error: {tmp_path / 'binary.txt'} is not UTF-8 text"
    # usage errors, one line each, before any work
    for argv, says in ((["--out", str(tmp_path / "binary.txt"), str(SHAKESPEARE)],
                        "is a file, not a folder"),
                       ([str(SHAKESPEARE)], "the following arguments are required: --out"),
                       ([str(SHAKESPEARE), "--out", str(tmp_path / "z"), "--workers", "0"],
                        "argument --workers: must be above 0, got 0")):
        with pytest.raises(SystemExit) as exit_:
            run(lambda argv=argv: prepare.main(argv), prog="python -m shared.prepare")
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_a_hugging_face_dataset_is_streamed_into_the_shards_its_texts_as_files_give(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = ["First document.\n\nIts second paragraph." * 50, "Second one." * 300, "Third."]
    (tmp_path / "dataset").mkdir()
    (tmp_path / "files").mkdir()
    with open(tmp_path / "dataset" / "part-0.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            (tmp_path / "files" / f"{i}.txt").write_text(text)
    # a local folder of the dataset's files: load_dataset reads it as it reads one on the hub
    assert [row["id"] for row in datasets.load_dataset(str(tmp_path / "dataset"), split="train",
                                                       streaming=True)] == [0, 1, 2]
    dataset = {"name": str(tmp_path / "dataset"), "config": None, "split": "train",
               "field": "text"}
    streamed = prepare.prepare([], tmp_path / "streamed", "gpt2", shard_tokens=500,
                               piece_chars=1000, progress=False, dataset=dataset)
    from_files = prepare.prepare([str(tmp_path / "files")], tmp_path / "from_files", "gpt2",
                                 shard_tokens=500, piece_chars=1000, progress=False)
    assert streamed["settings"]["dataset"] == dataset
    assert streamed["shards"] == from_files["shards"] and len(streamed["shards"]) > 2
    with pytest.raises(UserError, match="no text field 'content' .*have id, text.*--text-field"):
        prepare.prepare([], tmp_path / "other", "gpt2", progress=False,
                        dataset={**dataset, "field": "content"})
    with pytest.raises(UserError, match="name a tokenizer such as --tokenizer gpt2"):
        prepare.prepare([], tmp_path / "char", "char", progress=False, dataset=dataset)


def test_a_dataset_that_cannot_be_read_gets_one_sentence(tmp_path, capsys, monkeypatch):
    pytest.importorskip("datasets")
    # offline at once, as this machine is: the hub is not asked (which retries for half a minute)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        run(lambda: prepare.main(["--dataset", "someone/no-such-dataset", "--tokenizer", "gpt2",
                                  "--out", str(tmp_path / "out")]), prog="python -m shared.prepare")
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m shared.prepare: error: --dataset someone/no-such-dataset: "
                          "cannot read it (") and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        run(lambda: prepare.main([str(SHAKESPEARE), "--dataset", "x", "--out", str(tmp_path)]),
            prog="python -m shared.prepare")
    assert "and not both" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(UserError, match="pip install datasets"):
        prepare.prepare([], tmp_path / "out", "gpt2", progress=False,
                        dataset={"name": "x", "config": None, "split": "train", "field": "text"})
