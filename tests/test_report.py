"""A run of every stage as its command line runs it, what it prints and leaves behind
(metrics.json, loss.png, attention.png), and the report made from runs."""
import contextlib
import io
import json
import math
import re
import struct
import subprocess
import sys

import matplotlib.image
import pytest
import torch

from conftest import (
    CHAIN,
    GPT_STAGES,
    POST_TRAINING,
    PREFERENCES,
    REWARDS,
    ROOT,
    TRAINING,
    build_model,
    load_stage,
    stage_error,
)
from shared import description, duration, report


@pytest.fixture(scope="module")
def runs(quick_runs):
    return quick_runs


def assert_image(path, min_side=300):
    """path is a PNG of sensible size with something drawn on it."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert min_side <= width <= 8000 and min_side <= height <= 8000, (width, height)
    assert matplotlib.image.imread(path).std() > 0.05  # not a blank canvas


def trained(printed, name):
    """What a run printed from its training on (post-training says first what it tunes on)."""
    return re.split("fine-tuning on conversations|DPO on preference pairs|GRPO on",
                    printed[name])[-1]


@pytest.mark.parametrize("name", TRAINING)
def test_runs_end_to_end(runs, name):
    root, printed = runs
    out = trained(printed, name)
    # DPO's line has its margin and accuracy where the others have bits per character, GRPO's
    # pass@1 and pass@8
    last = r"val (\d+\.\d{3}) bits/char"
    if name in PREFERENCES:
        last = r"val margin -?\d+\.\d{3}, accuracy \d\.\d\d"
    if name in REWARDS:
        last = r"val pass@1 \d\.\d{3}, pass@8 \d\.\d{3}"
    lines = re.findall(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4}), " + last,
                       out, re.M)
    assert [int(step) for step, *_ in lines] == [0, 3, 6]
    assert "ms/step" in out and "left" in out
    separator = r"^-{30} top-p 0\.9 -+\n" if name in GPT_STAGES else "^-{80}\n"
    if name in POST_TRAINING:
        separator = r"^-{30} the model's -+\n"
    sample = re.split(separator, out, flags=re.M)[-1]
    assert len(sample) >= 40  # 40 new characters after the start token
    metrics = json.loads((root / name / "metrics.json").read_text())
    assert metrics["stage"] == name
    assert [h["step"] for h in metrics["history"]] == [0, 3, 6]
    assert f"{metrics['val_loss']:.4f}" == lines[-1][2]


@pytest.mark.parametrize("name", TRAINING)
def test_metrics_follow_the_schema_and_the_printed_losses(runs, name):
    root, printed = runs
    metrics = json.loads((root / name / "metrics.json").read_text())
    assert set(metrics) == set(report.METRICS_FIELDS)
    assert report.read_runs([root / name]) == [{"run": name, **metrics}]
    assert metrics["stage"] == name and metrics["config"]["max_iters"] == 6
    # the chat stages' template adds 4 tokens
    markers = 4 if name in POST_TRAINING else 0
    assert (metrics["tokenizer"]["kind"] == "char"
            and metrics["vocab_size"] == len(metrics["tokenizer"]["chars"]) + markers)
    assert f"{metrics['parameters']:,} parameters" in trained(printed, name)
    lines = re.findall(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})",
                       trained(printed, name), re.M)
    assert ([(h["step"], f"{h['train']:.4f}", f"{h['val']:.4f}") for h in metrics["history"]]
            == [(int(step), train, val) for step, train, val in lines])
    assert [h["step"] for h in metrics["history"]] == [0, 3, 6]
    seconds = [h["seconds"] for h in metrics["history"]]
    assert seconds == sorted(seconds) and metrics["tokens_per_second"] > 0
    last = metrics["history"][-1]
    assert (metrics["train_loss"], metrics["val_loss"]) == (last["train"], last["val"])
    # one token is one character; in the chat stages' replies an end token has none; DPO's loss
    # is no loss of predicting text, and has no bits per character, but trl's statistics; GRPO's
    # loss is of the right answers, beside pass@1 and pass@8 of its own replies
    if name in PREFERENCES:
        assert metrics["val_bpc"] is None and 0 <= last["val_accuracy"] <= 1
        assert last["val_margin"] == pytest.approx(last["val_chosen"] - last["val_rejected"])
    elif name in REWARDS:
        assert metrics["val_bpc"] is None
        assert 0 <= last["val_pass@1"] <= last["val_pass@8"] <= 1 and last["val_length"] > 0
    elif name in POST_TRAINING:
        assert metrics["val_bpc"] > last["val"] / math.log(2)
    else:
        assert metrics["val_bpc"] == pytest.approx(last["val"] / math.log(2))
    assert metrics["machine"]


@pytest.mark.parametrize("name", TRAINING)
def test_each_run_draws_its_loss_curves_and_attention(runs, name):
    root, printed = runs
    assert_image(root / name / "loss.png")
    if name == "01_bigram":
        assert not (root / name / "attention.png").exists()  # a bigram table has no attention
    else:
        assert_image(root / name / "attention.png")
        assert f"attention maps written to {root / name / 'attention.png'}" in printed[name]


@pytest.mark.parametrize("name,layers,heads", [("02_single_head", 1, 1), ("03_multi_head", 1, 3),
                                               ("04_block", 2, 3),
                                               *[(name, 2, 3) for name in GPT_STAGES
                                                 if name in CHAIN]])
def test_attention_maps_come_per_layer_and_head_and_are_causal(name, layers, heads):
    stage = load_stage(name)
    if name in GPT_STAGES:
        model = stage.GPT(stage.GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=3,
                                          n_embd=24))
    else:
        model = build_model(stage, 65, n_embd=24, n_head=3, n_layer=2)
    maps = report.attention_maps(model.train(), torch.randint(65, (1, 12)))
    assert len(maps) == layers and all(m.shape == (heads, 12, 12) for m in maps)
    for weights in maps:
        assert torch.equal(weights.triu(1), torch.zeros_like(weights))  # nothing from the future
        torch.testing.assert_close(weights.sum(-1), torch.ones(heads, 12))
    assert model.training  # left as it was found


def test_the_plotted_weights_are_the_ones_the_fused_kernel_applies():
    gpt = load_stage("05_gpt")
    config = gpt.GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=4, n_embd=32)
    attention = gpt.CausalSelfAttention(config, layer=0).eval()
    x = torch.randn(2, 10, 32)
    v = attention.c_attn(x).split(32, dim=2)[2].view(2, 10, 4, 8).transpose(1, 2)
    y = (attention.attention_weights(x) @ v).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(attention.c_proj(y), attention(x))


def test_report_has_a_row_per_run_and_a_figure(runs, tmp_path):
    root, _ = runs
    with contextlib.redirect_stdout(io.StringIO()):
        report.main([str(root)])
    rows = (root / "report.md").read_text().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == TRAINING  # runs named by their folders
    assert [row.split("|")[2].strip() for row in rows] == TRAINING
    # what each stage adds, as its docstring's first line says
    assert [row.split("|")[3].strip() for row in rows] == [description(s) for s in TRAINING]
    assert all(len(row.split("|")) == 11 for row in rows)  # 9 columns
    # one run per stage: nothing to compare
    assert all(row.split("|")[4].strip() == "" for row in rows)
    assert_image(root / "report.png")

    with contextlib.redirect_stdout(io.StringIO()):
        report.main([str(root / "04_block"), str(root / "01_bigram"), "--out", str(tmp_path)])
    rows = (tmp_path / "report.md").read_text().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["01_bigram", "04_block"]


def test_runs_of_one_stage_are_told_apart_by_what_differs(runs, tmp_path):
    root, _ = runs
    metrics = json.loads((root / "05_gpt" / "metrics.json").read_text())
    # as in stage 06, whose --init-from is unset unless given
    config = {**metrics["config"], "init_from": None}
    variants = {"char": {"config": config},
                "bpe": {"config": config, "tokenizer": {"kind": "tiktoken", "name": "gpt2"}},
                "wide": {"config": {**config, "n_embd": 48}},
                "poems": {"config": {**config, "data": "/home/me/poems.txt"}},
                "gpt2": {"config": {**config, "init_from": "gpt2"}}}
    for name, changes in variants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({**metrics, **changes}))
    with contextlib.redirect_stdout(io.StringIO()):
        report.main([str(tmp_path)])
    rows = {row.split("|")[1].strip(): row.split("|")[4].strip()
            for row in (tmp_path / "report.md").read_text().splitlines()[2:]}
    plain = "n-embd 32, data Tiny Shakespeare"
    assert rows == {"bpe": f"{plain}, tokenizer gpt2, no init-from",
                    "char": f"{plain}, tokenizer char, no init-from",
                    "wide": "n-embd 48, data Tiny Shakespeare, tokenizer char, no init-from",
                    "poems": "n-embd 32, data poems.txt, tokenizer char, no init-from",
                    "gpt2": f"{plain}, tokenizer char, init-from gpt2"}


def test_report_of_a_folder_without_runs(capsys, tmp_path):
    assert "holds no metrics.json" in stage_error(capsys, report.main, str(tmp_path))
    assert "no such folder" in stage_error(capsys, report.main, str(tmp_path / "nosuch"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text('{"stage": "01_bigram"}')
    assert "lacks" in stage_error(capsys, report.main, str(tmp_path))


def test_the_report_command_signs_its_errors_as_it_is_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "shared.report", str(tmp_path / "nosuch")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("python -m shared.report: error: ")


def test_every_time_is_written_as_hours_minutes_and_seconds_rounded_before_it_is_split():
    assert [duration(s) for s in (0, 59.4, 59.6, 1739.97, 3599.6, 3725)] == [
        "0:00:00", "0:00:59", "0:01:00", "0:29:00", "1:00:00", "1:02:05"]
