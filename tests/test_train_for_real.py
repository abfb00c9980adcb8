"""Stage 06: checkpoints, exact resume, Ctrl-C and SIGTERM, crashes and hostile checkpoint files.
Every bad input gets one sentence and exit status 2, and nothing trained is ever lost."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import ROOT, load_stage, stage_error

gpt = load_stage("06_train_for_real")
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--warmup-iters", "2", "--seed", "0",
        "--max-new-tokens", "0"]


def run_stage(*flags, name="06_train_for_real.py", **kwargs):
    return subprocess.run([sys.executable, name, *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, **kwargs)


def losses(stdout):
    return [line.split("|")[0] for line in stdout.splitlines() if ": train loss" in line]


def error_of(capsys, *argv):
    return stage_error(capsys, gpt.main, *argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a few steps of a tiny character model."""
    out = tmp_path_factory.mktemp("trained")
    gpt.main([*TINY, "--max-iters", "4", "--eval-interval", "2", "--out", str(out)])
    return out


def test_same_flags_same_losses_as_stage_05(tmp_path, capsys):
    """All of 06 is engineering: with 05's flags it trains exactly as 05 does."""
    flags = [*TINY, "--dropout", "0.1", "--max-iters", "20", "--eval-interval", "10"]
    load_stage("05_gpt").main(flags)
    plain = capsys.readouterr().out
    gpt.main([*flags, "--out", str(tmp_path)])
    assert len(losses(plain)) == 3 and losses(plain) == losses(capsys.readouterr().out)


def test_checkpoint_round_trip_is_exact(tmp_path):
    gpt.main([*TINY, "--max-iters", "4", "--eval-interval", "4", "--out", str(tmp_path)])
    model, tokenizer = gpt.load_checkpoint(tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 4 and checkpoint["config"]["n_embd"] == 32
    # the cpu preset's exact GELU, not GPT-2's tanh
    assert model.h[0].mlp.gelu.approximate == "none"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint["model"][name])
    assert model.lm_head.weight is model.wte.weight  # still tied after loading
    assert tokenizer.vocab_size == 65 and tokenizer.decode(tokenizer.encode("ROMEO:")) == "ROMEO:"


def test_command_line_trains_saves_and_samples(tmp_path, capsys):
    """The one run of this stage in a process of its own, as a user runs it; then samples from its
    checkpoint (in this process)."""
    trained = run_stage(*TINY, "--max-iters", "6", "--eval-interval", "3", "--max-new-tokens", "20",
                        "--out", str(tmp_path))
    assert trained.returncode == 0, trained.stderr
    for label in ["greedy", "temperature 0.8", "top-k 40", "top-p 0.9"]:
        assert f" {label} " in trained.stdout
    sample = ["--sample", "--out", str(tmp_path), "--prompt", "ROMEO:", "--max-new-tokens", "30",
              "--temperature", "0.8", "--top-k", "40", "--top-p", "0.95", "--num-samples", "3",
              "--seed", "7"]
    capsys.readouterr()
    gpt.main(sample)
    sampled = capsys.readouterr().out
    samples = [s for s in sampled.split("\n" + "-" * 30 + " sample ") if "ROMEO:" in s]
    assert len(samples) == 3
    gpt.main(sample)
    assert capsys.readouterr().out == sampled  # the same seed, the same samples


def test_checkpoints_load_without_running_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (shutil.copy, (__file__, str(tmp_path / "pwned")))

    torch.save({"stage": "06_train_for_real", "model": Payload()}, tmp_path / "ckpt.pt")
    with pytest.raises(gpt.UserError, match="not a readable checkpoint"):
        gpt.load_checkpoint(tmp_path / "ckpt.pt")
    assert not (tmp_path / "pwned").exists()


