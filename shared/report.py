"""What a run leaves behind and the report made of runs: metrics.json, loss curves, attention
maps, and a table and a figure of several runs.

    python -m shared.report runs/  # every runs/*/metrics.json -> runs/report.md, runs/report.png

Only here is matplotlib imported, and only when a picture is drawn, so a run without --out never
pays for it. In a notebook every picture is also shown below the cell that drew it.
"""
import json
from pathlib import Path

import torch

from shared import UserError, atomic_write, description, duration, stages
from shared.cli import Parser, in_notebook, run
from shared.device import machine

# What metrics.json holds. Every stage writes exactly these fields (a test checks it).
METRICS_FIELDS = {
    "stage": "the script's name, such as 03_multi_head",
    "config": "every flag of the run, defaults included",
    "parameters": "the model's parameter count",
    "tokenizer": "the tokenizer's identity: its kind and its characters, or its tiktoken name",
    "vocab_size": "tokens in the vocabulary",
    "device": "cpu, cuda or mps",
    "machine": "the processor or GPU, and the CPU threads PyTorch used",
    "history": "one entry per evaluation: step, seconds since training began (a resumed run "
               "goes on from its checkpoint's), train and val loss",
    "tokens_per_second": "training tokens per second, evaluation excluded",
    "train_loss": "the last evaluation's train loss",
    "val_loss": "the last evaluation's val loss",
    "val_bpc": "the last val loss in bits per character, comparable across tokenizers (null for "
               "a loss that has none, DPO's)",
}


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no window: works on a server or in CI
    import matplotlib.pyplot as plt
    return plt


def save_metrics(out_dir, metrics):
    """Write metrics.json, with the machine the run used, and the loss curves as loss.png into
    out_dir. The JSON is written atomically: a reader never sees half a file."""
    out_dir = Path(out_dir)
    metrics = {**metrics, "machine": machine(metrics["device"])}
    path = out_dir / "metrics.json"
    try:
        with atomic_write(path, "w") as f:
            json.dump(metrics, f, indent=2)
        plot_losses(metrics, out_dir / "loss.png")
    except OSError as err:
        raise UserError(f"--out {out_dir}: cannot write the run's metrics "
                        f"({err.strerror or err})") from None
    return path


def show(path):
    """In a notebook, the picture at path below the cell; elsewhere nothing (it is in the file)."""
    if in_notebook():
        from IPython.display import Image, display
        display(Image(filename=str(path)))


# what a preference stage logs besides its loss, as trl logs it
PREFERENCE_STATISTICS = {"chosen": "reward of chosen", "rejected": "reward of rejected",
                         "margin": "margin", "accuracy": "accuracy"}


