"""python -m shared.notebook: a stage run as a notebook, in a Jupyter kernel, printing what its
cells print as they print it; the notebook, its outputs in it, saved beside the script.

    python -m shared.notebook 03_multi_head.py   # then open 03_multi_head.ipynb to read it again

The stage's flags go in its hyperparameters cell (notebook_flags), as in any notebook. Needs
jupytext (the script as cells), nbclient and ipykernel (the kernel), from requirements-dev.txt.
"""
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


def main(argv=None):
    parser = Parser(prog="python -m shared.notebook", description=__doc__.split("\n\n")[0])
    parser.add_argument("script", help="a stage, such as 03_multi_head.py")
    args = parser.parse_args(argv)
    script = Path(args.script)
    if not script.is_file():
        raise UserError(f"{script}: no such file")
    try:
        import jupytext
    except ImportError:
        raise UserError("running a stage as a notebook needs jupytext, nbclient and ipykernel: "
                        "pip install -r requirements-dev.txt") from None
    notebook = execute(jupytext.read(script), Path.cwd())
    path = script.with_suffix(".ipynb")
    jupytext.write(notebook, path)
    print(f"the notebook, with what it printed and drew, is {path}")


if __name__ == "__main__":
    run(main, prog="python -m shared.notebook")
