"""The command line every stage shares: its flags, their checks, and one sentence
for every error."""
import argparse
import math
import os
import signal
import sys
from pathlib import Path

from shared import UserError

try:
    import fcntl
except ImportError:  # Windows: no locks, and no refusal of a second run
    fcntl = None

HELP = {
    "batch_size": "sequences per training step",
    "block_size": "context length: the most tokens the model looks back over",
    "max_iters": "training steps",
    "eval_interval": "steps between evaluations",
    "eval_iters": "batches averaged per loss estimate",
    "lr": "learning rate",
    "n_embd": "width of the embeddings and of the residual stream",
    "n_head": "attention heads per layer",
    "n_kv_head": "key/value heads per layer, each serving n_head / n_kv_head query heads",
    "n_layer": "transformer blocks",
    "dropout": "dropout probability while training",
    "warmup_iters": "steps of linear learning-rate warm-up before it decays",
    "weight_decay": "weight decay, applied to weight matrices only",
    "grad_clip": "clip the gradient norm to this",
    "grad_accum_steps": "batches whose gradients are summed per optimizer step",
}
NONNEGATIVE = {"seed", "max_new_tokens", "temperature", "warmup_iters", "weight_decay",
               "lora_rank", "sft_weight", "kl_beta"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, without argparse's usage block
        if in_notebook():
            # in a kernel, which lives on: the line, as any refusal says it there
            raise UserError(f"{message} (see --help)")
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" after a flag that has no default
        return (action.help if action.default is None or action.default is False
                else super()._get_help_string(action))


def checked(name, kind):
    """An argparse type for a number flag, with the range that its name implies."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if name in ("dropout", "lora_dropout"):
            ok, rule = 0 <= value < 1, "at least 0 and below 1"
        elif name == "top_p":
            ok, rule = 0 < value <= 1, "above 0 and at most 1"
        elif name == "port":
            ok, rule = 0 < value < 2**16, "from 1 to 65535"
        elif name == "seed":
            # room for seed + rank
            ok, rule = 0 <= value < 2**63 - 2**16, "0 or more and below 2**63"
        elif name in NONNEGATIVE:
            ok, rule = value >= 0, "0 or more"
        else:
            ok, rule = value > 0, "above 0"
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return convert


def nonempty(name):
    """An argparse type for a text flag: not empty, and valid UTF-8 (a shell can pass any bytes)."""
    def convert(text):
        if not text:
            raise argparse.ArgumentTypeError(f"expected {name}, got an empty string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8 text") from None
        return text
    return convert


# the folders check_out made, which run() removes again if the run left nothing in them
made_folders = []


def check_out(parser, out):
    """--out is made now, before any training, so that a folder it can't write in is found out
    before the run, not after it."""
    try:
        made_folders.extend(p for p in [Path(out), *Path(out).parents] if not p.exists())
        Path(out).mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except FileExistsError:
        parser.error(f"--out {out} is a file, not a folder")
    except OSError as err:
        parser.error(f"--out {out}: cannot write there ({err.strerror or err})")


def in_notebook():
    """True when a Jupyter kernel (Jupyter, VS Code, Colab) runs the code rather than `python
    script.py`: the command line is then the kernel's own, not flags for us."""
    return Path(sys.argv[0]).name.endswith("kernel_launcher.py")


def parse_args(argv, stage, doc, hyperparameters, add_flags=None, has_attention=False,
               data_help="train on this UTF-8 text file instead of Tiny Shakespeare", helps=None,
               outputs=True):
    """Every hyperparameter of the stage becomes a flag (batch_size -> --batch-size, told by
    helps[name] if the stage says what it is, else by HELP), plus the flags all stages share,
    --plot-attention where the model has attention, and any flags that add_flags(parser) adds
    (a stage that reads no data has no --data, data_help None, one that writes no run no --out); a
    flag added again replaces the first (a stage that builds on another tells one of its flags
    anew). --help tells the first paragraph of the stage's docstring, doc. Bad values stop the
    program with one sentence and status 2. In a notebook, argv is the notebook_flags of the
    hyperparameters cell, over its defaults, and --out defaults to runs/<stage>, so that the
    pictures are drawn and shown."""
    parser = Parser(description=(doc or stage).split("\n\n")[0], allow_abbrev=False,
                    formatter_class=HelpFormatter, conflict_handler="resolve")
    for name, default in hyperparameters.items():
        parser.add_argument("--" + name.replace("_", "-"), type=checked(name, type(default)),
                            default=default, help={**HELP, **(helps or {})}.get(name, name),
                            metavar=type(default).__name__.upper())
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto picks cuda, then mps, then cpu")
    parser.add_argument("--seed", type=checked("seed", int), default=1337, help="random seed")
    if data_help:
        parser.add_argument("--data", metavar="FILE", help=data_help)
    parser.add_argument("--max-new-tokens", type=checked("max_new_tokens", int), default=500,
                        metavar="INT", help="the most new tokens of each sample printed at the "
                        "end")
    if outputs:
        parser.add_argument("--out", type=nonempty("a folder"), metavar="DIR",
                            help="write the run's metrics.json and loss.png into this folder")
    if has_attention:
        parser.add_argument("--plot-attention", action="store_true",
                            help="save the attention weights for the start of the val text as "
                                 "attention.png in --out (or here)")
    if in_notebook() and outputs:
        parser.set_defaults(out=f"runs/{stage}")
    if add_flags:
        add_flags(parser)
    args = parser.parse_args(command_line(argv))
    if "n_head" in hyperparameters and args.n_embd % args.n_head:
        parser.error(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    if "n_kv_head" in hyperparameters and args.n_head % args.n_kv_head:
        parser.error(f"--n-head {args.n_head} must be divisible by --n-kv-head {args.n_kv_head}")
    # RoPE turns channels in pairs
    if "n_kv_head" in hyperparameters and args.n_embd // args.n_head % 2:
        parser.error(f"--n-embd {args.n_embd} / --n-head {args.n_head} gives heads of "
                     f"{args.n_embd // args.n_head} channels, an odd number: "
                     "rotary positions turn channels in pairs")
    if outputs and args.out:
        check_out(parser, args.out)
    return args


def command_line(argv):
    """The flags to parse: argv, or when it is None the process's own (none in a notebook, whose
    kernel has a command line of its own)."""
    if argv is None:
        return [] if in_notebook() else sys.argv[1:]
    return argv


def given(argv, flag):
    """Whether the command line sets flag itself, rather than leaving it to its default."""
    return any(arg == flag or arg.startswith(flag + "=") for arg in command_line(argv))


# the --out folders this process trains into, each held open and locked until it exits
held_folders = {}


def hold_out(out):
    """Claim --out for this run's checkpoint and metrics: a second run into the same folder, while
    this one lives, is refused in one sentence instead of overwriting them. The claim is a lock
    on a file there (out/.lock) that the operating system lets go of when the process ends, so a
    folder left by a killed run is free at once. Under torchrun, rank 0 holds it for all."""
    path = Path(out).resolve()
    if path in held_folders or int(os.environ.get("RANK", 0)) > 0 or fcntl is None:
        return
    lock = open(path / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"--out {out} is in use by another run, which trains into it now; wait "
                        "for it to end, or give another --out") from None
    held_folders[path] = lock


def out_of_memory(err):
    """Whether err is an allocator's refusal: PyTorch's on a GPU or a CPU, or Python's own."""
    if isinstance(err, MemoryError):
        return True
    message = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in message
                                              or "can't allocate memory" in message
                                              or "not enough memory" in message)


def let_go_of_folders():
    """The --out folders this run held (hold_out), free again, their lock files gone."""
    for path, lock in held_folders.items():
        (path / ".lock").unlink(missing_ok=True)
        lock.close()
    held_folders.clear()


def remove_empty_folders():
    """A run that failed before it wrote anything (--sample --out a folder with no checkpoint)
    leaves no empty folder behind: of those check_out made, the empty ones go, deepest first."""
    for folder in made_folders:
        try:
            folder.rmdir()
        except OSError:
            # it holds what the run wrote, or was never made
            pass
    made_folders.clear()


def run(main, notebook_flags=(), prog=None):
    """Call main(), or in a notebook main(notebook_flags); a UserError becomes one line on
    stderr and exit status 2, so does running out of memory. A run that Ctrl-C cut short ends
    with status 130 once it has done what it does on the way out (save, sample), as does one
    main() says a signal stopped (128 + that signal's number: 143 for SIGTERM). In a notebook
    the line is printed and the kernel lives on. The errors sign with prog, by default the
    script's name."""
    prog = "" if in_notebook() else f"{prog or Path(sys.argv[0]).name}: "
    interrupted = []

    def on_ctrl_c(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        stopped_by = main(list(notebook_flags)) if in_notebook() else main()
        status = 0
        if stopped_by:
            status = 128 + stopped_by
        elif interrupted:
            status = 130
    except UserError as err:
        print(f"{prog}error: {err}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:  # a Ctrl-C outside training, or a second one inside it
        print(f"\n{prog}interrupted", file=sys.stderr)
        status = 130
    except BrokenPipeError:
        # the reader of the output left (python 01_bigram.py | head): stop quietly, as commands
        # in a pipe do, with what is still to be flushed sent nowhere; 141 is 128 + SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 141
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err):
            raise
        print(f"{prog}error: ran out of memory ({str(err).splitlines()[0][:120]}); "
              "lower --batch-size or --block-size, or the model's size", file=sys.stderr)
        status = 2
    finally:
        signal.signal(signal.SIGINT, previous)
        let_go_of_folders()
        remove_empty_folders()
    if status and not in_notebook():
        sys.exit(status)
