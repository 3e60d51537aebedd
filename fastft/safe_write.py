"""Writing fastft's files so a full disk or a read-only folder costs one line and no saved file.

Every file goes to a temporary name beside its target (PATH.tmp), is flushed and fsynced, then
renamed over PATH: until the rename the old file is whole, and a failed write removes its
temporary file, so the space it took is free again and the next write starts clean.

A failure is raised as one WriteError naming the file and the cause: a full disk with how many
bytes the write needed and how many the folder has free, a read-only file system, a denied
permission. torch's zip writer (torch.save) hides the cause: the OSError of its stream becomes
`RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...`. So a stream is
written through `TrackedFile`, which keeps the OSError it saw, and a torch failure without one is
judged by the free space left.

`check_writable` is the commands' preflight: whether a folder (or the nearest one above it that
exists, which the command would create it in) can be written, asked before any work starts.
`usable_cache_dir` gives fastft's cache folder, or a temporary one where that cannot be written.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fastft.errors import WriteError

FULL = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM)
# What torch's PyTorchStreamWriter (caffe2/serialize/inline_container.cc) says when a write of
# its stream fails: "unexpected pos N vs M" (a short write) or "PytorchStreamWriter failed ...".
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter failed", "unexpected pos")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB'; binary units (1 KB = 1024 bytes), as df -h counts."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def shown(path) -> str:
    """`path` as it may appear inside a one-line message (fastft.data.images.shown_path is this one):
    a newline in a name would split the line."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)


def existing_folder(path: Path) -> Path:
    """`path` if it is a folder, else the nearest folder above it that exists."""
    for folder in (Path(path), *Path(path).absolute().parents):
        if folder.is_dir():
            return folder
    return Path("/")


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(existing_folder(path)).free
    except OSError:
        return None


class TrackedFile:
    """A binary file handle that counts the bytes written and keeps the OSError a write raised
    (torch.save replaces it with a RuntimeError of its own). Only `write` and `flush`: all torch.save
    needs of a stream."""

    def __init__(self, handle):
        self.handle, self.written, self.error = handle, 0, None

    def write(self, data) -> int:
        try:
            count = self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.written += len(data)
        return count

    def flush(self) -> None:
        self.handle.flush()


def _cause(exc: BaseException, seen: OSError | None) -> OSError | None:
    """The OSError behind a failed write: `exc` itself, the one a TrackedFile saw, or one chained."""
    if isinstance(exc, OSError):
        return exc
    if seen is not None:
        return seen
    chained, hops = exc.__cause__ or exc.__context__, 0
    while chained is not None and hops < 8:  # exporters wrap the OSError in errors of their own
        if isinstance(chained, OSError):
            return chained
        chained, hops = chained.__cause__ or chained.__context__, hops + 1
    return None


def _is_torch_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in TORCH_WRITE_FAILURES)


def failure(path: Path, exc: BaseException, needed: int | None = None, written: int = 0,
            seen: OSError | None = None) -> WriteError | None:
    """The one-line WriteError for a write of `path` that raised `exc`, or None when `exc` is not
    a failure to write (a bug, Ctrl-C: the caller re-raises it).

    `needed`: the bytes the whole file needs, where known; `written`: bytes that got out before
    the failure (the file needs more than that); `seen`: the OSError a TrackedFile kept.
    """
    if isinstance(exc, WriteError):
        return exc
    cause = _cause(exc, seen)
    if cause is None and not _is_torch_write_failure(exc):
        return None
    path, free = Path(path), free_bytes(path)
    full = cause.errno in FULL if cause is not None else (
        free is not None and free < max(needed or 0, written, 1 << 20))  # torch's stream: judged by the space
    if full:
        folder = existing_folder(path.parent)
        room = f"{human_bytes(free)} free" if free is not None else "no free space it can report"
        need = (f"the file needs about {human_bytes(needed)} and " if needed else
                f"the file needs more than the {human_bytes(written)} written and " if written else "")
        return WriteError(f"{shown(path)}: disk full: {need}{shown(folder)} has {room}; free space there",
                          path, needed)
    if cause is not None and cause.errno == errno.EROFS:
        return WriteError(f"{shown(path)}: cannot write: {shown(existing_folder(path.parent))} is on a read-only "
                          f"file system", path, needed)
    if cause is not None and cause.errno in DENIED:
        return WriteError(f"{shown(path)}: cannot write: permission denied", path, needed)
    reason = cause.strerror if cause is not None and cause.strerror else str(exc).splitlines()[0]
    return WriteError(f"{shown(path)}: write failed ({reason})", path, needed)


def remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only folder: there was no temporary file to remove
        pass


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX: a directory entry survives a power cut once synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): the rename is all there is
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable, needed: int | None = None, durable: bool = True) -> Path:
    """Write `path` by calling `write(stream)` on a TrackedFile over PATH.tmp, then fsync
    (`durable`) and rename over `path`. Raises WriteError (one line) for a full disk, a read-only
    or forbidden folder, and for torch's stream failure; any other error as raised. No .tmp is
    left either way; the old `path` is untouched unless the rename happened."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    stream = None
    try:
        with open(tmp, "wb") as handle:
            stream = TrackedFile(handle)
            write(stream)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        remove_quietly(tmp)  # before measuring the free space: the partial file no longer takes any
        error = failure(path, exc, needed, stream.written if stream else 0, stream.error if stream else None)
        if error is None:
            raise
        raise error from exc
    if durable:
        fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: Path, data: bytes, durable: bool = False) -> Path:
    return write_atomic(path, lambda stream: stream.write(data), len(data), durable)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode(), durable)


@contextmanager
def replacing(path: Path, needed: int | None = None, tmp: Path | None = None) -> Iterator[Path]:
    """For writers that want a file name (savefig, torch.onnx.export): yields the temporary path
    (default PATH.tmp) to write, then renames it over `path`; errors as write_atomic."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        remove_quietly(tmp)
        error = failure(path, exc, needed)
        if error is None:
            raise
        raise error from exc


@contextmanager
def writing(path: Path, needed: int | None = None) -> Iterator[None]:
    """Maps a write failure inside the block to WriteError, for files written in place (an
    appended log line, TensorBoard's event file); the file named is the one the OSError names,
    else `path`."""
    try:
        yield
    except BaseException as exc:
        named = getattr(exc, "filename", None)  # the file an OSError names, inside the folder given
        error = failure(Path(named) if isinstance(named, str) else path, exc, needed)
        if error is None:
            raise
        raise error from exc


def cannot_write(folder: Path) -> str | None:
    """Why nothing can be created in `folder` (or in the nearest existing folder above it, where
    it would be created), or None where it can. Asks access(2), which answers for a read-only
    file system even to root, and writes nothing."""
    target = Path(folder)
    base = existing_folder(target)
    if target.exists() and not target.is_dir():
        return f"{shown(target)} is a file, not a folder"
    for parent in (target, *target.parents):
        if parent == base:
            break
        if parent.is_symlink() and not parent.exists():  # mkdir would raise FileExistsError
            return f"{shown(parent)} is a symbolic link to {shown(os.readlink(parent))}, which does not exist"
        if parent.exists() and not parent.is_dir():
            return f"{shown(parent)} is a file, not a folder"
    if os.access(base, os.W_OK | os.X_OK):
        return None
    probe = os.statvfs(base) if hasattr(os, "statvfs") else None
    if probe is not None and probe.f_flag & os.ST_RDONLY:
        return f"{shown(base)} is on a read-only file system"
    return f"{shown(base)} is not writable (permission denied)"


def check_writable(folder: Path, what: str) -> None:
    """Raise a one-line WriteError, before any work, where `what` (e.g. "--out runs/x") cannot be
    written because of `folder`."""
    why = cannot_write(folder)
    if why is not None:
        raise WriteError(f"{what}: cannot write there: {why}; choose another folder", Path(folder))


def fallback_cache_dir() -> Path:
    """A per-user temporary cache, used for one run where the usual one cannot be written."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"fastft-cache-{uid}"


def usable_cache_dir(preferred: Path) -> Path:
    """`preferred` where it can be written, else fallback_cache_dir(). Deterministic (asked of
    the file system each time), so every caller in a run gets the same folder."""
    return preferred if cannot_write(preferred) is None else fallback_cache_dir()


def cache_fallback_note(preferred: Path) -> str | None:
    """The warning line for a run whose cache moved to fallback_cache_dir(), or None."""
    why = cannot_write(preferred)
    if why is None:
        return None
    return (f"cache folder {shown(preferred)} cannot be written ({why}); this run caches in "
            f"{shown(fallback_cache_dir())} instead; set XDG_CACHE_HOME to a writable folder to keep the cache")
