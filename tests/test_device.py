"""The memory check: its estimate against the memory real training steps take, and its refusals."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TRAINING, load_stage, quick_flags, stage_base, stage_error
from shared import UserError, device

# Runs a stage's main() for two steps and prints the estimate of training_memory next to what
# training took: the peak resident memory during train() less the memory in use when it began
# (the model's weights are there already, so they are taken off the estimate too). The peak is
# this program's own (VmHWM): getrusage's ru_maxrss can keep that of the process that started it.
MEASURE = textwrap.dedent("""
    import importlib, json, resource, sys
    import shared.device
    stage = importlib.import_module(sys.argv[1])
    seen = {}

    def estimate(model, batch_size, block_size):
        seen["estimate"] = training(model, batch_size, block_size)
        seen["weights"] = sum(t.numel() * t.element_size()
                              for t in [*model.parameters(), *model.buffers()])
        return seen["estimate"]

    def measured_train(*args, **kwargs):
        with open("/proc/self/statm") as f:
            seen["before"] = int(f.read().split()[1]) * resource.getpagesize()
        result = train(*args, **kwargs)
        with open("/proc/self/status") as f:
            peak_kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
        seen["peak"] = int(peak_kb) * 1024
        return result

    training, train = shared.device.training_memory, stage.train
    shared.device.training_memory, stage.train = estimate, measured_train
    stage.main(sys.argv[2:])
    print(json.dumps(seen))
""")


MEASURED = {
    "01_bigram": ["--batch-size", "512", "--block-size", "256"],  # the logits, nothing else
    "02_single_head": ["--batch-size", "128", "--block-size", "256"],  # attention matrices
    # the cpu preset's model
    "05_gpt": ["--batch-size", "32", "--block-size", "256", "--dtype", "float32"],
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """MEASURE's output for each stage of MEASURED: processes of their own, each one's memory its
    own, started together so that they overlap."""
    script = tmp_path_factory.mktemp("measure") / "measure.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + MEASURE)
    processes = {name: subprocess.Popen([sys.executable, str(script), name, *flags,
                                         "--max-iters", "2", "--eval-interval", "2",
                                         "--eval-iters", "1", "--max-new-tokens", "0"],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                 for name, flags in MEASURED.items()}
    return {name: process.communicate(timeout=300) + (process.returncode,)
            for name, process in processes.items()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("name", MEASURED)
def test_the_estimate_is_within_its_factor_of_the_memory_training_takes(measured, name):
    out, err, returncode = measured[name]
    assert returncode == 0, err
    seen = json.loads(out.splitlines()[-1])
    taken, estimated = seen["peak"] - seen["before"], seen["estimate"] - seen["weights"]
    assert taken > 100 * 2**20  # enough for the comparison to mean something
    print(f"{name} {MEASURED[name]}: took {taken / 2**20:.0f} MB, "
          f"estimated {estimated / 2**20:.0f} MB")
    assert 1 / device.ESTIMATE_FACTOR <= taken / estimated <= device.ESTIMATE_FACTOR, seen


@pytest.mark.parametrize("name", TRAINING)
def test_a_run_that_cannot_fit_is_refused_before_it_starts(capsys, tmp_path, base, name):
    flags = quick_flags(name, tmp_path, stage_base(name, base))
    message = stage_error(capsys, load_stage(name).main, *flags,
                          "--batch-size", "1000000000")
    assert "training needs about" in message and "lower --batch-size or --block-size" in message
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_model_too_big_for_the_machine_is_refused_before_it_is_built(capsys):
    message = stage_error(capsys, load_stage("04_block").main, "--n-embd", "60000", "--n-head", "1")
    assert "lower the model's size (--n-layer, --n-embd)" in message
    message = stage_error(capsys, load_stage("05_gpt").main, "--n-embd", "10000000000",
                          "--n-head", "1")
    assert "cannot be built" in message


def test_the_estimate_grows_with_the_batch_and_the_context():
    gpt = load_stage("05_gpt")
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(block_size=256, vocab_size=65, n_layer=2, n_head=2,
                                      n_embd=32))
    small, batch, context = (device.training_memory(model, b, t)
                             for b, t in [(8, 64), (16, 64), (8, 128)])
    assert small < batch and small < context
    weights = 4 * sum(p.numel() * 4 for p in model.parameters())
    # activations: about linear in the batch
    assert batch - weights == pytest.approx(2 * (small - weights), rel=0.05)


def test_an_allocator_failure_is_one_sentence(capsys, monkeypatch):
    stage = load_stage("04_block")

    def allocate_too_much(*args, **kwargs):
        torch.empty(2**62, dtype=torch.uint8)  # no machine has this; the allocator refuses

    monkeypatch.setattr(stage, "get_batch", allocate_too_much)
    message = stage_error(capsys, stage.main, *quick_flags("04_block"))
    assert "ran out of memory" in message and "lower --batch-size" in message


def test_without_enough_memory_the_check_names_what_to_lower(monkeypatch):
    args = type("Args", (), dict(batch_size=64, block_size=64))
    gpt = load_stage("05_gpt")
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=65, n_layer=2, n_head=2, n_embd=32))
    monkeypatch.setattr(device, "available_memory", lambda _: 10**12)
    device.check_memory(model, args, torch.device("cpu"))  # fits
    monkeypatch.setattr(device, "available_memory", lambda _: 1000)
    with pytest.raises(UserError, match="lower the model's size"):
        device.check_memory(model, args, torch.device("cpu"))
    monkeypatch.setattr(device, "available_memory",
                        lambda _: device.training_memory(model, 64, 64) // 2)
    with pytest.raises(UserError, match="lower --batch-size or --block-size"):
        device.check_memory(model, args, torch.device("cpu"))
