"""The command line every stage shares, device selection, and writing a run's metrics."""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from shared import UserError

HELP = {
    "batch_size": "sequences per training step",
    "block_size": "context length: the most tokens the model looks back over",
    "max_iters": "training steps",
    "eval_interval": "steps between evaluations",
    "eval_iters": "batches averaged per loss estimate",
    "lr": "learning rate",
    "n_embd": "width of the embeddings and of the residual stream",
    "n_head": "attention heads per layer",
    "n_layer": "transformer blocks",
    "dropout": "dropout probability while training",
    "warmup_iters": "steps of linear learning-rate warm-up before the cosine decay",
    "weight_decay": "AdamW weight decay, applied to weight matrices only",
    "grad_clip": "clip the gradient norm to this",
    "grad_accum_steps": "batches whose gradients are summed per optimizer step",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, without argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def checked(name, kind):
    """An argparse type for a number flag, with the range that its name implies."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if name == "dropout":
            ok, rule = 0 <= value < 1, "at least 0 and below 1"
        elif name == "top_p":
            ok, rule = 0 < value <= 1, "above 0 and at most 1"
        elif name in ("seed", "max_new_tokens", "temperature", "warmup_iters", "weight_decay"):
            ok, rule = value >= 0, "0 or more"
        else:
            ok, rule = value > 0, "above 0"
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return convert


def parse_args(argv, description, hyperparameters, add_flags=None, has_attention=False):
    """Every hyperparameter of the stage becomes a flag (batch_size -> --batch-size), plus the
    flags all stages share, --plot-attention where the model has attention, and any flags that
    add_flags(parser) adds. Bad values stop the program with one sentence and status 2."""
    parser = _Parser(description=description, allow_abbrev=False,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, default in hyperparameters.items():
        parser.add_argument("--" + name.replace("_", "-"), type=checked(name, type(default)),
                            default=default, help=HELP.get(name, name), metavar=type(default).__name__.upper())
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto picks cuda, then mps, then cpu")
    parser.add_argument("--seed", type=checked("seed", int), default=1337, help="random seed")
    parser.add_argument("--data", metavar="FILE", help="train on this UTF-8 text file instead of Tiny Shakespeare")
    parser.add_argument("--max-new-tokens", type=checked("max_new_tokens", int), default=500,
                        help="length of the sample printed at the end")
    parser.add_argument("--out", metavar="DIR", help="write the run's metrics.json and loss.png into this folder")
    if has_attention:
        parser.add_argument("--plot-attention", action="store_true",
                            help="save the attention weights for the start of the val text as attention.png "
                                 "in --out (or here)")
    if add_flags:
        add_flags(parser)
    args = parser.parse_args(argv)
    if "n_head" in hyperparameters and args.n_embd % args.n_head:
        parser.error(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    return args


def select_device(name="auto"):
    """The fastest device present for 'auto'; the one asked for otherwise, if it is there."""
    has_mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch finds no CUDA GPU on this machine; use --device cpu")
    if name == "mps" and not has_mps:
        raise UserError("--device mps: PyTorch finds no Apple GPU (MPS) on this machine; use --device cpu")
    return torch.device(name)


def save_metrics(out_dir, metrics):
    """Write metrics.json, with the machine the run used, and the loss curves as loss.png into
    out_dir. The JSON is written atomically: a reader never sees half a file."""
    from shared.report import machine, plot_losses  # matplotlib only for runs that keep their metrics
    out_dir = Path(out_dir)
    metrics = {**metrics, "machine": machine(metrics["device"])}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(metrics, f, indent=2)
        os.replace(tmp, out_dir / "metrics.json")
        plot_losses(metrics, out_dir / "loss.png")
    except OSError as err:
        raise UserError(f"--out {out_dir}: cannot write the run's metrics ({err.strerror})") from None
    return out_dir / "metrics.json"


def run(main):
    """Call main(); a UserError becomes one line on stderr and exit status 2, Ctrl-C exit status 130."""
    try:
        main()
    except UserError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a Ctrl-C outside training, or a second one inside it
        print(f"\n{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        sys.exit(130)
