"""A run's checkpoint: written atomically, read without running code from the file.

`checkpoint.pt` holds the model, optimizer, grad scaler, completed epochs, RNG
states, config and class names. It is written to a temporary file and renamed
over the old one, so a run killed at any moment leaves the last complete
checkpoint loadable.

`CheckpointWriter` takes a CPU copy of the state at save time and writes it on a
background thread, so training goes on while the ~45 MB file reaches the disk.
"""

from __future__ import annotations

import copy
import random
import threading
from pathlib import Path

import torch

from fastft.errors import CheckpointError
from fastft.model import load_failure, load_weights_only
from fastft.safe_write import write_atomic

CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_atomic(state: dict, path: Path) -> None:
    """Write `state` to `path` via `path.tmp`, fsync and rename: the old file stays whole until the rename.

    A leftover `.tmp` from a killed write is truncated by the next write and never read. Raises
    WriteError (one line: the bytes needed and free) for a full disk or a folder that cannot be
    written; torch reports those as RuntimeError ("enforce fail at inline_container.cc").
    """
    write_atomic(path, lambda stream: torch.save(state, stream), state_bytes(state))


def state_bytes(state) -> int:
    """Bytes torch.save will write for `state`, about: its tensors' storages, each counted once
    (views share one), plus 64 KB for the pickle and the zip's records."""
    storages = {}
    stack = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[(value.device, storage.data_ptr())] = storage.nbytes()
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return sum(storages.values()) + (64 << 10)


def cpu_snapshot(state):
    """A copy of `state` that later training steps cannot change: every tensor copied to CPU memory.

    Dicts, lists and tuples are rebuilt; tensors (any dtype, any device) are copied, keeping their
    strides; other values are deep-copied. CUDA tensors go into pinned host buffers with
    non_blocking copies queued on the current stream, then one synchronize per device: the copies
    see every step queued before the save, and the function returns only once they have landed.
    """
    devices: set[torch.device] = set()
    # One thread: a memory-bound copy gains little from more, and on a busy machine an OpenMP
    # team waits for its slowest member at every tensor (45 MB of ResNet-18 on a loaded 2-core
    # box: 9-30 ms on one thread, 74-340 ms on two). Restored at once; no other thread runs ops now.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        copied = _copy_tree(state, devices)
    finally:
        torch.set_num_threads(threads)
    for device in devices:
        torch.cuda.synchronize(device)
    return copied


def _copy_tree(value, devices: set):
    if isinstance(value, torch.Tensor):
        if value.device.type == "cuda":
            devices.add(value.device)
            host = torch.empty_like(value, device="cpu", pin_memory=True)
            return host.copy_(value.detach(), non_blocking=True)
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copy_tree(item, devices) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_copy_tree(item, devices) for item in value)
    return copy.deepcopy(value)


class CheckpointWriter:
    """Writes checkpoints from CPU snapshots on one background thread, one write at a time.

    `save` copies the state synchronously, waits for the previous write (never two at once, and at
    most one snapshot held while it waits), then starts the write and returns. Waiting rather than
    coalescing keeps every requested checkpoint: the file on disk only moves forward, epoch by epoch.
    `wait` blocks until the write in flight has finished and raises its error, if any: WriteError
    for a full disk or a read-only folder (the file on disk is then the last one written, whose
    epoch `saved_epoch` holds); anything else as raised.
    The thread is not a daemon, so even an unhandled error lets the write finish before exit.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.saved_epoch: int | None = None  # the epoch of the last checkpoint this writer landed

    def save(self, state: dict, path: Path, background: bool = True) -> None:
        self.wait()
        if not background:
            save_atomic(state, path)
            self.saved_epoch = state.get("epoch")
            return
        snapshot = cpu_snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot, path),
                                        name="fastft-checkpoint", daemon=False)
        self._thread.start()

    def _write(self, snapshot: dict, path: Path) -> None:
        try:
            save_atomic(snapshot, path)
            self.saved_epoch = snapshot.get("epoch")
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self, raise_error: bool = True) -> None:
        """Join the write in flight; raise its error, or with `raise_error` False drop it (the run
        is stopping for another error, and saved_epoch still names the file on disk)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def load_checkpoint(run_dir: str | Path) -> dict:
    path = Path(run_dir)
    path = path if path.is_file() else checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (a run folder holds {CHECKPOINT_NAME})")
    try:
        state = load_weights_only(path)
    except Exception as exc:  # a truncated zip, a foreign pickle, random bytes...
        raise CheckpointError(load_failure(path, exc, "checkpoint")) from exc
    required = ("model", "epoch", "config", "classes")
    if not isinstance(state, dict) or any(key not in state for key in required):
        raise CheckpointError(f"{path}: not a fastft checkpoint (expected keys {', '.join(required)})")
    return state


def rng_state(device: torch.device) -> dict:
    """This process's random streams: CPU torch, Python, and the run's own CUDA device only.

    A state per visible GPU (get_rng_state_all) would tie the checkpoint to the number of
    GPUs the saving process could see; a CPU run saves no CUDA state at all.
    """
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> str | None:
    """Put back the streams `rng_state` saved; returns a warning line when a CUDA state is skipped.

    Index mapping: a saved "cuda" tensor belongs to the run's device, not to an index, so a
    run saved on cuda:1 restores onto whatever device the resumed run uses (cuda:0 when one
    GPU is visible): a generator's state is its seed and offset, the same on any GPU.
    Checkpoints of earlier versions hold a list, one state per GPU the saver could see; the
    entry at this device's index is taken if there is one.
    """
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_random_state(state["python"]))
    saved = state.get("cuda")
    if saved is None or device.type != "cuda":
        return None
    if isinstance(saved, (list, tuple)):  # an earlier version's per-GPU list
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(saved):
            return (f"the checkpoint holds CUDA random states for {len(saved)} GPU(s), none for {device}; "
                    f"its CUDA stream restarts from the seed")
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)
    return None


def _as_python_random_state(saved) -> tuple:
    """random.setstate wants tuples; a round trip through torch.save may give lists."""
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)
