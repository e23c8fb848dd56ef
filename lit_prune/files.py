"""Writing results so that a reader (or a crash) never sees half a file.

Everything is written under a temporary name in the destination's folder and renamed into place.
`tempfile` creates private files and folders (0600 / 0700); the results are given the modes any
new file gets under the user's umask, so a shared study stays readable by whoever could read it.
Temporary names carry their host and process id (`.<name>-<host>~<pid>~<random>`), so the next
write of the same name removes what a killed process of this host left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lit_prune.errors import invalid

# what a folder the user named but cannot write into looks like (not, say, a missing input file)
_UNWRITABLE = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path`; when the block ends normally it becomes `path`,
    otherwise it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}-"
    _remove_abandoned(path.parent, prefix)
    fd, tmp = tempfile.mkstemp(prefix=prefix + _owner(), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def staging_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder in `parent`, to be filled and then renamed into place, with an ordinary
    folder's mode."""
    _remove_abandoned(Path(parent), prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix + _owner(), dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _owner() -> str:
    return f"{socket.gethostname()}~{os.getpid()}~"


def _remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the temporaries `prefix` + `_owner()` + ... of processes of this host that have ended."""
    host = socket.gethostname()
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(prefix)]
    except OSError:
        return  # a folder not made yet, or unreadable: nothing to clean here
    for entry in entries:
        fields = entry.name[len(prefix) :].split("~")
        if len(fields) == 3 and fields[0] == host and fields[1].isdigit() and not _running(int(fields[1])):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def writing_into(field: str, folder: str | os.PathLike) -> Iterator[None]:
    """A folder that cannot be written into (or created) is a one-line error naming its field."""
    try:
        yield
    except OSError as err:
        if not (
            err.errno in _UNWRITABLE or err.errno == errno.ENOENT and _on_the_way_to(err.filename, folder)
        ):
            raise
        raise invalid(
            field,
            str(folder),
            f"a directory this user can create and write into ({err.filename or folder}: {err.strerror})",
        ) from None


def _on_the_way_to(filename: object, folder: str | os.PathLike) -> bool:
    """Whether `filename` is `folder` or one of its ancestors: a folder that could not be created
    (/proc/x, say), not a missing input."""
    if not isinstance(filename, (str, os.PathLike)):
        return False
    target, missing = Path(folder).absolute(), Path(filename).absolute()
    return missing == target or missing in target.parents


def umask_modes(tree: str | os.PathLike) -> None:
    """Give every file and folder under `tree` (itself included) the mode a new one gets under the
    user's umask: safetensors' save_file (save_pretrained, sae-lens' exports, masks) writes 0600."""
    mask = _umask()
    for folder, _dirs, files in os.walk(tree):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def check_writable(field: str, path: str | os.PathLike, shown: str | None = None) -> None:
    """`path` can be created and written into, tried (not guessed from its mode bits, which root
    ignores and /proc contradicts) by making and removing a folder in its nearest existing ancestor,
    before any work whose output would be lost at the end."""
    target, shown = Path(path).absolute(), str(path) if shown is None else shown
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise invalid(field, shown, f"a directory path ({existing} is a file)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lit_prune-probe-", dir=existing))
    except OSError as err:
        raise invalid(
            field, shown, f"a directory this user can create and write into ({existing}: {err.strerror})"
        ) from None
