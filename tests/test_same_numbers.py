"""The post-training stages give the numbers recorded in same_numbers.json: quick runs of 09, 10
and 11 (LoRA and a frozen reference, DPO's and GRPO's switches), every evaluation and closing
line, and every value of their history, to the last digit. They were recorded by running the code
from before stages 10 and 11 imported stage 09, and are recorded again only by a commit that
changes what a run does and says why (stage 10's default --sft-weight 1, and its closing lines,
which a run on one's own pairs leaves out). Floating-point results differ from one CPU to
another, and with the number of threads, so the numbers are kept by the kind of machine that
gave them, known by what a few of PyTorch's kernels compute on it. On a machine of another kind
the test says so and skips; RECORD_SAME_NUMBERS=1 python -m pytest tests/test_same_numbers.py
writes its numbers, to be checked against a run of the code they should equal."""
import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from conftest import load_stage, quick_flags

RECORDED = Path(__file__).with_name("same_numbers.json")
# each run: the stage, the model it tunes (a fixture), its flags over the quick ones
RUNS = {"09_lora default": ("09_lora", "base", []),
        "09_lora lora": ("09_lora", "base", ["--lora-rank", "4"]),
        "10_dpo default": ("10_dpo", "chat", []),
        "10_dpo alone": ("10_dpo", "chat", ["--sft-weight", "0"]),
        "10_dpo lora": ("10_dpo", "chat", ["--lora-rank", "4"]),
        "10_dpo switches": ("10_dpo", "chat", ["--sft-weight", "0.5", "--dpo-beta", "0.5",
                                               "--grad-accum-steps", "2"]),
        "11_grpo default": ("11_grpo", "backwards_base", []),
        "11_grpo switches": ("11_grpo", "backwards_base",
                             ["--kl-beta", "0.04", "--updates", "2", "--scale-rewards",
                              "--loss-norm", "grpo"]),
        "11_grpo lora": ("11_grpo", "backwards_base",
                         ["--lora-rank", "4", "--kl-beta", "0.04", "--loss-norm", "dr_grpo"])}


def machine():
    """This machine's arithmetic, as far as the runs' numbers depend on it: the version of
    PyTorch, its threads, and a digest of what attention and a softmax of a matrix product give
    in float32 and in bfloat16."""
    x = torch.randn(4, 2, 16, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
            results.append(F.scaled_dot_product_attention(x, x, x, is_causal=True))
            rows = x.flatten(0, 2)
            results.append((rows @ rows.T).softmax(dim=-1))
    digest = hashlib.sha256(b"".join(t.float().numpy().tobytes() for t in results)).hexdigest()
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {digest[:16]}"


def numbers(printed, out):
    """What a run gave: its evaluation lines and closing lines as printed (their timings left
    out), and its history to the last digit (its clock left out)."""
    lines = [line.split(" | ")[0] for line in printed.splitlines()
             if line.startswith("step ") and "val loss" in line or line.startswith(("of ", "held"))]
    history = json.loads((out / "metrics.json").read_text())["history"]
    return {"printed": lines,
            "history": [{key: value for key, value in h.items() if key != "seconds"}
                        for h in history]}


@pytest.mark.parametrize("run", RUNS)
def test_quick_runs_give_the_numbers_they_gave_before(run, base, request, tmp_path):
    name, model, flags = RUNS[run]
    folder = {"base": base, "chat": base / "chat"}.get(model) or request.getfixturevalue(model)
    recorded = json.loads(RECORDED.read_text())
    here = machine()
    if here not in recorded and not os.environ.get("RECORD_SAME_NUMBERS"):
        pytest.skip(f"the numbers were recorded on other machines ({', '.join(recorded)}), not on "
                    f"this one ({here}): record them here with RECORD_SAME_NUMBERS=1")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        load_stage(name).main([*quick_flags(name, tmp_path, folder), *flags])
    got = numbers(printed.getvalue(), tmp_path)
    if os.environ.get("RECORD_SAME_NUMBERS"):
        recorded.setdefault(here, {})[run] = got
        RECORDED.write_text(json.dumps(recorded, indent=1) + "\n")
    assert got == recorded[here][run]
