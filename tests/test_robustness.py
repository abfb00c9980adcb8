"""Every stage under bad input: one sentence on stderr and exit status 2, never a traceback."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (
    GPT_STAGES,
    ON_TRUNK,
    PAIRS,
    POST_TRAINING,
    REWARDS,
    ROOT,
    STAGES,
    TRAINING,
    load_stage,
    quick_flags,
    stage_base,
    stage_error,
    write_preferences,
)
from shared.cli import run
from shared.data import get_batch

BAD_FLAGS = [
    (["--no-such-flag"], "unrecognized arguments"),
    (["--max-iters", "ten"], "expected an integer"),
    (["--batch-size", "0"], "must be above 0"),
    (["--block-size", "0"], "must be above 0"),
    (["--eval-iters", "0"], "must be above 0"),
    (["--dropout", "1"], "below 1"),
    (["--dtype", "float8"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
]
# the flags of a model's shape, in the stages that build one (post-training loads its model)
BAD_SHAPES = [
    (["--n-layer", "-2"], "must be above 0"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--preset", "huge"], "invalid choice"),
]


@pytest.mark.parametrize("name,flags,message", [
    *((name, *case) for name in GPT_STAGES for case in BAD_FLAGS),
    *((name, *case) for name in GPT_STAGES if name not in POST_TRAINING for case in BAD_SHAPES)])
def test_bad_flags(capsys, name, flags, message):
    assert message in stage_error(capsys, load_stage(name).main, *flags)


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-0.5"], "must be 0 or more"),
    (["--top-k", "0"], "must be above 0"),
    (["--top-p", "0"], "above 0 and at most 1"),
    (["--top-p", "1.5"], "above 0 and at most 1"),
    (["--num-samples", "0"], "must be above 0"),
])
def test_bad_sampling_flags(capsys, flags, message):
    assert message in stage_error(capsys, load_stage("06_train_for_real").main, *flags)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("name", GPT_STAGES)
def test_unavailable_device(capsys, tmp_path, name):
    assert "no CUDA GPU" in stage_error(capsys, load_stage(name).main, "--device", "cuda",
                                        "--out", str(tmp_path))


@pytest.mark.parametrize("content,message", [
    (b"", "has 0 characters"),
    (b"To be, or not to be.\n", "has 21 characters"),
    (b"\x7fELF\x02\x01\x01\x00" * 200, "looks like a binary file"),
    ("Ünïcödé ".encode("latin-1") * 200, "is not UTF-8"),
])
def test_bad_data_files(capsys, tmp_path, content, message):
    (tmp_path / "data.txt").write_bytes(content)
    assert message in stage_error(capsys, load_stage("05_gpt").main, *quick_flags("05_gpt"),
                                  "--data", str(tmp_path / "data.txt"))


def test_missing_data_file(capsys, tmp_path):
    assert "no such file" in stage_error(capsys, load_stage("06_train_for_real").main, "--data",
                                         str(tmp_path / "nothing.txt"), "--out", str(tmp_path))


def test_no_network_for_tiktoken(tmp_path):
    # an empty cache and a proxy that refuses connections: tiktoken has to download, and can't
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "05_gpt.py", *quick_flags("05_gpt"),
                             "--tokenizer", "gpt2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "could not fetch tiktoken's files" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------ every stage, at the edges

@pytest.mark.parametrize("name", TRAINING)
def test_a_diverging_run_ends_with_one_sentence_in_every_stage(capsys, tmp_path, base, name):
    if name in REWARDS:
        pytest.skip("the quick base solves no problem: every advantage is 0, and so is every "
                    "update, whatever the learning rate")
    flags = quick_flags(name, tmp_path, stage_base(name, base))
    message = stage_error(capsys, load_stage(name).main, *flags,
                          "--max-iters", "30", "--eval-interval", "10", "--lr", "1e12",
                          "--max-new-tokens", "50")
    assert re.search(r"the loss became (nan|inf) at step \d+: training diverged; "
                     r"try a smaller --lr", message)


EDGES = [  # (flags, what the one sentence says)
    (["--seed", "-1"], "must be 0 or more and below 2**63"),
    (["--seed", str(2**64)], "must be 0 or more and below 2**63"),
    (["--lr", "nan"], "expected a finite number"),
    (["--lr", "inf"], "expected a finite number"),
    (["--lr", ""], "expected a number"),
    (["--batch-size", "1e3"], "expected an integer"),
    (["--eval-interval", "0"], "must be above 0"),
    (["--max-new-tokens", "-1"], "must be 0 or more"),
    (["--out", ""], "expected a folder, got an empty string"),
    (["--device", ""], "invalid choice"),
]


@pytest.mark.parametrize("name", TRAINING)
@pytest.mark.parametrize("flags,message", EDGES,
                         ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_flags_at_their_edges_in_every_stage(capsys, name, flags, message):
    assert message in stage_error(capsys, load_stage(name).main, *flags)


@pytest.mark.parametrize("name", TRAINING)
def test_paths_that_are_not_what_they_should_be(capsys, tmp_path, name):
    main = load_stage(name).main
    (tmp_path / "file").write_text("a file")
    assert "is a file, not a folder" in stage_error(capsys, main, "--out", str(tmp_path / "file"))
    assert "cannot write there (Not a directory)" in stage_error(
        capsys, main, "--out", str(tmp_path / "file" / "x"))
    # stage 11 reads problems for --task gsm8k only
    out = ["--out", str(tmp_path), *(["--task", "gsm8k"] if name in REWARDS else [])]
    # a folder is a corpus of token shards, except to the chat stages, which read conversations
    folder = ("cannot be read (Is a directory)" if name in POST_TRAINING
              else "is a folder without meta.json")
    assert folder in stage_error(capsys, main, "--data", str(tmp_path), *out)
    # the chat stages read conversations, of which an empty file has none, stage 10 pairs,
    # stage 11 problems
    empty = {"08_chat": "has no conversation", "09_lora": "has no conversation",
             "10_dpo": "holds fewer than two preference pairs",
             "11_grpo": "has fewer than two problems"}.get(name, "has 0 characters")
    assert empty in stage_error(capsys, main, "--data", "/dev/null", *out)


SMALLEST = {"01_bigram": [], "02_single_head": ["--n-embd", "1"],
            "03_multi_head": ["--n-embd", "1", "--n-head", "1"],
            **{name: ["--n-embd", "1", "--n-head", "1", "--n-layer", "1"]
               for name in ["04_block", "05_gpt", "06_train_for_real"]},
            # RoPE: pairs
            "07_modern": ["--n-embd", "2", "--n-head", "1", "--n-kv-head", "1", "--n-layer", "1"],
            # the chat stages fine-tune the smallest model of stage 07; adapters of rank 1 at most
            "08_chat": [], "09_lora": ["--lora-rank", "1"], "10_dpo": ["--lora-rank", "1"],
            "11_grpo": ["--lora-rank", "1"]}
# the context of a model: 1 token; but the chat stages need one that a conversation fits in, and
# the shortest of Shakespeare's val exchanges takes 20 tokens with its template
CONTEXT = {name: "20" for name in POST_TRAINING}


@pytest.mark.parametrize("name", TRAINING)
def test_the_smallest_sizes_train(capsys, tmp_path, name):
    base = None
    if name in POST_TRAINING:
        base = tmp_path / "base"
        load_stage("07_modern").main([*quick_flags("07_modern", base), *SMALLEST["07_modern"],
                                      "--block-size", "20", "--batch-size", "1"])
    if name in ON_TRUNK:
        # the stages built on 09 tune a chat model: 08 on the smallest model of 07
        load_stage("08_chat").main([*quick_flags("08_chat", base / "chat", base),
                                    "--block-size", "20", "--batch-size", "1"])
        base = base / "chat"
        write_preferences(base / PAIRS)
    load_stage(name).main([*quick_flags(name, tmp_path / "run", base), *SMALLEST[name],
                           "--block-size", CONTEXT.get(name, "1"),
                           "--batch-size", "1", "--max-new-tokens", "5"])
    assert "step 6: train loss" in capsys.readouterr().out.rsplit("parameters", 1)[1]


# ----------------------------------------------------------------------------- what is sampled

@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    load_stage("06_train_for_real").main([*quick_flags("06_train_for_real", out)])
    return out


@pytest.mark.parametrize("flags,check", [
    # whitespace is text like any other
    (["--prompt", " "], lambda out: out.count(" sample ") == 1),
    # 140 characters, a 16-token context
    (["--prompt", "ROMEO: " * 20], lambda out: "ROMEO: " * 20 in out),
    (["--prompt", "ROMEO:", "--max-new-tokens", "0"], lambda out: out.rstrip().endswith("ROMEO:")),
    # in 3 batches
    (["--num-samples", "9", "--batch-size", "4"], lambda out: out.count(" sample ") == 9),
], ids=["whitespace", "longer than the context", "no new tokens", "more samples than a batch"])
def test_sampling_at_the_edges_works(capsys, checkpoint_folder, flags, check):
    out = samples(capsys, checkpoint_folder, *flags)
    assert check(out), out


def samples(capsys, folder, *flags):
    """What --sample prints from the checkpoint in folder, 40 new tokens, with the given flags."""
    load_stage("06_train_for_real").main(["--sample", "--out", str(folder),
                                          "--max-new-tokens", "40", *flags])
    return capsys.readouterr().out


@pytest.mark.parametrize("flags,same_as", [
    # so cold that only the likeliest token has any probability left
    (["--temperature", "1e-30"], ["--temperature", "0"]),
    # a nucleus that holds the top token alone
    (["--top-p", "1e-9"], ["--temperature", "0"]),
    # more than the 65 tokens: all of them, as with no top-k at all
    (["--top-k", "100000"], []),
], ids=["cold is greedy", "tiny top-p is greedy", "huge top-k is plain sampling"])
def test_samplers_at_their_limits_draw_the_tokens_of_the_plain_ones(capsys, checkpoint_folder,
                                                                    flags, same_as):
    assert samples(capsys, checkpoint_folder, *flags) == samples(capsys, checkpoint_folder,
                                                                 *same_as)


def test_a_hot_sampler_draws_far_from_greedy(capsys, checkpoint_folder):
    """At temperature 1e30 every token is about as likely as any other."""
    greedy = samples(capsys, checkpoint_folder, "--temperature", "0").split("\n", 1)[1]
    hot = samples(capsys, checkpoint_folder, "--temperature", "1e30").split("\n", 1)[1]
    assert hot != greedy and len(set(hot)) > len(set(greedy)) + 5, (hot, greedy)


@pytest.mark.parametrize("flags,message", [
    (["--prompt", ""], "expected some text, got an empty string"),
    (["--prompt", "\udcff"], "is not valid UTF-8 text"),  # what a shell passes for the byte 0xff
    (["--prompt", "🙂"], "never occurs in the training text"),
])
def test_prompts_the_model_cannot_start_from(capsys, checkpoint_folder, flags, message):
    assert message in stage_error(capsys, load_stage("06_train_for_real").main, "--sample",
                                  "--out", str(checkpoint_folder), *flags)


@pytest.mark.parametrize("name", STAGES + ["05_gpt"])
def test_ctrl_c_stops_training_then_the_run_samples_and_exits_with_status_130(capsys, monkeypatch,
                                                                              name):
    stage, calls = load_stage(name), []

    def get_batch_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:  # the training loop is under way
            os.kill(os.getpid(), signal.SIGINT)
        return get_batch(*args, **kwargs)

    monkeypatch.setattr(stage, "get_batch", get_batch_then_ctrl_c)
    with pytest.raises(SystemExit) as exit_:
        run(lambda: stage.main([*quick_flags(name), "--max-iters", "1000",
                                "--max-new-tokens", "20"]))
    out = capsys.readouterr().out
    assert exit_.value.code == 130 and "interrupted at step" in out and "step 1000:" not in out
    assert len(out.rstrip().rsplit("-" * 20, 1)[-1].strip()) > 0  # and it still printed a sample


def test_ctrl_c_stops_training_then_a_second_one_stops_sampling(tmp_path):
    process = subprocess.Popen([sys.executable, "01_bigram.py", "--max-iters", "1000000",
                                "--max-new-tokens", "10000000"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step 500:"):
            break
    process.send_signal(signal.SIGINT)  # training stops; the sample starts
    for line in process.stdout:
        if line.startswith("interrupted at step"):
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # stops the sample
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.strip() == "01_bigram.py: interrupted"


def test_a_second_run_into_a_folder_a_run_trains_into_is_refused(tmp_path, capsys):
    """While a run holds --out (a lock on out/.lock, here taken by another process), a second run
    into it is refused in one sentence before it does anything; once that process is gone,
    killed or not, the folder is free."""
    out = tmp_path / "run"
    out.mkdir()
    hold = ("import fcntl, sys, time; lock = open(sys.argv[1], 'w'); "
            "fcntl.flock(lock, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    main = load_stage("06_train_for_real").main
    message = stage_error(capsys, main, *quick_flags("06_train_for_real", out))
    assert f"--out {out} is in use by another run, which trains into it now" in message
    assert not (out / "ckpt.pt").exists()
    holder.kill()
    holder.wait()
    main(quick_flags("06_train_for_real", out))
    assert (out / "ckpt.pt").exists()
