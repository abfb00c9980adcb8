import contextlib
import fcntl
import importlib
import io
import itertools
import json
import os
import shutil
import types
from pathlib import Path

# pytest.ini runs the tests in as many processes as there are cores (pytest-xdist): one thread
# each, for them and for the processes they start, as more threads than cores only wait on
# each other (measured on 2 cores: 112 s so, 344 s with two threads a process)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402 (after the thread count, which torch reads when imported)
import torch  # noqa: E402

from shared import built_on_trunk, chain
from shared.cli import run
from shared.data import read_text
from shared.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["01_bigram", "02_single_head", "03_multi_head", "04_block"]  # built by build_model below
GPT_STAGES = ["05_gpt", "06_train_for_real", "07_modern", "08_chat", "09_lora", "10_dpo",
              "11_grpo"]
# the stages that train a model; then the one that serves a trained model and trains nothing
TRAINING = STAGES + GPT_STAGES
SERVING = ["12_serve"]
ALL_STAGES = TRAINING + SERVING
# 01 to 09, each whole, each the one before plus one idea; the stages after 09, which import it
CHAIN = chain()
ON_TRUNK = built_on_trunk()
# the stages that tune a trained model (post-training): on conversations, on preferences, then
# from rewards
POST_TRAINING = ["08_chat", "09_lora", "10_dpo", "11_grpo"]
PREFERENCES = ["10_dpo"]
REWARDS = ["11_grpo"]
# a few steps of any stage
QUICK = ["--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2", "--max-new-tokens", "0",
         "--seed", "0"]
# the GPT stages at a small batch, those that build their model at a small size too
SMALL_BATCH = ["--batch-size", "4", "--warmup-iters", "2"]
SMALL_GPT = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16"]


# The files that take longest run first, so that none of them is left to run alone on one core
# at the end (pytest.ini turns off xdist's own order, most tests first, which put them last)
SLOWEST_FILES = ["test_ddp.py", "test_site.py", "test_resume.py", "test_train_for_real.py",
                 "test_serve.py", "test_notebook.py", "test_report.py", "test_robustness.py",
                 "test_stages.py", "test_device.py", "test_dpo.py", "test_chat.py", "test_grpo.py",
                 "test_same_numbers.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)
    items.sort(key=rank)


@pytest.fixture(autouse=True)
def in_a_folder_of_its_own(tmp_path, monkeypatch):
    """Each test runs in a temporary folder of its own, so that what a stage writes by default
    (runs/<stage>) never lands in the checkout."""
    monkeypatch.chdir(tmp_path)


def quick_flags(name, out=None, base=None):
    """Flags for a quick run of stage name (writing into out, if given); a post-training stage
    tunes base, the folder of the base fixture, and stage 10 on the preference pairs there."""
    assert (base is not None) == (name in POST_TRAINING), "post-training stages need base"
    return [*QUICK, *(SMALL_BATCH if name in GPT_STAGES else []),
            *(SMALL_GPT if name in GPT_STAGES and name not in POST_TRAINING else []),
            *(["--init-from", str(base)] if base else []),
            *(["--data", str(Path(base) / PAIRS)] if name in PREFERENCES else []),
            *(["--out", str(out)] if out else [])]


def load_stage(name):
    return importlib.import_module(name)


def stage_error(capsys, main, *argv):
    """Run a stage's main() as its command line does: it must end with exit status 2
    and one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(lambda: main(list(argv)))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def build_model(stage, vocab_size, block_size=16, n_embd=24, n_head=3, n_layer=2, dropout=0.1):
    """A small model of the given stage, at other sizes than the defaults."""
    name = stage.__name__
    if name == "01_bigram":
        return stage.BigramLanguageModel(vocab_size, block_size)
    if name == "02_single_head":
        return stage.GPT(vocab_size, block_size, n_embd)
    if name == "03_multi_head":
        return stage.GPT(vocab_size, block_size, n_embd, n_head)
    if name == "04_block":
        return stage.GPT(vocab_size, block_size, n_embd, n_head, n_layer, dropout)
    # the GPT stages take a config
    return stage.GPT(stage.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer,
                                     n_head=n_head, n_embd=n_embd, dropout=dropout))


def attention_heads(stage, model):
    """Every single-head module of the model, where the stage has them."""
    return [m for m in model.modules() if type(m).__name__ == "Head"]


@pytest.fixture(scope="session")
def shakespeare():
    """The real Tiny Shakespeare text (downloaded and verified on first use)."""
    return read_text()


@pytest.fixture(scope="session")
def tokenizer(shakespeare):
    return CharTokenizer(shakespeare)


@pytest.fixture(params=CHAIN)
def stage(request):
    """Each stage that has a model, a training loop and samplers of its own: 01 to 09."""
    return load_stage(request.param)


def made_once(tmp_path_factory, name, make):
    """The folder name, made by make(folder) once for every test process, then only read: the
    processes of pytest-xdist share the folder that their temporary folders are in, and a lock
    there makes the others wait for the first."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.made").exists():
            with contextlib.redirect_stdout(io.StringIO()):
                make(root / name)
            (root / f"{name}.made").touch()
    return root / name


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """The folder of a quick run of stage 07 with a context that Shakespeare's short exchanges fit
    in: the trained model that the quick runs of 08 and 09 fine-tune. In its folder chat/, a
    quick run of 08 on it: the chat model that the quick runs of the stages built on 09 tune.
    Beside each, preference pairs for stage 10."""

    def make(out):
        load_stage("07_modern").main([*quick_flags("07_modern", out), "--block-size", "64"])
        load_stage("08_chat").main(quick_flags("08_chat", out / "chat", out))
        write_preferences(out / PAIRS)
        write_preferences(out / "chat" / PAIRS)

    return made_once(tmp_path_factory, "base", make)