def plot_losses(metrics, path):
    """loss.png: the train and val loss of one run against the training step; beside them, where
    the history has them, the val rewards of the chosen and rejected replies, their margin and
    how often the chosen one is ahead (DPO), or pass@1 and pass@G on val problems (GRPO)."""
    plt = pyplot()
    history = metrics["history"]
    steps = [h["step"] for h in history]
    preferences = "val_margin" in history[-1]
    rewards = "val_pass@1" in history[-1]
    fig, axes = plt.subplots(1, 2 if preferences or rewards else 1,
                             figsize=(11 if preferences or rewards else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [h["train"] for h in history], "o-", label="train")
    ax.plot(steps, [h["val"] for h in history], "o-", label="val")
    unit = "" if preferences else " (nats per token)"
    ax.set(xlabel="step", ylabel=f"loss{unit}",
           title=f"{metrics['stage']}: val loss {metrics['val_loss']:.3f} after {steps[-1]} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    if preferences:
        ax = axes[0][1]
        for key, label in PREFERENCE_STATISTICS.items():
            ax.plot(steps, [h[f"val_{key}"] for h in history], "o-", label=label)
        ax.set(xlabel="step", title="val pairs: rewards (beta x log-probability gained)")
        ax.grid(alpha=0.3)
        ax.legend()
    if rewards:
        ax = axes[0][1]
        for key in [key for key in history[-1] if key.startswith("val_pass@")]:
            ax.plot(steps, [h[key] for h in history], "o-", label=key.removeprefix("val_"))
        ax.set(xlabel="step", ylim=(0, 1), title="val problems: the share solved")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    show(path)


@torch.no_grad()
def attention_maps(model, idx):
    """The attention weights of every layer and head for one sequence idx of shape (1, T), as a
    list of layers, each a (heads, T, T) tensor. Any module with an attention_weights(x) method
    counts; in stages 02-04 that is each Head, gathered into a layer by the MultiHeadAttention
    (".heads.") that holds it, in stage 05 each layer's CausalSelfAttention, all heads at once."""
    inputs = {}

    def keep_input(name):
        def hook(module, args, output):
            inputs[name] = args[0]  # returns None, so the output goes on unchanged
        return hook

    hooks = [module.register_forward_hook(keep_input(name))
             for name, module in model.named_modules() if hasattr(module, "attention_weights")]
    was_training = model.training
    try:
        model.eval()(idx)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    layers = {}
    for name, x in inputs.items():
        weights = model.get_submodule(name).attention_weights(x)[0].float()  # ([heads,] T, T)
        layers.setdefault(name.split(".heads.")[0], []).append(
            weights.view(-1, *weights.shape[-2:]))
    return [torch.cat(heads) for heads in layers.values()]


def token_labels(tokenizer, ids):
    """Each token as it reads, with the invisible characters made visible."""
    return [tokenizer.decode([i]).replace("\n", "\\n").replace(" ", "␣") for i in ids]


def plot_attention(model, tokenizer, ids, out_dir):
    """attention.png in out_dir: one heatmap per head (a row of them per layer) of how much each
    token of the prompt ids, a 1-D tensor, takes from each earlier one; rows are queries, columns
    keys."""
    idx = ids[None, :model.block_size].to(next(model.parameters()).device)  # (1, T)
    layers = attention_maps(model, idx)
    labels = token_labels(tokenizer, idx[0].tolist())
    n_rows, n_cols, T = len(layers), max(len(heads) for heads in layers), idx.size(1)
    plt = pyplot()
    from matplotlib.colors import PowerNorm
    side = max(1.6, min(3.2, 12 / n_cols))  # inches per panel: a 12-head layer still fits a page
    # one label per token, as large as the panel allows
    fontsize = max(3.0, min(8.0, 50 * side / T))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(side * n_cols + 1, side * n_rows + 0.6),
                             squeeze=False, layout="constrained")
    for row, heads in enumerate(layers):
        for col in range(n_cols):
            ax = axes[row][col]
            if col >= len(heads):
                ax.axis("off")
                continue
            # a square-root colour scale, so the small weights spread over many tokens still show
            image = ax.imshow(heads[col].cpu().numpy(), cmap="viridis",
                              norm=PowerNorm(0.5, vmin=0, vmax=1))
            ax.set_title(f"layer {row + 1}, head {col + 1}" if n_rows > 1 else f"head {col + 1}",
                         fontsize=8)
            ax.set_xticks(range(T), labels if row == n_rows - 1 else [], rotation=90,
                          fontsize=fontsize)
            ax.set_yticks(range(T), labels if col == 0 else [], fontsize=fontsize)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle("row t: how much position t takes from each position 0..t "
                 "(queries down, keys across)", fontsize=9)
    path = Path(out_dir) / "attention.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror})") from None
    finally:
        plt.close(fig)
    print(f"attention maps written to {path}")
    show(path)
    return path


# ----------------------------------------------------------------------------- the report

