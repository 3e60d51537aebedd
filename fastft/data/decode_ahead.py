"""Decode the data set in a child process while `fastft train` imports torch.

A CPU run spends its first seconds importing torch and torchvision on one core (1.8 s on a quiet
2-core Xeon, bench/job_ceiling.py), then the cached loader decodes every image (0.7 s for the 600
JPEGs of bar 05's job, PIL on 2 threads) before the first step. A thread cannot overlap the two:
the import holds the GIL, and a decode thread waiting for it at every Python line of PIL's decode
took 1.9 s instead of 0.6 (measured, same machine). A process can: `DecodeAhead.start` forks
before torch is imported (no threads or OpenMP pools exist yet, so fork is safe), and the child
scans the folder as the engine will (layout.scan_dataset) and decodes each image with
images.load_rgb, the decoder every loader uses, into an anonymous in-memory file
(os.memfd_create: not bounded by /dev/shm's size, gone when the last descriptor closes).

The cached loader calls `collect()` as its first pass starts: the child stops after the image in
hand, sends its index and exits; the file is mapped, and `image(path)` hands out a decoded image
only for a file whose inode, size and times are still what the child saw. Everything else
(a file changed, one the child did not reach, a file it could not decode, which the loader then
decodes to raise its own error) goes the usual way, so the batches are byte for byte the same.

Started only where it can pay: `fastft train` on a CPU, one process, the cached or auto loader,
a data folder that already exists; Linux (memfd_create, fork). The child stops at a quarter of
MemAvailable, and its pages are freed once the loader has copied what it needs.
"""

from __future__ import annotations

import json
import mmap
import os
import select
from pathlib import Path

import numpy as np

# The child's memory: at most this share of MemAvailable, on top of the cache the loader builds
# (itself at most data.cache_plan.CACHE_SHARE of it): the two coexist while the loader copies.
AHEAD_SHARE = 0.25


