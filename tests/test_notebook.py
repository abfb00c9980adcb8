"""Every stage is also a notebook: the same cells in every stage, and one stage, converted by
jupytext, runs from top to bottom in a real Jupyter kernel as the script does."""
import re

import pytest

from conftest import ALL_STAGES, ROOT, load_stage

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")


def cell_markers(name):
    return [line for line in (ROOT / f"{name}.py").read_text().splitlines()
            if line.startswith("# %%")]


def test_every_stage_has_the_same_cells():
    # hyperparameters, model, training, sampling, run (and its prose)
    assert len(cell_markers("01_bigram")) == 6
    assert all(cell_markers(name) == cell_markers("01_bigram") for name in ALL_STAGES)
    cells = jupytext.read(ROOT / "03_multi_head.py").cells
    # what is new
    assert cells[0].source.startswith('"""03_multi_head.py:') and "import torch" in cells[0].source
    assert [cell.cell_type for cell in cells] == ["code"] * 5 + ["markdown", "code"]


def losses(text):
    return re.findall(r"^step \d+: train loss \d\.\d{4}, val loss \d\.\d{4}", text, re.M)


def test_a_stage_runs_in_a_jupyter_kernel_as_it_runs_from_the_command_line(tmp_path, monkeypatch,
                                                                           capsys):
    notebook = jupytext.read(ROOT / "06_train_for_real.py")
    settings = next(cell for cell in notebook.cells if "RECIPES = {" in cell.source)
    recipe = '"cpu": dict(batch_size=64, max_iters=800, eval_interval=200, eval_iters=10,'
    assert recipe in settings.source
    # what a reader does in a notebook: change the hyperparameters in their cell, then run it all
    settings.source = settings.source.replace(
        recipe, '"cpu": dict(batch_size=64, max_iters=20, eval_interval=10, eval_iters=2,')
    # the kernel runs in tmp_path, and imports shared from here
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    printed = "".join(output.get("text", "") for output in outputs
                      if output.output_type == "stream")
    assert not [output for output in outputs if output.output_type == "error"]
    # loss.png, inline
    assert "image/png" in {kind for output in outputs for kind in output.get("data", {})}
    assert (tmp_path / "runs" / "06_train_for_real" / "ckpt.pt").exists()
    assert re.search(r"^-{30} top-p 0\.9 -+\n.{100}", printed, re.M | re.S)  # trained, then sampled

    # the script's main(), as its command line runs it, with those settings as flags (and
    # shorter samples: greedy's first 100 tokens are those of its 500)
    capsys.readouterr()
    load_stage("06_train_for_real").main(["--max-iters", "20", "--eval-interval", "10",
                                          "--eval-iters", "2", "--max-new-tokens", "100",
                                          "--out", str(tmp_path / "script")])
    script = capsys.readouterr().out
    assert len(losses(printed)) == 3 and losses(printed) == losses(script)
    greedy = script.split("-" * 30 + " greedy")[1].split("\n" + "-" * 30)[0]
    assert len(greedy) > 100 and greedy in printed.split("-" * 30 + " greedy")[1]