def read_runs(folders):
    """The metrics of every run in the folders given (each folder is a run, or holds runs), each
    with "run", the name of its folder."""
    runs = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder; give a run's --out folder, "
                            "or a folder of them")
        paths = ([folder / "metrics.json"] if (folder / "metrics.json").is_file()
                 else sorted(folder.glob("*/metrics.json")))
        if not paths:
            raise UserError(f"{folder} holds no metrics.json; "
                            f"run a stage with --out {folder}/NAME first")
        for path in paths:
            try:
                metrics = json.loads(path.read_text())
                missing = set(METRICS_FIELDS) - set(metrics)
            except (OSError, ValueError, TypeError):
                raise UserError(f"{path} is not a metrics.json written by a stage") from None
            if missing:
                raise UserError(f"{path} lacks {', '.join(sorted(missing))}; run its stage again")
            runs.append({"run": path.resolve().parent.name, **metrics})
    return sorted(runs, key=lambda m: (m["stage"], m["run"]))


def settings(run):
    """A run's settings to compare it by: every flag but where it wrote, as a reader would name
    them (the text by its file's name), and its tokenizer."""
    config = {k: v for k, v in run["config"].items() if k != "out"}
    if "data" in config:
        config["data"] = Path(config["data"]).name if config["data"] else "Tiny Shakespeare"
    tokenizer = run["tokenizer"].get("name", run["tokenizer"]["kind"])
    return {**config, "tokenizer": tokenizer}


def differences(runs):
    """For each run, the settings in which it differs from another run of the same stage, as
    text (`tokenizer gpt2, preset shakespeare`); empty for a stage run once."""
    texts = []
    for this in runs:
        others = [settings(o) for o in runs if o["stage"] == this["stage"] and o is not this]
        mine = settings(this)
        differing = [k for k in mine if any(o.get(k) != mine[k] for o in others)]
        # a flag left unset reads "no init-from", not "init-from None"
        texts.append(", ".join(f"{k.replace('_', '-')} {mine[k]}" if mine[k] is not None
                               else f"no {k.replace('_', '-')}" for k in differing))
    return texts


def bits_per_character(metrics):
    """A run's last val loss in bits per character, or a dash where it has none (DPO's)."""
    return "–" if metrics["val_bpc"] is None else f"{metrics['val_bpc']:.3f}"


def table(runs):
    """The runs as a Markdown table, one row each, named by the run's folder, with what its stage
    adds (the first line of the stage's docstring)."""
    adds = {stage: description(stage) for stage in stages()}
    lines = ["| run | stage | what it adds | settings that differ | parameters | val loss "
             "| bits/char | wall time | machine |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for m, differing in zip(runs, differences(runs), strict=True):
        lines.append(f"| {m['run']} | {m['stage']} | {adds.get(m['stage'], '')} | "
                     f"{differing} | {m['parameters']:,} | {m['val_loss']:.4f} | "
                     f"{bits_per_character(m)} | {duration(m['history'][-1]['seconds'])} | "
                     f"{m['machine']} |")
    return "\n".join(lines) + "\n"


def plot_progression(runs, path):
    """Every run's val loss against wall time and against step, one line per run."""
    plt = pyplot()
    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for m in runs:
        history = m["history"]
        val = [h["val"] for h in history]
        by_time.plot([h["seconds"] for h in history], val, "o-", markersize=3, label=m["run"])
        by_step.plot([h["step"] for h in history], val, "o-", markersize=3, label=m["run"])
    by_time.set(xlabel="wall time (s), evaluation included", ylabel="val loss (nats per token)")
    by_step.set(xlabel="training step")
    for ax in (by_time, by_step):
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.suptitle("validation loss, run by run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = Parser(prog="python -m shared.report",
                    description="A Markdown table and a figure of the val loss of every run "
                                "found in the folders given.")
    parser.add_argument("folders", nargs="+", metavar="DIR",
                        help="a run's --out folder, or a folder of them")
    parser.add_argument("--out", metavar="DIR", help="where report.md and report.png go "
                        "(default: the first folder given)")
    args = parser.parse_args(argv)
    runs = read_runs(args.folders)
    out = Path(args.out or args.folders[0])
    markdown = table(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(markdown)
        plot_progression(runs, out / "report.png")
    except OSError as err:
        raise UserError(f"cannot write the report into {out} ({err.strerror})") from None
    print(markdown)
    print(f"table in {out / 'report.md'}, figure in {out / 'report.png'}")


if __name__ == "__main__":
    run(main, prog="python -m shared.report")