def test_a_new_run_never_replaces_a_trained_model_unless_told_to(capsys, tmp_path):
    flags = [*TINY, "--max-iters", "2", "--eval-interval", "2", "--out", str(tmp_path)]
    gpt.main(flags)
    # every run ends by saying where its model is
    assert (f"the model is in {tmp_path / 'ckpt.pt'}; sample it with python "
            f"06_train_for_real.py --sample --out {tmp_path}") in capsys.readouterr().out
    trained = (tmp_path / "ckpt.pt").read_bytes()
    message = error_of(capsys, *flags, "--lr", "1e-2")
    assert f"{tmp_path / 'ckpt.pt'} holds a trained model (06_train_for_real.py, step 2)" in message
    assert "--resume" in message and "another --out" in message and "--overwrite" in message
    assert (tmp_path / "ckpt.pt").read_bytes() == trained
    # told to
    gpt.main([*flags, "--max-iters", "4", "--overwrite"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4
    # whatever the file holds
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "(not readable as a checkpoint of this stage)" in error_of(capsys, *flags)
    assert (tmp_path / "ckpt.pt").read_bytes() == b"not a checkpoint"


def test_resuming_a_finished_run_says_how_to_train_on(capsys, trained):
    message = error_of(capsys, *TINY, "--max-iters", "4", "--resume", "--out", str(trained))
    assert "has trained its 4 steps of --max-iters; train on with --resume --max-iters 8" in message
    assert "--sample" in message


@pytest.mark.parametrize("mode", ["--sample", "--resume"])
def test_missing_checkpoint(capsys, tmp_path, mode):
    assert "no checkpoint at" in error_of(capsys, *TINY, mode, "--out", str(tmp_path))
    # and no empty folders left behind by the failed run, only those that were there before
    nothing_here = tmp_path / "runs" / "nothing_here"
    assert "no checkpoint at" in error_of(capsys, *TINY, mode, "--out", str(nothing_here))
    assert tmp_path.is_dir() and not (tmp_path / "runs").exists()


def test_sampling_flags_checked_against_the_checkpoint(capsys, trained):
    assert "'ü' never occurs" in error_of(capsys, "--sample", "--out", str(trained),
                                          "--prompt", "Müller")


def test_resume_refuses_another_tokenizer_text_or_shape(capsys, trained, tmp_path):
    base = [*TINY, "--max-iters", "6", "--resume", "--out", str(trained)]
    assert "--tokenizer char, not gpt2" in error_of(capsys, *base, "--tokenizer", "gpt2")
    assert "--n-layer 2, not 3" in error_of(capsys, *base, "--n-layer", "3")
    (tmp_path / "other.txt").write_text(
        "a completely different text, with other letters: XYZ&?!\n" * 40)
    assert "trained on another text" in error_of(
        capsys, *base, "--data", str(tmp_path / "other.txt"))


def test_foreign_truncated_and_altered_checkpoints(capsys, trained, tmp_path):
    checkpoint = torch.load(trained / "ckpt.pt", weights_only=True)
    broken = {**checkpoint["model"], "wte.weight": checkpoint["model"]["wte.weight"] * float("nan")}
    cases = {
        "stage": ({**checkpoint, "stage": "07_modern"},
                  "is a checkpoint of 07_modern.py, not of 06_train_for_real.py; sample it with "
                  "python 07_modern.py --sample --out"),
        "incomplete": ({"stage": "06_train_for_real", "model": checkpoint["model"]},
                       "not a checkpoint written"),
        "altered": ({**checkpoint, "config": {**checkpoint["config"], "n_layer": 3}},
                    "don't fit its config"),
        "nan": ({**checkpoint, "model": broken}, "not all finite"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).mkdir()
        torch.save(content, tmp_path / name / "ckpt.pt")
        assert message in error_of(capsys, "--sample", "--out", str(tmp_path / name))
    (tmp_path / "truncated").mkdir()
    data = (trained / "ckpt.pt").read_bytes()
    (tmp_path / "truncated" / "ckpt.pt").write_bytes(data[:len(data) // 2])
    assert "not a readable checkpoint" in error_of(
        capsys, "--sample", "--out", str(tmp_path / "truncated"))
    (tmp_path / "folder" / "ckpt.pt").mkdir(parents=True)  # a folder where the file should be
    assert "no checkpoint at" in error_of(capsys, "--sample", "--out", str(tmp_path / "folder"))


def test_an_out_folder_that_cannot_be_written_is_found_before_training(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert "cannot write there (Not a directory)" in error_of(
        capsys, *TINY, "--out", str(tmp_path / "file" / "run"))
    assert "is a file, not a folder" in error_of(capsys, *TINY, "--out", str(tmp_path / "file"))


def test_a_full_disk_keeps_the_previous_checkpoint(capsys, trained, tmp_path, monkeypatch):
    shutil.copytree(trained, tmp_path / "run")
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gpt.torch, "save", full_disk)
    message = error_of(capsys, *TINY, "--max-iters", "6", "--resume",
                       "--out", str(tmp_path / "run"))
    assert "No space left on device" in message and "the previous one, if any, is intact" in message
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    train_step = gpt.train_step

    def step_then_break_the_weights(model, optimizer, batches, args, step, *rest):
        loss = train_step(model, optimizer, batches, args, step, *rest)
        if step == 6:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))  # as a too-large learning rate would
        return loss

    monkeypatch.setattr(gpt, "train_step", step_then_break_the_weights)
    message = error_of(capsys, *TINY, "--max-iters", "20", "--eval-interval", "5",
                       "--out", str(tmp_path))
    assert "the loss became nan at step 8" in message and "diverged" in message
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 5
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


WRITER = textwrap.dedent("""
    import importlib, sys, types
    import torch
    gpt = importlib.import_module("06_train_for_real")
    from shared.tokenizer import CharTokenizer
    model = gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=65, n_layer=8, n_head=8, n_embd=512))
    optimizer = gpt.configure_optimizer(model, types.SimpleNamespace(weight_decay=0.1, lr=1e-3))
    tokenizer = CharTokenizer("abc")
    for step in range(1000):
        gpt.save_checkpoint(sys.argv[1], model, optimizer, tokenizer, step, [], [])
        print(step, flush=True)
""")


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_and_its_debris_is_cleaned(
        tmp_path):
    (tmp_path / "writer.py").write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                                        + WRITER)
    path = tmp_path / "ckpt.pt"
    writer = subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(path)],
                              stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        saved = int(writer.stdout.readline())  # a save has finished; the next one is under way
    time.sleep(0.05)
    writer.kill()  # SIGKILL: no cleanup, no finally
    writer.wait()
    checkpoint = gpt.read_checkpoint(path)
    assert checkpoint["step"] >= saved and checkpoint["model"]["wte.weight"].shape == (65, 512)
    # as a kill mid-write leaves one (it may have)
    leftover = tmp_path / f"ckpt.pt.{writer.pid}.x.tmp"
    leftover.write_bytes(b"half a checkpoint")
    running = tmp_path / f"ckpt.pt.{os.getpid()}.y.tmp"  # a live process's write: not debris
    running.write_bytes(b"being written")
    model, tokenizer = gpt.load_checkpoint(path)
    gpt.save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), tokenizer, 7, [], [])
    assert (sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name)
            == ["ckpt.pt", running.name])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_writes_a_checkpoint_that_resumes(tmp_path, capsys, signum):
    flags = [*TINY, "--max-iters", "100000", "--eval-interval", "50", "--out", str(tmp_path)]
    process = subprocess.Popen([sys.executable, "06_train_for_real.py", *flags], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step 50:"):  # training is under way
            break
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err  # 130 after Ctrl-C and its samples, 143 at once
    stopped = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and "--resume" in stopped[0] and "Traceback" not in err
    step = int(stopped[0].split()[3].rstrip(";"))
    assert step >= 50 and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == step
    assert json.loads((tmp_path / "metrics.json").read_text())["history"][-1]["step"] == 50
    gpt.main([*TINY, "--max-iters", str(step + 5), "--resume", "--out", str(tmp_path)])
    resumed = capsys.readouterr().out
    assert f"resuming from step {step}" in resumed and f"step {step + 5}: train loss" in resumed


def test_float16_on_a_cpu_is_warned_of_and_still_trains(capsys, tmp_path):
    """CPUs have no fast float16; the run says so in one line, then trains with loss scaling."""
    gpt.main([*TINY, "--dtype", "float16", "--device", "cpu", "--max-iters", "4",
              "--eval-interval", "4", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "warning: --dtype float16 is for GPUs" in captured.err
    assert "bfloat16 is the 16-bit type to use" in captured.err
    assert "on cpu in float16" in captured.out and len(losses(captured.out)) == 2
