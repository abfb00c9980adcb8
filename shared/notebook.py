"""python -m shared.notebook: a stage run as a notebook, in a Jupyter kernel, printing what its
cells print as they print it; the notebook, its outputs in it, saved beside the script.

    python -m shared.notebook 03_multi_head.py   # then open 03_multi_head.ipynb to read it again
    python -m shared.notebook 11_grpo.py --overwrite

The stage's flags, after the script, go in its hyperparameters cell (notebook_flags), as a reader
of the notebook would put them there. A stage that refuses to run, in one sentence in the kernel,
makes the command stop with that sentence and status 2. Needs jupytext (the script as cells),
nbclient and ipykernel (the kernel), from requirements-dev.txt.
"""
import argparse
import sys
from pathlib import Path

from shared import UserError
from shared.cli import Parser, run


def client_class():
    """nbclient's NotebookClient, printing each stream output of a cell as it comes."""
    from nbclient import NotebookClient

    class Printing(NotebookClient):
        def output(self, outs, msg, display_id, cell_index):
            if msg["msg_type"] == "stream":
                stream = sys.stderr if msg["content"]["name"] == "stderr" else sys.stdout
                stream.write(msg["content"]["text"])
                stream.flush()
            return super().output(outs, msg, display_id, cell_index)

    return Printing


def execute(notebook, folder):
    """Run every cell of notebook (an nbformat notebook) in a python3 kernel working in folder,
    printing as it goes; the notebook keeps the outputs."""
    client_class()(notebook, kernel_name="python3", timeout=None,
                   resources={"metadata": {"path": str(folder)}}).execute()
    return notebook


def refusal(notebook):
    """The sentence a stage refused to run with, in the kernel (where run() prints it as "error:
    ..." on stderr, and the kernel lives on), or None."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("name") == "stderr":
                for line in output["text"].splitlines():
                    if line.startswith("error: "):
                        return line.removeprefix("error: ")
    return None


def main(argv=None):
    parser = Parser(prog="python -m shared.notebook", description=__doc__.split("\n\n")[0])
    parser.add_argument("script", help="a stage, such as 03_multi_head.py")
    parser.add_argument("flags", nargs=argparse.REMAINDER,
                        help="the stage's flags, which become its notebook_flags")
    args = parser.parse_args(argv)
    script = Path(args.script)
    if not script.is_file():
        raise UserError(f"{script}: no such file")
    try:
        import jupytext
    except ImportError:
        raise UserError("running a stage as a notebook needs jupytext, nbclient and ipykernel: "
                        "pip install -r requirements-dev.txt") from None
    notebook = jupytext.read(script)
    settings = next(cell for cell in notebook.cells if "notebook_flags = []" in cell.source)
    settings.source = settings.source.replace("notebook_flags = []",
                                              f"notebook_flags = {args.flags!r}")
    execute(notebook, Path.cwd())
    problem = refusal(notebook)
    if problem:
        raise UserError(f"{script} stopped in the kernel: {problem}")
    path = script.with_suffix(".ipynb")
    jupytext.write(notebook, path)
    print(f"the notebook, with what it printed and drew, is {path}")


if __name__ == "__main__":
    run(main, prog="python -m shared.notebook")
