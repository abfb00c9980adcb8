"""What every stage script needs and none of them teaches: the text and its batches (data), the
tokenizers (tokenizer), conversations and chat templates (conversations), token shards of a large
corpus (shards, written by prepare), Hugging Face loading and export (hub), the command line
(cli), the device and its memory (device), HellaSwag (hellaswag), metrics and pictures (report),
and the side-by-side site (site). Here: the stages and their descriptions, and what the modules
share (UserError, atomic_write, sha256).

The models, their training loops and their samplers live in the numbered scripts. From 01 to 09
(the trunk) they are repeated on purpose, so that each stage reads on its own and diffs cleanly
against the one before; a stage after 09 imports them from 09 and holds only its own idea.
"""
import ast
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

# the project's folder: the stage scripts, data/, docs/
ROOT = Path(__file__).resolve().parent.parent
# the last stage of the chain in which each is the one before plus one idea; the stages after it
# build on it by importing it
TRUNK = "09_lora"


def stages():
    """The numbered stage scripts' names, in order: 01_bigram, 02_single_head, ..."""
    return sorted(path.stem for path in ROOT.glob("[0-9][0-9]_*.py"))


def chain():
    """The stages from 01_bigram to TRUNK, each whole, each read as its diff from the one before."""
    return [name for name in stages() if name <= TRUNK]


def built_on_trunk():
    """The stages that import TRUNK and hold only their own idea, each read whole: 10_dpo, ..."""
    return [name for name in stages() if name > TRUNK]


def description(stage):
    """What the stage adds, in one line: the first line of its docstring after "NN_name.py: ",
    without the full stop. Read from the file, not imported (which would import torch). The
    README's table of the stages, the site and the report all show this line."""
    source = (ROOT / f"{stage}.py").read_text(encoding="utf-8")
    first = (ast.get_docstring(ast.parse(source)) or "").split("\n")[0]
    return first.removeprefix(f"{stage}.py: ").removesuffix(".")


def duration(seconds):
    """seconds as h:mm:ss, rounded to the second before it is split: 3599.6 s is 1:00:00, never
    0:59:60. Every time a stage or the report prints is written so."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02}:{seconds % 60:02}"


class UserError(Exception):
    """A problem with the user's input or machine, told as one sentence instead of a traceback."""


@contextmanager
def atomic_write(path, mode="wb"):
    """A file to write path's new content into: a temporary file beside path that, once the block
    ends without an error, is flushed to the disk and renamed to path in one step. A reader, or a
    crash, sees the old file or the new one, never half of one; on an error the old one stays.
    The temporary file's name carries the writer's process id (ckpt.pt.<pid>.<random>.tmp), so
    that a later run can tell the leftover of a killed writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporary_files(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        # mkstemp makes the file its owner's alone; give it the permissions of any new file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporary_files(path):
    """Delete the temporary files of path that a killed writer left behind: those whose process
    is gone. A process that is still running (another run writing there) keeps its own."""
    path = Path(path)
    for tmp in path.parent.glob(f"{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 1:].split(".")[0]
        if pid.isdigit() and not process_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def process_exists(pid):
    if os.name == "nt":  # Windows has no signal 0; keep the file rather than guess
        return True
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's
        return True
    return True


def sha256(path):
    """The file's SHA-256, read a block at a time: a shard of any size takes no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**24):
            digest.update(block)
    return digest.hexdigest()