@pytest.fixture(scope="session")
def backwards_base(base, tmp_path_factory):
    """Stage 08 fine-tuned for 200 steps on stage 11's task (a word written backwards, every train
    word with its answer), from the quick run of 07: a small chat model that solves about a third
    of the held-out words, so that RL on it has something to push up."""

    def make(out):
        task = load_stage("11_grpo").Backwards(types.SimpleNamespace(data=None))
        lines = [json.dumps({"messages": [*task.messages(word), {"role": "assistant",
                                                                 "content": task.answer(word)}]})
                 for word in task.train]
        out.mkdir()
        (out / "sft.jsonl").write_text("".join(line + "\n" for line in lines))
        load_stage("08_chat").main(["--init-from", str(base), "--data", str(out / "sft.jsonl"),
                                    "--out", str(out), "--max-iters", "200",
                                    "--eval-interval", "200", "--eval-iters", "2",
                                    "--max-new-tokens", "0", "--seed", "0", "--lr", "3e-3"])

    return made_once(tmp_path_factory, "backwards", make)


# beside the base: preference pairs for stage 10, so that its quick runs make none of their own
PAIRS = "preferences.jsonl"


def write_preferences(path, count=40):
    """count of Tiny Shakespeare's short exchanges as preference pairs in trl's format: the real
    reply chosen, the next exchange's reply rejected."""
    from shared.conversations import load_conversations
    train, _ = load_conversations()
    short = [c[:2] for c in train if len(c[0]["content"]) + len(c[1]["content"]) < 50][:count + 1]
    lines = [json.dumps({"prompt": [first[0]], "chosen": [first[1]], "rejected": [second[1]]})
             for first, second in itertools.pairwise(short)]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def stage_base(name, base):
    """The model a quick run of stage name tunes, from the base fixture's folder: the quick run of
    07 for 08 and 09, the chat model beside it for the stages built on 09, None for the stages
    that train their own; quick_flags' last argument."""
    if name in ON_TRUNK:
        return base / "chat"
    return base if name in POST_TRAINING else None


@pytest.fixture(scope="session")
def quick_runs(tmp_path_factory, base):
    """Every stage that trains, trained for a few steps as its command line runs it, each once for
    all the tests that look at a run: --out, --plot-attention from 02 on, 40 new tokens. The
    folder of the runs (a folder a stage), and what each printed."""
    root = tmp_path_factory.mktemp("runs")
    printed = {}
    for name in TRAINING:
        flags = [*quick_flags(name, root / name, stage_base(name, base)), "--max-new-tokens", "40"]
        if name != "01_bigram":
            flags.append("--plot-attention")
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            assert load_stage(name).main(flags) is None  # no signal stopped it
        printed[name] = stdout.getvalue()
    return root, printed


def fine_tune_then_sample(stage, folder, out, capsys, steps):
    """--init-from a save_pretrained folder: a few steps of fine-tuning, in which the val loss must
    fall, then samples from the checkpoint and from the folder itself. Returns the checkpoint."""
    stage.main(["--init-from", str(folder), "--block-size", "16", "--batch-size", "4",
                "--max-iters", str(steps), "--eval-interval", str(steps), "--eval-iters", "2",
                "--lr", "1e-3", "--max-new-tokens", "5", "--out", str(out)])
    losses = [float(line.split("val loss ")[1].split(",")[0])
              for line in capsys.readouterr().out.splitlines() if "val loss" in line]
    assert len(losses) == 2 and losses[1] < losses[0]
    stage.main(["--sample", "--out", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "5"])
    assert "ROMEO:" in capsys.readouterr().out
    stage.main(["--init-from", str(folder), "--sample", "--prompt", "Hello",
                "--max-new-tokens", "5", "--out", str(out)])
    assert "Hello" in capsys.readouterr().out
    return torch.load(Path(out) / "ckpt.pt", weights_only=True)


def assert_same_state(a, b, where="state"):
    """Two nested states (dicts, lists, tensors, numbers) equal exactly, tensor by tensor."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} against {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} against {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: {len(a)} items against {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: the tensors differ"
    else:
        assert a == b, f"{where}: {a!r} against {b!r}"


def altered_copy(folder, out, how):
    """A copy in out of the save_pretrained folder, its weights altered: one weight left out
    ("missing"), one more that no layer has ("unexpected"), or one cut to another shape
    ("reshaped"). transformers would load each with only a warning."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    weights = load_file(Path(out) / "model.safetensors")
    name = sorted(name for name in weights if name.endswith("proj.weight") or "c_attn" in name)[0]
    if how == "missing":
        del weights[name]
    elif how == "unexpected":
        weights["extra.weight"] = torch.zeros(3)
    else:
        weights[name] = weights[name][: weights[name].size(0) // 2].contiguous()
    save_file(weights, Path(out) / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def hf_model_folder(tmp_path_factory):
    """A GPT-2 with GPT-2's vocabulary but 2 layers of 32 channels and a 32-token context, every
    weight and bias random (so a missed transpose or bias shows), saved by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50_257, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(folder)
    return folder, model
