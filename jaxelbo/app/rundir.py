"""The output folder of a training run: checked before use, locked while in use.

* :func:`check_writable` says, without creating anything, whether ``--out`` can hold a
  run (it is not a file, and it or its nearest existing parent is writable).
* :class:`RunLock` takes an exclusive ``fcntl.flock`` on ``OUT/.lock`` before anything
  else in the folder is touched; a second run on the same folder is refused at once
  and changes nothing. The lock dies with its process, so a killed run never leaves
  a stale lock behind.
* :func:`prepare` then refuses a fresh run into a folder holding another run's files
  unless it is a resume or ``overwrite`` is set (which removes those files first, and
  only those: in ``checkpoints/`` only the checkpoint folders), and a fresh run into a
  non-empty folder that holds no run at all. The filesystem root and the home folder
  are refused by :func:`check_writable`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"
# What a run writes into its folder (removed by --overwrite).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "curves.png",
             "reconstructions.png", "samples.png", "evaluation.json")
# Temporary siblings that write_json_atomic and the metrics truncation leave after a kill.
_HIDDEN_RUN_FILES = (".lock", ".config.json.tmp", ".summary.json.tmp", ".evaluation.json.tmp", "metrics.jsonl.tmp")


class RunFolderError(ValueError):
    """An output folder that cannot be used (one line naming it)."""


def check_writable(out: str | Path, flag: str = "--out") -> None:
    """Raises :class:`RunFolderError` unless ``out`` is, or can be made, a writable folder.

    Creates nothing: a missing folder is checked through its nearest existing parent.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{flag} {out} is a file, not a folder")
    where = out.resolve()
    for special, name in ((Path(where.anchor), "the filesystem root"), (Path.home().resolve(), "the home folder")):
        if where == special:
            raise RunFolderError(f"{flag} {out} is {name}; give a run a folder of its own")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise RunFolderError(f"{flag} {out}: {probe} is a file, not a folder")
    try:  # os.access would say yes to root on a read-only mount; an unnamed file tells the truth
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise RunFolderError(f"{flag} {out} is not writable ({probe}: {e.strerror})") from None


def check_output_file(path: str | Path, flag: str = "--out") -> None:
    """Raises :class:`RunFolderError` unless ``path`` can be written as a file; creates nothing.

    Refused: a folder, a missing parent folder, a parent that is a file, a read-only parent.
    """
    path = Path(path)
    if path.is_dir():
        raise RunFolderError(f"{flag} {path} is a folder; give the file to write")
    parent = path.parent
    if not parent.exists():
        raise RunFolderError(f"{flag} {path}: its folder {parent} does not exist")
    if not parent.is_dir():
        raise RunFolderError(f"{flag} {path}: {parent} is a file, not a folder")
    try:  # as in check_writable: a real file tells the truth where os.access would not
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise RunFolderError(f"{flag} {path} is not writable ({parent}: {e.strerror})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise RunFolderError(f"{flag} {path} is not writable (read-only file)")


class RunLock:
    """An exclusive lock on a run folder (``with RunLock(out) as lock: ...``).

    Attributes:
      out: the folder.
      created: whether acquiring it created the folder (so a run that fails at the
        door can remove it again with :meth:`discard`).
    """

    def __init__(self, out: str | Path, flag: str = "--out"):
        self.out = Path(out)
        self.flag = flag
        self.created = False
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Creates the folder if needed and locks it.

        Raises:
          RunFolderError: another process holds the lock, or the folder cannot be made.
        """
        check_writable(self.out, self.flag)
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"{self.flag} {self.out} cannot be used ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunFolderError(f"{self.flag} {self.out} is in use by another jaxelbo run"
                                 + (f" (pid {holder})" if holder else "")) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Releases the lock (the lock file stays; removing it would race another run)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Releases the lock and, if acquiring created the folder, removes it again."""
        self.release()
        if self.created:
            shutil.rmtree(self.out, ignore_errors=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_files(out: str | Path) -> list[str]:
    """The names of the run files (:data:`RUN_FILES`) present in ``out``."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()]


def prepare(out: str | Path, *, resume: bool, overwrite: bool, flag: str = "--out") -> None:
    """Makes a locked ``out`` ready for a run.

    A resume keeps everything. A fresh run into a folder holding another run's files
    is refused unless ``overwrite``, which removes them first.

    Raises:
      RunFolderError: a fresh run without ``overwrite`` into a used folder.
    """
    if resume:
        return
    present = run_files(out)
    foreign = sorted(p.name for p in Path(out).iterdir() if p.name not in RUN_FILES + _HIDDEN_RUN_FILES)
    if foreign and not present:
        raise RunFolderError(f"{flag} {out} holds files that are not a jaxelbo run's ({', '.join(foreign[:3])}"
                             + (", ..." if len(foreign) > 3 else "") + "); give a new or empty folder")
    if not present:
        return
    if not overwrite:
        raise RunFolderError(f"{flag} {out} holds another run's files ({', '.join(present)}); "
                             "pass --resume to continue it or --overwrite to replace it")
    for name in present:
        _remove_run_file(Path(out) / name)


def _remove_run_file(path: Path) -> None:
    """Removes what a run wrote at ``path``; in ``checkpoints/`` only the checkpoint folders."""
    if path.name != "checkpoints" or not path.is_dir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        return
    for p in path.iterdir():
        if p.is_dir() and (p.name.isdigit() or p.name.startswith("tmp-") or p.name.endswith(".old")
                           or ".orbax-checkpoint-tmp" in p.name):
            shutil.rmtree(p)
    if not any(path.iterdir()):
        path.rmdir()


@contextlib.contextmanager
def signals_deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[list[int]]:
    """Holds SIGINT and SIGTERM back while a write that must not be cut short runs.

    A signal that comes meanwhile is recorded (the yielded list) and delivered again, to the
    handler in place before, once the block is left; a block that ends with an exception
    drops it (that exception already stops the work). Outside the main thread: no effect.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signums}
    ok = False
    try:
        yield caught
        ok = True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if ok and caught:
            signal.raise_signal(caught[0])


def write_json_atomic(path: str | Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` so that a reader (or a SIGKILL) never sees a partial file.

    The text goes to a temporary sibling, is flushed to disk, and replaces ``path`` in one
    ``os.replace``: the file holds either its old content or the new one, never an empty or
    truncated one.
    """
    import json

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
