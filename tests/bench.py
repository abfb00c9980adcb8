"""Stage 05's speed on this machine, in one run: training throughput of plain float32 against the
default path (--dtype auto), peak memory, generation with and without the KV cache, and the
validation loss the default run reaches by wall-clock time, next to a float32 run's.

Not a test (pytest does not collect it). Run it on an otherwise idle machine:

    python tests/bench.py          # about 5 minutes on 2 CPU cores

Each measurement runs in a process of its own, so that peak memory is that measurement's.
"""
import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(*args):
    """Run this script's --child mode in a fresh process and return what it prints (JSON)."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def peak_memory_mb(device):
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def measure_training(dtypes, rounds, steps=10):
    """Tokens per second of train_step for each dtype, on the default preset's model and batches,
    and the peak memory of it all. The dtypes take turns, a round of steps each, so that a slow
    spell of the machine hits them alike; each keeps its best round, since other programs only
    ever slow a round down."""
    import torch
    sys.path.insert(0, str(ROOT))
    gpt = __import__("06_train_for_real")  # 05's model and recipe, with its step as a function
    from shared.data import get_batch, load_dataset
    from shared.device import select_device
    device = select_device("auto")
    preset = "cpu" if device.type == "cpu" else "shakespeare"
    defaults = gpt.flag_defaults(preset)
    tokenizer, train_data, _ = load_dataset(None, defaults["block_size"])
    runs = {}
    for dtype in dtypes:
        args = types.SimpleNamespace(**defaults, dtype=gpt.resolve_dtype(dtype, device))
        torch.manual_seed(1337)
        model = gpt.GPT(dataclasses.replace(gpt.PRESETS[preset], vocab_size=tokenizer.vocab_size)).to(device)
        runs[dtype] = dict(args=args, model=model, optimizer=gpt.configure_optimizer(model, args), step=0,
                           scaler=torch.amp.GradScaler(enabled=False), best=float("inf"))
    for round_ in range(rounds + 1):  # round 0 warms up
        for run in runs.values():
            args, start = run["args"], time.time()
            for _ in range(steps):
                batch = get_batch(train_data, args.batch_size, args.block_size, device)
                gpt.train_step(run["model"], run["optimizer"], [batch], args, run["step"], run["scaler"])
                run["step"] += 1
            if round_:
                run["best"] = min(run["best"], (time.time() - start) / steps)
    return {"preset": preset, "peak_memory_mb": peak_memory_mb(device), **{
        dtype: {"dtype": run["args"].dtype, "tokens_per_second": defaults["batch_size"] * defaults["block_size"]
                / run["best"]} for dtype, run in runs.items()}}


def measure_generation(new_tokens=500, rounds=3):
    """Tokens per second of generate() with the shakespeare preset, with and without the cache:
    the two take turns, and each keeps its best round."""
    import torch
    sys.path.insert(0, str(ROOT))
    gpt = __import__("05_gpt")
    from shared.device import select_device
    device = select_device("auto")
    torch.manual_seed(1337)
    model = gpt.GPT(dataclasses.replace(gpt.PRESETS["shakespeare"], vocab_size=65)).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)  # speed doesn't depend on the weights
    best = {"cached": 0.0, "uncached": 0.0}
    for use_cache in (True, False):
        gpt.generate(model, prompt, 20, use_cache=use_cache)  # warm-up
    for _ in range(rounds):
        for use_cache in (True, False):
            start = time.time()
            gpt.generate(model, prompt, new_tokens, use_cache=use_cache).tolist()
            name = "cached" if use_cache else "uncached"
            best[name] = max(best[name], new_tokens / (time.time() - start))
    return best


def default_run(*flags):
    """05_gpt.py with its defaults (plus flags): its loss history, and the command's wall time."""
    with tempfile.TemporaryDirectory() as out:
        start = time.time()
        subprocess.run([sys.executable, "05_gpt.py", "--max-new-tokens", "0", "--out", out, *flags], cwd=ROOT,
                       check=True, capture_output=True)
        wall = time.time() - start
        return json.loads((Path(out) / "metrics.json").read_text()), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *dtypes = args.child
        if kind == "speed":
            print(json.dumps(measure_training(dtypes, rounds=8)))
        elif kind == "memory":  # one dtype alone in its process
            print(json.dumps(measure_training(dtypes, rounds=1)))
        else:
            print(json.dumps(measure_generation()))
        return

    import torch
    sys.path.insert(0, str(ROOT))
    from shared.device import machine
    print(f"machine: {machine('cpu')}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
          f"Python {platform.python_version()}, PyTorch {torch.__version__}\n")

    speed = child("speed", "float32", "auto")
    fp32, default = speed["float32"], speed["auto"]
    memory = {dtype: child("memory", dtype)["peak_memory_mb"] for dtype in ("float32", "auto")}
    print(f"training, preset {speed['preset']} | tokens/s | peak memory")
    print(f"  float32 eager             | {fp32['tokens_per_second']:9,.0f} | {memory['float32']:,.0f} MB")
    print(f"  {'default path (' + default['dtype'] + ')':<26}| {default['tokens_per_second']:9,.0f} | "
          f"{memory['auto']:,.0f} MB")
    print(f"  ratio                     | {default['tokens_per_second'] / fp32['tokens_per_second']:8.2f}x\n")

    gen = child("generate")
    print("generation, shakespeare preset, 500 new tokens | tokens/s")
    print(f"  without KV cache | {gen['uncached']:7,.0f}")
    print(f"  with KV cache    | {gen['cached']:7,.0f}")
    print(f"  ratio            | {gen['cached'] / gen['uncached']:6.2f}x\n")

    runs = {"default": default_run(), "float32": default_run("--dtype", "float32")}
    print("python 05_gpt.py: validation loss by step (default path against --dtype float32)")
    print("   step | default: s   val  | float32: s   val")
    for a, b in zip(runs["default"][0]["history"], runs["float32"][0]["history"], strict=True):
        print(f"  {a['step']:5} | {a['seconds']:8.0f} {a['val']:.4f} | {b['seconds']:8.0f} {b['val']:.4f}")
    print("\nbest validation loss reached by wall-clock time (training seconds)")
    print("  seconds | default | float32")
    for limit in (30, 60, 90, 120):
        best = [min((h["val"] for h in run[0]["history"] if h["seconds"] <= limit), default=float("nan"))
                for run in runs.values()]
        print(f"  {limit:7} | {best[0]:7.4f} | {best[1]:7.4f}")
    print(f"\nwhole command, startup and evaluations included: default {runs['default'][1]:.0f} s, "
          f"float32 {runs['float32'][1]:.0f} s")


if __name__ == "__main__":
    main()
