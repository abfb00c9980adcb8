"""Exact resume in every stage that keeps checkpoints: a run that Ctrl-C stopped, then resumed,
gives the losses of a run never stopped, to the last digit; and neither a new run nor a resume
past the end replaces what it trained."""
import json
import os
import signal

import pytest

from conftest import POST_TRAINING, ROOT, load_stage, quick_flags, stage_base, stage_error
from shared import prepare

# each stage that keeps checkpoints: DPO with a frozen copy of its model as the reference (which a
# resumed run loads again) and with adapters, whose reference is the model with them off; GRPO
# with a KL penalty to such a copy and two PPO updates a batch, on a model that solves some of its
# problems (so that RL moves it)
RESUMABLE = [(name, []) for name in ["06_train_for_real", "07_modern", "08_chat", "09_lora",
                                     "10_dpo"]] + [
    ("10_dpo", ["--lora-rank", "4"]),
    ("11_grpo", ["--kl-beta", "0.04", "--updates", "2"])]


def history(out):
    return json.loads((out / "metrics.json").read_text())["history"]


@pytest.mark.parametrize("name,extra", RESUMABLE,
                         ids=[" ".join([name, *extra]) for name, extra in RESUMABLE])
def test_ctrl_c_then_resume_gives_the_losses_of_an_uninterrupted_run(name, extra, base, tmp_path,
                                                                      monkeypatch, capsys, request):
    stage = load_stage(name)
    model = stage_base(name, base)
    if name == "11_grpo":
        model = request.getfixturevalue("backwards_base")
    flags = [*quick_flags(name, base=model), "--dropout", "0.1",
             "--max-iters", "12", "--eval-interval", "4", *extra]
    if name == "06_train_for_real":
        # from token shards, Tiny Shakespeare in four, which batches cross
        prepare.prepare([str(ROOT / "data" / "tinyshakespeare.txt")], tmp_path / "shards",
                        shard_tokens=300_000, progress=False)
        flags += ["--data", str(tmp_path / "shards")]
    stage.main([*flags, "--out", str(tmp_path / "whole")])
    # the chat stages stop in their first step: what follows comes from their own random state
    stop_at = 0 if name in POST_TRAINING else 6
    train_step = stage.train_step

    sent = []

    def step_with_ctrl_c(model, optimizer, batches, args, step, *rest):
        # once: with --updates 2, stage 11 takes two optimizer steps a step
        if step == stop_at and not sent:
            sent.append(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(model, optimizer, batches, args, step, *rest)

    monkeypatch.setattr(stage, "train_step", step_with_ctrl_c)
    stage.main([*flags, "--out", str(tmp_path / "parts")])
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert ("SIGINT: stopping after this step" in out
            and f"stopped at step {stop_at + 1}; saved to" in out and "--resume to go on" in out)
    stage.main([*flags, "--resume", "--out", str(tmp_path / "parts")])
    resumed = history(tmp_path / "parts")
    assert [h["step"] for h in resumed] == [0, 4, 8, 12]
    assert ([(h["train"], h["val"]) for h in resumed]
            == [(h["train"], h["val"]) for h in history(tmp_path / "whole")])
    # one clock across the resume, as one run's
    seconds = [h["seconds"] for h in resumed]
    assert seconds == sorted(seconds)
    parts = str(tmp_path / "parts")
    again = stage_error(capsys, stage.main, *flags, "--out", parts)
    assert f"holds a trained model ({name}.py, step 12)" in again
    on = stage_error(capsys, stage.main, *flags, "--resume", "--out", parts)
    assert "train on with --resume --max-iters 24" in on
