"""The scripts as a user runs them: end to end, bad input, and the diffs between stages."""
import subprocess
import sys

import pytest
import torch

from conftest import ALL_STAGES, ROOT, STAGES, load_stage, quick_flags, stage_error


def run_script(name, *flags):
    return subprocess.run([sys.executable, f"{name}.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_output_into_a_pipe_whose_reader_left_ends_quietly():
    """python 01_bigram.py | head: once head has its lines, the run stops, with no traceback."""
    process = subprocess.Popen([sys.executable, "01_bigram.py", *quick_flags("01_bigram"),
                                "--max-new-tokens", "100000"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline()  # the parameter line
    process.stdout.close()  # as head does once it has its lines
    err = process.stderr.read()
    assert process.wait(timeout=60) == 141 and err == "", err


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
    assert "divisible" in stage_error(capsys, load_stage("04_block").main,
                                      "--n-embd", "30", "--n-head", "4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_missing_device_is_reported(capsys):
    assert "no CUDA GPU" in stage_error(capsys, load_stage("01_bigram").main, "--device", "cuda",
                                        *quick_flags("01_bigram"))


def test_the_numbered_scripts_are_all_stages():
    assert [p.stem for p in sorted(ROOT.glob("[0-9][0-9]_*.py"))] == ALL_STAGES
    assert STAGES == ALL_STAGES[:4]


@pytest.mark.parametrize("name", ["06_train_for_real", "07_modern"])
def test_the_gpt2_10b_preset_is_build_nanogpts_recipe(name):
    """GPT-2 124M's shape; 524,288 tokens a step on 8 processes; 19,073 steps, 10B tokens; a peak
    learning rate of 6e-4 after 715 steps of warm-up."""
    stage = load_stage(name)
    recipe = stage.RECIPES["gpt2-10b"]
    config = stage.PRESETS["gpt2-10b"]
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (12, 12, 768, 1024)
    assert recipe["batch_size"] * config.block_size * recipe["grad_accum_steps"] * 8 == 524_288
    assert abs(recipe["max_iters"] * 524_288 - 10e9) < 0.001 * 10e9
    assert (recipe["lr"], recipe["warmup_iters"], recipe["eval_interval"]) == (6e-4, 715, 250)
    args, preset = stage.parse_flags(["--preset", "gpt2-10b"])
    assert preset == "gpt2-10b" and args.block_size == 1024 and args.max_iters == 19073
    assert args.lr == 6e-4 and args.n_embd == 768
