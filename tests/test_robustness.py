"""Every stage under bad input: one sentence on stderr and exit status 2, never a traceback."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import GPT_STAGES, ROOT, load_stage, quick_flags, stage_error


@pytest.mark.parametrize("name", GPT_STAGES)
@pytest.mark.parametrize("flags,message", [
    (["--no-such-flag"], "unrecognized arguments"),
    (["--max-iters", "ten"], "expected an integer"),
    (["--batch-size", "0"], "must be above 0"),
    (["--n-layer", "-2"], "must be above 0"),
    (["--eval-iters", "0"], "must be above 0"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--dropout", "1"], "below 1"),
    (["--dtype", "float8"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--preset", "huge"], "invalid choice"),
])
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
def test_unavailable_device(capsys, name):
    assert "no CUDA GPU" in stage_error(capsys, load_stage(name).main, "--device", "cuda")


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
    assert "no such file" in stage_error(capsys, load_stage("05_gpt").main, "--data", str(tmp_path / "nothing.txt"))


def test_no_network_for_tiktoken(tmp_path):
    # an empty cache and a proxy that refuses connections: tiktoken has to download, and can't
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "05_gpt.py", *quick_flags("05_gpt"), "--tokenizer", "gpt2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "could not fetch tiktoken's files" in result.stderr
    assert "Traceback" not in result.stderr
