"""Stage 06 on two processes with torchrun and DDP over Gloo (CPU)."""
import json
import os
import subprocess
import sys
import types

import torch
import torch.distributed as dist
from torch import multiprocessing
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import ROOT, load_stage
from shared import prepare

gpt = load_stage("06_train_for_real")
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--warmup-iters", "2", "--seed", "0",
        "--max-new-tokens", "0"]


def torchrun(*args):
    # one thread per process, so the two share the cores instead of fighting over them
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)


def val_losses(stdout):
    return {int(line.split()[1][:-1]): float(line.split("val loss ")[1].split(",")[0])
            for line in stdout.splitlines() if "val loss" in line}


def test_two_processes_train_on_shards_write_one_checkpoint_and_resume(tmp_path, capsys):
    """From a folder of token shards, HellaSwag scored at each evaluation: each process scores
    half of the examples and the printed score is that of the whole file."""
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000])
    prepare.prepare([str(text)], tmp_path / "shards", shard_tokens=50_000, progress=False)
    lines = [line for line in text.read_text().splitlines() if len(line) > 10]
    examples = tmp_path / "hellaswag.jsonl"
    examples.write_text("".join(json.dumps({"ctx": lines[i], "label": 0, "endings": [
        lines[i + 1], lines[i + 40], lines[i + 80], lines[i + 120]]}) + "\n"
                                for i in range(0, 420, 20)))
    out = tmp_path / "run"
    flags = [*TINY, "--data", str(tmp_path / "shards"), "--eval-interval", "10", "--lr", "1e-2",
             "--dtype", "float32", "--hellaswag", str(examples), "--out", str(out)]
    first = torchrun("06_train_for_real.py", *flags, "--max-iters", "20")
    assert first.returncode == 0, first.stderr
    assert "x 2 process(es) = 128 tokens per step" in first.stdout
    losses = val_losses(first.stdout)
    assert list(losses) == [0, 10, 20] and losses[20] < losses[0] - 0.3  # printed once, by rank 0
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "loss.png", "metrics.json"]
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 20 and len(checkpoint["rng_states"]) == 2
    # the 21 examples scored in one process
    capsys.readouterr()
    gpt.main(["--sample", "--hellaswag", str(examples), "--out", str(out)])
    alone = capsys.readouterr().out.splitlines()[-1].split(", hellaswag")[1]
    assert "hellaswag: 21 examples" in first.stdout
    assert [line for line in first.stdout.splitlines() if "step 20:" in line][0].split(
        ", hellaswag")[1].startswith(alone)

    resumed = torchrun("06_train_for_real.py", *flags, "--max-iters", "30", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 20" in resumed.stdout and list(val_losses(resumed.stdout)) == [30]


STEP_ARGS = types.SimpleNamespace(lr=1e-3, warmup_iters=0, max_iters=10, weight_decay=0.1,
                                  grad_clip=1.0, dtype="float32")


def tiny_model():
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32))


def step_on_each_rank(rank, x, y, store, saved):
    """One DDP step over Gloo on rank's half of the rows, in a process forked from the test's,
    which starts at once where a new interpreter takes seconds."""
    # a fork keeps none of the parent's OpenMP threads: with more than one, the first parallel
    # operation waits for them forever (when the tests run in one process, without xdist)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = tiny_model()
    half = len(x) // 2
    rows = slice(rank * half, (rank + 1) * half)
    gpt.train_step(DDP(model), gpt.configure_optimizer(model, STEP_ARGS), [(x[rows], y[rows])],
                   STEP_ARGS, 0, torch.amp.GradScaler(enabled=False))
    if rank == 0:
        torch.save(model.state_dict(), saved)
    dist.barrier()
    dist.destroy_process_group()


def test_one_step_on_two_processes_equals_one_step_on_their_rows_together(tmp_path):
    torch.manual_seed(1)
    x, y = torch.randint(65, (2, 8, 16))  # 8 rows: 4 for each process
    multiprocessing.start_processes(step_on_each_rank, nprocs=2, start_method="fork",
                                    args=(x, y, tmp_path / "store", tmp_path / "ddp.pt"))

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gpt.train_step(model, gpt.configure_optimizer(model, STEP_ARGS), [(x, y)], STEP_ARGS, 0,
                   torch.amp.GradScaler(enabled=False))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert not torch.equal(tensor, before[name])  # the step moved every parameter
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-5, atol=1e-6)
