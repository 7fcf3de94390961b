"""Where qzo2 writes, and the rules that keep it from losing anything.

  guard_output   the one check every command that writes (and with overwrite replaces) a directory passes first:
                 never the current, home or root directory or one holding them, never a directory that is or holds
                 an input of the command, and replace only a directory qzo2 recognises as its own kind of output
                 (a run directory for `train`, a checkpoint with qzo2's marker for `quantize` / `export`)
  locked         one writer per output: an advisory lock (flock) beside it, released by the kernel when the process
                 dies, so a kill -9 never leaves it stuck
  write_file     a file written atomically and exclusively: a new temporary made by mkstemp in the target's
                 directory, fsynced, renamed over the target (a symlink planted at the target is replaced, never
                 written through)
  remove_stale   the temporaries a killed process of the same command left beside its output (called with the
                 lock held, so no live writer owns them)
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

MARKER = "qzo2.json"  # in every checkpoint directory `qzo2 quantize` / `qzo2 export` writes


class OutputError(ValueError):
    """An output a command must not write or replace; one line for the user."""


def _resolved(path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def is_checkpoint_dir(path: Path) -> bool:
    """A model directory written by `qzo2 quantize` or `qzo2 export`: it carries qzo2's marker file, or (written
    before the marker existed) quantize_config.json names qzo2 as the quantizer, or the model card says qzo2
    exported it."""
    path = Path(path)
    try:
        return json.loads((path / MARKER).read_text()).get("written_by", "").startswith("qzo2")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        quantizer = json.loads((path / "quantize_config.json").read_text()).get("meta", {}).get("quantizer", [])
        if any(str(q).startswith("qzo2:") for q in quantizer):
            return True
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return "exported by qzo2" in (path / "README.md").read_text(encoding="utf-8")[:2000]
    except (OSError, ValueError):
        return False


def write_marker(directory: Path, command: str, **info) -> None:
    """The marker that makes a checkpoint directory recognisably qzo2's (what `--overwrite` may replace)."""
    from . import __version__

    (Path(directory) / MARKER).write_text(json.dumps({"written_by": f"qzo2 {__version__}", "command": command,
                                                       **info}, indent=2) + "\n")


def guard_output(out, inputs: Iterable = (), kind: str = "checkpoint", replace: bool = False) -> Path:
    """Check that `out` may be written (and, with `replace`, replaced); returns it resolved. `inputs`: every path
    the command reads; `kind`: 'checkpoint' (quantize, export) or 'run' (train)."""
    from .run import is_run_dir

    path = _resolved(out)
    protected = {Path.cwd().resolve(): "the current directory", Path.home().resolve(): "the home directory",
                 Path(path.anchor): "the filesystem root"}
    for p, what in protected.items():
        if path == p or path in p.parents:
            raise OutputError(f"output {out} is {'' if path == p else 'a parent of '}{what}; give a new directory "
                              f"such as runs/NAME")
    for src in inputs:
        if src in (None, ""):
            continue
        s = _resolved(src)
        if s == path or path in s.parents:
            raise OutputError(f"output {out} {'is' if s == path else 'contains'} the input {src}; choose another "
                              f"output directory")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {out} is a file, not a directory; choose another output")
    if replace and path.is_dir() and any(path.iterdir()):
        ours = is_run_dir(path) if kind == "run" else is_checkpoint_dir(path)
        if not ours:
            what = ("a qzo2 run directory (config.yaml and checkpoints/)" if kind == "run"
                    else f"a checkpoint written by qzo2 (no {MARKER})")
            raise OutputError(f"output {out} is not {what}, so it is not replaced; choose another output "
                              f"directory (or empty this one yourself)")
    return path


@contextlib.contextmanager
def locked(out, verb: str) -> Iterator[Path]:
    """Hold the advisory lock of output `out` (the file `.NAME.lock` beside it) for the block; a second writer is
    refused with one line. The lock file is removed on exit; a lock taken on a file another process removed in
    between is taken again on the new file."""
    path = _resolved(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{out} is being written by another qzo2 process ({holder or 'pid unknown'}, lock "
                                  f"{lock}); wait for it to finish or choose another output") from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, qzo2 {verb}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def clear_stale_lock(out) -> None:
    """Remove the lock file of output `out` when no process holds it: what a writer killed after its output was in
    place, before it removed its lock, left (a command that refuses an existing output calls this, so the file
    does not stay forever). A held lock is left alone."""
    path = _resolved(out)
    lock = path.parent / f".{path.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino:
            os.unlink(lock)
    except OSError:
        pass  # held by a live writer, or gone already
    finally:
        os.close(fd)


def write_file(path, data: str | bytes) -> None:
    """Write `data` to `path` atomically, through a temporary created exclusively beside it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_line(path, line: str) -> None:
    """Append one line to `path` (created if absent), never through a symlink planted there."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# the names temporaries get from quant.checkpoint.atomic_dir (.NAME.tmp- / .NAME.old-), write_file (.NAME.tmp-) and
# quantize's GPTQ work directory (.NAME.work-): mkdtemp/mkstemp add 8 characters of [a-z0-9_]
STALE = r"\.{name}\.(?:tmp|old|work)-[a-z0-9_]{{8}}"


def remove_stale(directory, name: str) -> list[str]:
    """Delete the temporaries of `name` (a regex of the output's file name) that a killed writer left in
    `directory`; call it with the output's lock held. Returns the names removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = re.compile(STALE.format(name=name) + r"\Z")
    removed = []
    for entry in directory.iterdir():
        if pattern.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry.name)
    return removed


def os_error_line(e: OSError) -> str:
    """An OSError as one line that names the file: 'cannot write /x/y: Read-only file system'."""
    what = e.strerror or str(e)
    names = " -> ".join(str(n) for n in (e.filename, e.filename2) if n)
    return f"{names}: {what}" if names else what
