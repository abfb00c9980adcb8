"""Every stage is also a notebook: the same cells in every stage, and one stage, converted by
jupytext, runs from top to bottom in a real Jupyter kernel as the script does."""
import re

import pytest

from conftest import ALL_STAGES, CHAIN, ROOT, load_stage
from shared import cli
from shared import notebook as shared_notebook

jupytext = pytest.importorskip("jupytext")
pytest.importorskip("nbclient")


def cell_markers(name):
    return [line for line in (ROOT / f"{name}.py").read_text().splitlines()
            if line.startswith("# %%")]


def test_every_stage_has_the_same_cells():
    # what is new, imports, hyperparameters, model, training, sampling, run (and its prose); a
    # stage built on 09 has sections of its own idea in place of the model, training and sampling
    first = cell_markers("01_bigram")
    assert len(first) == 8
    assert all(cell_markers(name) == first for name in CHAIN)
    for name in ALL_STAGES:
        markers = cell_markers(name)
        # the hyperparameters' cell names one of the stage's own settings as its example; the
        # last two: how to run it, then the code that does (train, or serve)
        assert markers[:2] == first[:2] and markers[-2] == first[-2]
        assert markers[2].split(" (")[0] == first[2].split(" (")[0]
        cells = jupytext.read(ROOT / f"{name}.py").cells
        # the docstring, rendered as text
        assert cells[0].cell_type == "markdown" and cells[0].source.startswith(f"{name}.py: ")
        assert cells[0].source == load_stage(name).__doc__.strip()
        assert cells[1].source.startswith("import ")
        assert "notebook_flags = []" in cells[2].source
        code = len(markers) - 3
        assert [cell.cell_type for cell in cells] == ["markdown"] + ["code"] * code + ["markdown",
                                                                                     "code"]


def test_in_a_notebook_the_pictures_go_into_runs_and_show_inline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "in_notebook", lambda: True)
    args = cli.parse_args([], "01_bigram", None, {"lr": 0.1})
    assert args.out == "runs/01_bigram" and (tmp_path / "runs" / "01_bigram").is_dir()
    assert cli.parse_args(["--out", "mine"], "01_bigram", None, {"lr": 0.1}).out == "mine"
    monkeypatch.setattr(cli, "in_notebook", lambda: False)
    assert cli.parse_args([], "01_bigram", None, {"lr": 0.1}).out is None


def losses(text):
    return re.findall(r"^step \d+: train loss \d\.\d{4}, val loss \d\.\d{4}", text, re.M)


def test_a_stage_runs_in_a_jupyter_kernel_as_it_runs_from_the_command_line(tmp_path, monkeypatch,
                                                                           capsys):
    notebook = jupytext.read(ROOT / "06_train_for_real.py")
    settings = next(cell for cell in notebook.cells if "RECIPES = {" in cell.source)
    recipe = '"cpu": dict(batch_size=64, max_iters=800, eval_interval=200, eval_iters=10,'
    assert recipe in settings.source
    # what a reader does in a notebook: change the hyperparameters in their cell, flags that are
    # no hyperparameter in notebook_flags, then run it all
    settings.source = settings.source.replace(
        recipe, '"cpu": dict(batch_size=64, max_iters=6, eval_interval=3, eval_iters=2,')
    text = tmp_path / "some_shakespeare.txt"
    text.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:50_000])
    flags = ["--data", str(text), "--seed", "7", "--max-new-tokens", "40"]
    settings.source = settings.source.replace(
        "notebook_flags = []", f"notebook_flags = {[*flags, '--out', str(tmp_path / 'nb')]}")
    # the kernel runs in tmp_path, and imports shared from here
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    capsys.readouterr()
    shared_notebook.execute(notebook, tmp_path)
    # printed here as it came, and kept in the notebook
    as_it_came = capsys.readouterr().out
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    printed = "".join(output.get("text", "") for output in outputs
                      if output.output_type == "stream")
    assert not [output for output in outputs if output.output_type == "error"]
    # loss.png, inline
    assert "image/png" in {kind for output in outputs for kind in output.get("data", {})}
    assert (tmp_path / "nb" / "ckpt.pt").exists() and (tmp_path / "nb" / "loss.png").exists()
    assert not (tmp_path / "runs").exists()
    assert re.search(r"^-{30} top-p 0\.9 -+\n.{40}", printed, re.M | re.S)  # trained, then sampled

    # the script's main(), as its command line runs it, with those settings as flags
    capsys.readouterr()
    load_stage("06_train_for_real").main([*flags, "--max-iters", "6", "--eval-interval", "3",
                                          "--eval-iters", "2", "--out", str(tmp_path / "script")])
    script = capsys.readouterr().out
    assert len(losses(printed)) == 3 and losses(printed) == losses(script)
    assert losses(as_it_came) == losses(printed)
    greedy = script.split("-" * 30 + " greedy")[1].split("\n" + "-" * 30)[0]
    assert len(greedy) > 40 and greedy in printed.split("-" * 30 + " greedy")[1]


def test_the_notebook_command_refuses_what_it_cannot_run_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda: shared_notebook.main(["no_such_stage.py"]),
                prog="python -m shared.notebook")
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err == ("python -m shared.notebook: error: no_such_stage.py: "
                                             "no such file")


def test_a_stage_refused_in_the_kernel_stops_the_command_with_its_sentence(monkeypatch, capsys):
    """The flags after the script are the stage's (its notebook_flags); a refusal, which the
    kernel lives through, is the command's own: its sentence and status 2, and no notebook
    saved as if it had run."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    script = ROOT / "01_bigram.py"
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda: shared_notebook.main([str(script), "--max-iters", "0"]),
                prog="python -m shared.notebook")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1] == (
        f"python -m shared.notebook: error: {script} stopped in the kernel: argument --max-iters: "
        "must be above 0, got 0 (see --help)")
    assert not script.with_suffix(".ipynb").exists()
