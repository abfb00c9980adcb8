"""The scripts as a user runs them: end to end, bad input, and the diffs between stages."""
import ast
import itertools
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import ALL_STAGES, GPT_STAGES, ROOT, STAGES, load_stage, quick_flags, stage_error


def run_script(name, *flags):
    return subprocess.run([sys.executable, f"{name}.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", ALL_STAGES)
def test_runs_end_to_end(name, tmp_path):
    result = run_script(name, *quick_flags(name, tmp_path / "run"), "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr
    lines = re.findall(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4}), val (\d+\.\d{3}) bits/char",
                       result.stdout, re.M)
    assert [int(step) for step, *_ in lines] == [0, 3, 6]
    assert "ms/step" in result.stdout and "left" in result.stdout
    separator = r"^-{30} top-p 0\.9 -+\n" if name in GPT_STAGES else "^-{80}\n"
    sample = re.split(separator, result.stdout, flags=re.M)[-1]
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
    assert "no CUDA GPU" in stage_error(capsys, load_stage("01_bigram").main, "--device", "cuda",
                                        *quick_flags("01_bigram"))


# ----------------------------------------------------------------------------- one idea per stage

PAIRS = list(itertools.pairwise(ALL_STAGES))
BUDGETS = {("01_bigram", "02_single_head"): 60, ("02_single_head", "03_multi_head"): 30,
           ("03_multi_head", "04_block"): 70, ("04_block", "05_gpt"): 350, ("05_gpt", "06_train_for_real"): 400,
           ("06_train_for_real", "07_modern"): 250}
COMMON = ["estimate_loss", "progress", "check_finite", "train", "generate"]  # the loop of 01-04, whole
# The definitions each stage takes over from the one before without changing a character.
UNCHANGED = {
    ("01_bigram", "02_single_head"): COMMON,
    ("02_single_head", "03_multi_head"): COMMON + ["Head"],
    ("03_multi_head", "04_block"): COMMON,
    ("04_block", "05_gpt"): ["estimate_loss", "progress", "check_finite"],  # the recipe changes train
    ("05_gpt", "06_train_for_real"): ["GPTConfig", "PRESETS", "KVCache", "CausalSelfAttention",
                                      "causal_attention_weights", "MLP", "Block", "resolve_dtype", "autocast",
                                      "configure_optimizer", "learning_rate", "check_finite", "greedy",
                                      "top_k_filter", "top_p_filter", "sample_next", "generate"],
    ("06_train_for_real", "07_modern"): ["estimate_loss", "progress", "check_finite",
                                         "resolve_dtype", "autocast", "train_step", "StopOnSignal", "train", "STAGE",
                                         "rng_states", "set_rng_state", "save_checkpoint", "read_checkpoint",
                                         "model_from_checkpoint", "check_resumable", "load_checkpoint", "greedy",
                                         "top_k_filter", "top_p_filter", "sample_next", "print_samples"],
}
# main's steps, in this order, in every stage
SKELETON = ["parse_args", "select_device", "load_dataset", "build_model", "train", "save_metrics",
            "plot_attention", "generate"]


def definitions(name):
    """The source of each top-level function, class and constant of a stage, by name."""
    source = (ROOT / f"{name}.py").read_text()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.get_source_segment(source, node)
    return found


def main_calls(name):
    """The names of the functions main() calls, directly or through a helper of the stage, in order."""
    tree = ast.parse(definitions(name)["main"])
    calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
    named = sorted((c.lineno, c.col_offset, c.attr if isinstance(c, ast.Attribute) else c.id)
                   for c in calls if isinstance(c, (ast.Name, ast.Attribute)))
    helpers = {"print_samples": ["generate"]}  # stage 06 samples through print_samples
    return [step for *_, called in named for step in helpers.get(called, [called])]


def changed_lines(before, after):
    """Lines removed plus lines added by the shortest edit from before to after: what `diff`
    prints with < and >. (len(before) + len(after) - 2 * their longest common subsequence)"""
    common = [0] * (len(after) + 1)  # common[j]: the longest common subsequence with after[:j]
    for line in before:
        diagonal = 0
        for j, other in enumerate(after, 1):
            diagonal, common[j] = common[j], diagonal + 1 if line == other else max(common[j], common[j - 1])
    return len(before) + len(after) - 2 * common[-1]


def test_every_pair_of_consecutive_stages_has_a_budget():
    assert set(BUDGETS) == set(PAIRS) == set(UNCHANGED)


@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_consecutive_stages_differ_only_by_their_concept(pair):
    """The whole diff stays within its budget, and what the new idea does not touch is the same,
    character for character: the training loop, the loss estimates, progress, sampling."""
    before, after = [(ROOT / f"{name}.py").read_text().splitlines() for name in pair]
    changed = changed_lines(before, after)
    assert changed <= BUDGETS[pair], f"diff {pair[0]}.py {pair[1]}.py: {changed} lines, over {BUDGETS[pair]}"
    old, new = map(definitions, pair)
    for name in UNCHANGED[pair]:
        assert new.get(name) == old[name], f"{name} changed from {pair[0]} to {pair[1]}"


@pytest.mark.parametrize("name", ALL_STAGES)
def test_main_has_the_same_skeleton_in_every_stage(name):
    calls = main_calls(name)
    steps = [step for step in SKELETON if step != "plot_attention" or name != "01_bigram"]  # a table has none
    last = [len(calls) - 1 - calls[::-1].index(step) for step in steps]  # each step is there ...
    assert last == sorted(last), calls  # ... and the last time it comes, in the same order


def test_changed_lines_counts_as_diff_does():
    assert changed_lines(list("abcde"), list("abXde")) == 2  # one line replaced: < c, > X
    assert changed_lines(list("abc"), list("abc")) == 0
    assert changed_lines(list("abc"), list("xabcy")) == 2
    assert changed_lines([], list("ab")) == 2


def test_the_numbered_scripts_are_all_stages():
    assert [p.stem for p in sorted(ROOT.glob("[0-9][0-9]_*.py"))] == ALL_STAGES
    assert STAGES == ALL_STAGES[:4]
