"""Where qzo2 writes, and the rules that keep it from losing anything.

  guard_output   the one check every command that writes (and with overwrite replaces) a directory passes first:
                 never the current, home or root directory or one holding them, never a directory that is or holds
                 an input of the command, and replace only a directory qzo2 recognises as its own kind of output,
                 holding nothing qzo2 did not write there (a run directory for `train`, whose files qzo2 names;
                 a checkpoint for `quantize` / `export`, whose marker lists the files it wrote)
  guard_file     the same for a file output (eval --predictions, bench -o): never a directory or an input, and an
                 existing file only when it is the same command's own output
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
OLD_MARKER = f"{MARKER} without its list of files"  # written by qzo2 before the list: what it holds is unknown


class OutputError(ValueError):
    """An output a command must not write or replace; one line for the user."""


def _resolved(path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def _tree(path: Path) -> list[str]:
    """Every file and symlink under `path`, as relative POSIX paths (an empty directory as 'NAME/')."""
    names = []

    def unreadable(e: OSError) -> None:  # a directory that cannot be listed holds what we cannot vouch for
        names.append(f"{Path(e.filename).relative_to(path).as_posix() if e.filename else '?'} (unreadable)")

    for root, dirs, files in os.walk(path, onerror=unreadable):
        rel = Path(root).relative_to(path)
        names += [(rel / f).as_posix() for f in files]
        names += [(rel / d).as_posix() for d in dirs if os.path.islink(Path(root) / d)]
        if not dirs and not files and rel != Path("."):
            names.append(rel.as_posix() + "/")
    return sorted(names)


def is_checkpoint_dir(path: Path) -> bool:
    """A model directory written by `qzo2 quantize` or `qzo2 export`: it carries qzo2's marker file."""
    try:
        return json.loads((Path(path) / MARKER).read_text()).get("written_by", "").startswith("qzo2")
    except (OSError, ValueError, AttributeError):
        return False


def foreign_entries(path, kind: str) -> list[str]:
    """What in directory `path` qzo2 did not write there, so that replacing it would lose it: for a checkpoint,
    every file its marker does not list (a checkpoint without the list is refused whole); for a run directory,
    every entry that is not one of the run's own files (config, metrics, checkpoints/step-N, best/, the trackers'
    directories, a killed writer's temporaries)."""
    path = Path(path)
    if kind == "run":
        from .run import is_own_run_entry

        return [n for n in _tree(path) if not is_own_run_entry(n) and not n.endswith("/")]  # empty dirs: nothing
    try:
        listed = json.loads((path / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if not isinstance(listed, dict):
        return [OLD_MARKER]
    foreign = []
    for n in _tree(path):
        if n == MARKER or n.endswith("/"):
            continue
        if n not in listed:
            foreign.append(n)
        elif _fingerprint(path / n) != listed[n]:
            foreign.append(f"{n} (changed since qzo2 wrote it)")
    return foreign


HASHED = 16 << 20  # files up to this size are listed with their sha256 (model cards, configs, tokenizers); larger ones
# (weight shards, GGUF) by size: hashing them would read gigabytes, and no one edits a shard in place


def _fingerprint(file: Path) -> dict | None:
    """What a checkpoint's list records of one file: its size, and its sha256 when it is small (None: not a regular
    file, e.g. a symlink put in its place)."""
    import hashlib

    if file.is_symlink() or not file.is_file():
        return None
    size = file.stat().st_size
    digest = None
    if size <= HASHED:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
    return {"bytes": size, "sha256": digest}


def write_marker(directory: Path, command: str, **info) -> None:
    """The marker that makes a checkpoint directory recognisably qzo2's, with the list of every file the command
    wrote, its size and (small files) sha256: what `--overwrite` may replace (a directory holding anything else, or
    a listed file changed since, is refused); written last."""
    from . import __version__

    files = {n: _fingerprint(Path(directory) / n) for n in _tree(Path(directory))
             if n != MARKER and not n.endswith("/")}
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": f"qzo2 {__version__}", "command": command,
                                                       **info, "files": files}, indent=2) + "\n")


def _relations(path: Path, inputs: Iterable):
    """(input, 'is' | 'contains' | 'is inside') for each input that resolved `path` is, holds, or lies inside."""
    for src in inputs:
        if src in (None, ""):
            continue
        s = _resolved(src)
        if s == path:
            yield src, "is"
        elif path in s.parents:
            yield src, "contains"
        elif s in path.parents:
            yield src, "is inside"


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
    for src, relation in _relations(path, inputs):
        if relation == "is inside":  # written into a model or run it reads: a stray directory there, or worse
            raise OutputError(f"output {out} is inside the input {src}; choose an output directory outside it")
        if replace or kind != "run":  # is or contains it (a run may be resumed beside its data)
            raise OutputError(f"output {out} {relation} the input {src}; choose another output directory")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {out} is a file, not a directory; choose another output")
    if replace and path.is_dir() and any(path.iterdir()):
        ours = is_run_dir(path) if kind == "run" else is_checkpoint_dir(path)
        if not ours:
            what = ("a qzo2 run directory (config.yaml and checkpoints/)" if kind == "run"
                    else f"a checkpoint written by qzo2 (no {MARKER})")
            raise OutputError(f"output {out} is not {what}, so it is not replaced; choose another output "
                              f"directory (or empty this one yourself)")
        foreign = foreign_entries(path, kind)
        if foreign == [OLD_MARKER]:
            raise OutputError(f"output {out} was written by an earlier qzo2 that did not list its files, so what it "
                              f"holds is unknown and it is not replaced; delete it yourself or choose another output "
                              f"directory")
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputError(f"output {out} holds {foreign[0]}{more}, which qzo2 did not write there (or not as it is "
                              f"now), so it is not replaced; move that out or choose another output directory")
    return path


def guard_file(out, inputs: Iterable = (), own_keys: Iterable[str] = (), what: str = "output",
               own_head: str | None = None) -> Path:
    """Check that file `out` may be written: not a directory, not an input (nor inside an input directory), and
    if it exists, this command's own earlier output (its first line a JSON object with every key of `own_keys`,
    or with `own_head` its first line starting with that text), never another file. Returns the path to write (its
    directory resolved; a symlink planted at the file itself is refused, never followed)."""
    given = Path(os.path.expanduser(str(out)))
    path = given.parent.resolve() / given.name  # where the OS will write (the last component itself not followed)
    if path.is_dir():
        raise OutputError(f"{what} {out} is a directory; give a file name such as {Path(out) / 'out.jsonl'}")
    for src, relation in _relations(_resolved(path), inputs):
        if relation != "contains":  # a file contains nothing
            raise OutputError(f"{what} {out} {relation} the input {src}; choose another file")
    if os.path.lexists(path):
        if path.is_symlink() or not path.is_file():
            raise OutputError(f"{what} {out} exists and is not a regular file; choose another file")
        try:
            with open(path, encoding="utf-8") as f:
                line = f.readline()
            if own_head is not None:
                own = line.startswith(own_head)
            else:
                first = json.loads(line)
                own = isinstance(first, dict) and all(k in first for k in own_keys)
        except (OSError, ValueError):
            own = False
        if not own:
            raise OutputError(f"{what} {out} exists and was not written by this command, so it is not touched; "
                              f"choose another file")
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