def mem_available() -> int:
    """Bytes of RAM available (Linux /proc/meminfo MemAvailable), else os.sysconf's physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def supported() -> bool:
    """fork and memfd_create exist here (Linux)."""
    return hasattr(os, "fork") and hasattr(os, "memfd_create")


class DecodeAhead:
    """A child process decoding `root`'s train then test images (see the module doc).

    start() forks it; collect() stops it and maps what it decoded; image(path) is one decoded
    image or None; close() ends the child if it still runs and frees the memory."""

    def __init__(self, pid: int, memfd: int, stop: tuple[int, int], index_r: int):
        self.pid, self.memfd, self.stop, self.index_r = pid, memfd, stop, index_r
        self.entries: dict[str, tuple] | None = None  # path -> (offset, h, w, *_identity); collect() fills it
        self.child_cpu_s = 0.0  # s, the child's user + system time (from wait4), after collect()
        self._map: mmap.mmap | None = None
        self._pixels: np.ndarray | None = None

    @classmethod
    def start(cls, root: Path, cap_bytes: int | None = None) -> "DecodeAhead | None":
        """Fork the child for data folder `root`; None where fork or memfd_create is missing or refused.
        `cap_bytes`: the most decoded bytes it keeps (default AHEAD_SHARE of MemAvailable)."""
        if not supported():
            return None
        cap = int(AHEAD_SHARE * mem_available()) if cap_bytes is None else cap_bytes
        fds = []
        try:  # a sandbox without memfd, no descriptors or processes left: decode as before
            fds.append(os.memfd_create("fastft-decode-ahead", os.MFD_CLOEXEC))
            fds.extend(os.pipe())
            fds.extend(os.pipe())
            parent, pid = os.getpid(), os.fork()
        except OSError:
            for fd in fds:
                os.close(fd)
            return None
        memfd, stop_r, stop_w, index_r, index_w = fds
        if pid == 0:  # the child: never returns
            os.close(stop_w)
            os.close(index_r)
            _child(Path(root), cap, memfd, stop_r, index_w, parent)
        # The parent keeps its read end of the stop pipe: the stop byte never meets a pipe without
        # a reader (EPIPE), even when the child has already finished and gone.
        os.close(index_w)
        return cls(pid, memfd, (stop_r, stop_w), index_r)

    def collect(self, stop: bool = True) -> "DecodeAhead":
        """Stop the child after its current image (`stop` False: let it decode to the end), read
        its index and map its images; waits for it to exit. A child that failed leaves nothing
        to take. Idempotent."""
        if self.entries is not None:
            return self
        if stop:  # a byte, not just EOF: a process forked since (a DataLoader worker) may hold the write end
            os.write(self.stop[1], b"s")
        with os.fdopen(self.index_r, "rb") as index:
            text = index.read()
        _, status, usage = os.wait4(self.pid, 0)
        for fd in self.stop:  # after the child is gone: without a stop, EOF here would be one
            os.close(fd)
        self.child_cpu_s = usage.ru_utime + usage.ru_stime
        try:
            rows = json.loads(text) if os.waitstatus_to_exitcode(status) == 0 else []
        except ValueError:
            rows = []
        self.entries = {path: tuple(rest) for path, *rest in rows}
        size = max((offset + 3 * h * w for offset, h, w, *_ in self.entries.values()), default=0)
        if size:
            self._map = mmap.mmap(self.memfd, size)
            self._pixels = np.frombuffer(self._map, dtype=np.uint8)
        return self

    @property
    def decoded(self) -> int:
        """Images the child decoded (0 before collect())."""
        return len(self.entries or {})

    def image(self, path: str | os.PathLike) -> np.ndarray | None:
        """uint8 (H, W, 3) RGB of `path` as load_rgb(path) gives it (a view of the shared
        memory: copy what must outlive close()), or None: not decoded ahead, or the file
        changed since (_identity). Call collect() first."""
        entry = (self.entries or {}).get(os.fspath(path))
        if entry is None or self._pixels is None:
            return None
        offset, h, w, *identity = entry
        try:
            stat = os.stat(path)
        except OSError:
            return None
        if _identity(stat) != identity:
            return None
        return self._pixels[offset: offset + 3 * h * w].reshape(h, w, 3)

    def close(self) -> None:
        """Stop and reap the child if collect() did not, then unmap and close the memory file;
        views handed out earlier keep the mapping alive until they go."""
        if self.entries is None:
            self.collect()
        self._pixels = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view still in use: the mapping goes with the last one
                pass
            self._map = None
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def _child(root: Path, cap: int, memfd: int, stop_r: int, index_w: int, parent: int) -> None:
    """The forked child: decode until done, asked to stop, or at `cap` bytes; send the index
    [[path, offset, h, w, *_identity], ...] as JSON; exit without the parent's atexit work."""
    code = 1
    try:
        rows = _decode_into(root, cap, memfd, lambda: _asked_to_stop(stop_r) or os.getppid() != parent)
        with os.fdopen(index_w, "wb") as out:
            out.write(json.dumps(rows).encode())
        code = 0
    except BaseException:  # noqa: BLE001 - anything (Ctrl-C, a vanished folder): the parent decodes
        pass
    finally:
        os._exit(code)


def _decode_into(root: Path, cap: int, memfd: int, stop) -> list:
    """Each image of root's layout, train split first, as load_rgb's uint8 RGB bytes written at
    increasing offsets of `memfd`; returns the index rows."""
    from fastft.data.images import load_rgb
    from fastft.data.layout import scan_dataset
    from fastft.errors import DataError

    layout = scan_dataset(root, skip_bad=True)  # a bad file is the loader's to name, or --skip-bad's to drop
    rows, used = [], 0
    for path, _ in [*layout.files["train"], *layout.files["test"]]:
        if stop():
            break
        stat = os.stat(path)
        try:
            pixels = np.asarray(load_rgb(path))
        except DataError:
            continue  # the loader decodes it again and says why, in its own words
        if used + pixels.nbytes > cap:
            break
        _write_at(memfd, pixels.tobytes(), used)
        h, w, _ = pixels.shape
        rows.append([os.fspath(path), used, h, w, *_identity(stat)])
        used += pixels.nbytes
    return rows


def _identity(stat: os.stat_result) -> list[int]:
    """What must not change between the child's decode and the loader's use of a file: its inode,
    size, and modification and status-change times (ns; any write moves ctime, even one that
    restores mtime)."""
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _write_at(fd: int, data: bytes, offset: int) -> None:
    """All of `data` at `offset` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _asked_to_stop(stop_r: int) -> bool:
    """The stop pipe is readable: the parent wrote its byte, closed its end, or exited."""
    return bool(select.select([stop_r], [], [], 0)[0])
