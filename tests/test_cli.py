"""The scripts as a user runs them: end to end, bad input, and the diffs between stages."""
import difflib
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STAGES, load_stage, stage_error

QUICK = ["--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2", "--max-new-tokens", "40"]


def run_script(name, *flags):
    return subprocess.run([sys.executable, f"{name}.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", STAGES)
def test_runs_end_to_end(name, tmp_path):
    result = run_script(name, *QUICK, "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    lines = re.findall(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})", result.stdout, re.M)
    assert [int(step) for step, _, _ in lines] == [0, 3, 6]
    assert "ms/step" in result.stdout and "left" in result.stdout
    sample = result.stdout.split("-" * 80 + "\n")[-1]
    assert len(sample) >= 40  # 40 new characters after the start token
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stage"] == name
    assert [h["step"] for h in metrics["history"]] == [0, 3, 6]
    assert f"{metrics['val_loss']:.4f}" == lines[-1][2]


BAD_FLAGS = [
    ["--batch-size", "0"],
    ["--block-size", "-3"],
    ["--max-iters", "ten"],
    ["--lr", "-1e-3"],
    ["--device", "tpu"],
    ["--no-such-flag"],
    ["--data", "/no/such/file.txt"],
]


def test_a_bad_flag_is_one_line_on_stderr_and_exit_status_2():
    result = run_script("02_single_head", "--batch-size", "0")
    assert result.returncode == 2 and "--batch-size: must be above 0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=" ".join)
def test_bad_input_exits_2_with_one_line(capsys, flags):
    stage_error(capsys, load_stage("02_single_head").main, *flags)


def test_heads_must_divide_the_width(capsys):
    assert "divisible" in stage_error(capsys, load_stage("04_block").main, "--n-embd", "30", "--n-head", "4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_missing_device_is_reported(capsys):
    assert "no CUDA GPU" in stage_error(capsys, load_stage("01_bigram").main, "--device", "cuda", *QUICK)


BUDGETS = {("01_bigram", "02_single_head"): 60, ("02_single_head", "03_multi_head"): 30,
           ("03_multi_head", "04_block"): 70}


@pytest.mark.parametrize("pair", BUDGETS, ids="->".join)
def test_consecutive_stages_differ_only_by_their_concept(pair):
    """Training, evaluation and sampling are the same code in every stage, line for line, and
    the whole diff stays within its budget."""
    before, after = [(ROOT / f"{name}.py").read_text() for name in pair]
    common = before[before.index("# -------------------------------------------------------------------------"
                                 "---- training"):before.index("def main(")]
    assert common in after
    changed = [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-"]
    assert len(changed) <= BUDGETS[pair]
