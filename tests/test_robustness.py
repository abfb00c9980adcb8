"""Stage 05 under bad input, interruptions, crashes and hostile checkpoints: every bad input gets
one sentence and exit status 2, and no trained state is ever lost."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import ROOT, stage_error, load_stage

gpt = load_stage("05_gpt")
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--warmup-iters", "2", "--seed", "0", "--max-new-tokens", "0"]


def error_of(capsys, *argv):
    return stage_error(capsys, gpt.main, *argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a few steps of a tiny character model."""
    out = tmp_path_factory.mktemp("trained")
    gpt.main([*TINY, "--max-iters", "4", "--eval-interval", "2", "--out", str(out)])
    return out


@pytest.mark.parametrize("flags,message", [
    (["--no-such-flag"], "unrecognized arguments"),
    (["--max-iters", "ten"], "expected an integer"),
    (["--batch-size", "0"], "must be above 0"),
    (["--n-layer", "-2"], "must be above 0"),
    (["--eval-iters", "0"], "must be above 0"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--temperature", "-0.5"], "must be 0 or more"),
    (["--top-k", "0"], "must be above 0"),
    (["--top-p", "0"], "above 0 and at most 1"),
    (["--top-p", "1.5"], "above 0 and at most 1"),
    (["--dropout", "1"], "below 1"),
    (["--dtype", "float8"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
])
def test_bad_flags(capsys, flags, message):
    assert message in error_of(capsys, *flags)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_unavailable_device(capsys):
    assert "no CUDA GPU" in error_of(capsys, "--device", "cuda")


@pytest.mark.parametrize("content,message", [
    (b"", "has 0 characters"),
    (b"To be, or not to be.\n", "has 21 characters"),
    (b"\x7fELF\x02\x01\x01\x00" * 200, "looks like a binary file"),
    ("Ünïcödé ".encode("latin-1") * 200, "is not UTF-8"),
])
def test_bad_data_files(capsys, tmp_path, content, message):
    (tmp_path / "data.txt").write_bytes(content)
    assert message in error_of(capsys, *TINY, "--data", str(tmp_path / "data.txt"))


def test_missing_data_file(capsys, tmp_path):
    assert "no such file" in error_of(capsys, "--data", str(tmp_path / "nothing.txt"))


@pytest.mark.parametrize("mode", ["--sample", "--resume"])
def test_missing_checkpoint(capsys, tmp_path, mode):
    assert "no checkpoint at" in error_of(capsys, *TINY, mode, "--out", str(tmp_path))


def test_sampling_flags_checked_against_the_checkpoint(capsys, trained):
    assert "more than the 65 tokens" in error_of(capsys, "--sample", "--out", str(trained), "--top-k", "66")
    assert "'ü' never occurs" in error_of(capsys, "--sample", "--out", str(trained), "--prompt", "Müller")


def test_resume_refuses_another_tokenizer_text_or_shape(capsys, trained, tmp_path):
    base = [*TINY, "--max-iters", "6", "--resume", "--out", str(trained)]
    assert "--tokenizer char, not gpt2" in error_of(capsys, *base, "--tokenizer", "gpt2")
    assert "--n-layer 2, not 3" in error_of(capsys, *base, "--n-layer", "3")
    (tmp_path / "other.txt").write_text("a completely different text, with other letters: XYZ&?!\n" * 40)
    assert "trained on another text" in error_of(capsys, *base, "--data", str(tmp_path / "other.txt"))


def test_foreign_truncated_and_altered_checkpoints(capsys, trained, tmp_path):
    checkpoint = torch.load(trained / "ckpt.pt", weights_only=True)
    cases = {
        "stage": ({**checkpoint, "stage": "04_block"}, "not a checkpoint written by 05_gpt.py"),
        "incomplete": ({"stage": "05_gpt", "model": checkpoint["model"]}, "lacks"),
        "altered": ({**checkpoint, "config": {**checkpoint["config"], "n_layer": 3}}, "don't fit its config"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).mkdir()
        torch.save(content, tmp_path / name / "ckpt.pt")
        assert message in error_of(capsys, "--sample", "--out", str(tmp_path / name))
    (tmp_path / "truncated").mkdir()
    data = (trained / "ckpt.pt").read_bytes()
    (tmp_path / "truncated" / "ckpt.pt").write_bytes(data[:len(data) // 2])
    assert "not a readable checkpoint" in error_of(capsys, "--sample", "--out", str(tmp_path / "truncated"))


def test_unwritable_out_folder(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert "could not write the checkpoint" in error_of(capsys, *TINY, "--max-iters", "2",
                                                        "--out", str(tmp_path / "file" / "run"))


def test_no_network_for_tiktoken(tmp_path):
    # an empty cache and a proxy that refuses connections: tiktoken has to download, and can't
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "05_gpt.py", *TINY, "--tokenizer", "gpt2", "--max-iters", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "could not fetch tiktoken's files" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- nothing lost

def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    train_step = gpt.train_step

    def step_then_break_the_weights(model, optimizer, batches, args, step, *rest):
        loss = train_step(model, optimizer, batches, args, step, *rest)
        if step == 6:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))  # as a too-large learning rate would
        return loss

    monkeypatch.setattr(gpt, "train_step", step_then_break_the_weights)
    message = error_of(capsys, *TINY, "--max-iters", "20", "--eval-interval", "5", "--out", str(tmp_path))
    assert "the loss became nan at step 8" in message and "diverged" in message
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 5
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


WRITER = textwrap.dedent("""
    import importlib, sys, types
    import torch
    gpt = importlib.import_module("05_gpt")
    from shared.data import CharTokenizer
    model = gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=65, n_layer=8, n_head=8, n_embd=512))
    optimizer = gpt.configure_optimizer(model, types.SimpleNamespace(weight_decay=0.1, lr=1e-3))
    tokenizer = CharTokenizer("abc")
    for step in range(1000):
        gpt.save_checkpoint(sys.argv[1], model, optimizer, tokenizer, step, [], [])
        print(step, flush=True)
""")


def test_killing_a_writer_mid_save_leaves_the_previous_checkpoint(tmp_path):
    (tmp_path / "writer.py").write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + WRITER)
    path = tmp_path / "ckpt.pt"
    writer = subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(path)], stdout=subprocess.PIPE,
                              text=True)
    for _ in range(3):
        saved = int(writer.stdout.readline())  # a save has finished; the next one is under way
    time.sleep(0.05)
    writer.kill()  # SIGKILL: no cleanup, no finally
    writer.wait()
    checkpoint = gpt.read_checkpoint(path)
    assert checkpoint["step"] >= saved and checkpoint["model"]["wte.weight"].shape == (65, 512)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".pt")] == ["ckpt.pt"]


def test_ctrl_c_writes_a_checkpoint_that_resumes(tmp_path):
    flags = [*TINY, "--max-iters", "100000", "--eval-interval", "50", "--out", str(tmp_path)]
    process = subprocess.Popen([sys.executable, "05_gpt.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step 50:"):  # training is under way
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    stopped = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and "--resume" in stopped[0]
    step = int(stopped[0].split()[3].rstrip(";"))
    assert step >= 50 and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == step
    assert json.loads((tmp_path / "metrics.json").read_text())["history"][-1]["step"] == 50
    resumed = subprocess.run([sys.executable, "05_gpt.py", *TINY, "--max-iters", str(step + 5), "--resume",
                              "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {step}" in resumed.stdout and f"step {step + 5}: train loss" in resumed.stdout
