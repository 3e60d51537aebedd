"""What a run cost besides time: peak memory and torch.compile's graph count.

Peak memory is what can be measured, labelled with what it covers
(`peak_mem_scope` in the summary):
- CUDA: the torch allocator's peak, reset at the start of each run. DALI
  allocates GPU memory from its own pools and keeps its decoder cache outside
  torch, and DALI 2.4 reports neither (its executor statistics exist only for
  the non-dynamic executor, which fastft does not use), so the device's memory
  in use at the end of the run is given beside it: that includes DALI, the
  CUDA context and anything else on the GPU.
- CPU: the process's peak resident set (VmHWM), which includes DALI's CPU
  buffers, reset at the start of each run where the kernel allows it; where it
  does not, the label says the figure covers the whole process so far.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MB = 2 ** 20


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak anew for a run; True when it did (False: it covers the process so far).
    On CUDA, memory cached by torch and DALI but no longer used goes back to the device too,
    so the device-wide figure at the run's end carries less of earlier runs."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if "nvidia.dali.backend" in sys.modules:  # never import DALI just for this
            sys.modules["nvidia.dali.backend"].ReleaseUnusedMemory()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # Linux: "5" resets the peak RSS to the current RSS
    except OSError:
        return False  # not Linux, or not allowed
    peak, now = _status_kb("VmHWM"), _status_kb("VmRSS")
    # A kernel that ignores the write leaves the old, higher peak (a slack of 1 MB for the read).
    return peak is not None and now is not None and peak <= now + 1024


def memory_scope(device_type: str, loader: str, reset_ok: bool) -> str:
    """What peak_mem_mb covers and leaves out, in words for the summary."""
    if device_type == "cuda":
        dali = " and DALI's pools and decoder cache (DALI reports no memory figures)" if loader == "dali" else ""
        return (f"torch CUDA allocator peak since the run started; excludes the CUDA context, the allocator's "
                f"cached slack{dali}; device_mem_used_mb is the whole GPU's use at the end")
    rss = "process peak RSS (VmHWM)" + (", DALI's CPU buffers included" if loader == "dali" else "")
    workers = "; excludes DataLoader worker processes" if loader == "torch" else ""
    if reset_ok:
        return f"{rss} since the run started{workers}"
    return f"{rss} over the process lifetime: the peak could not be reset, earlier runs count{workers}"


def peak_memory(device: torch.device, loader: str, reset_ok: bool) -> dict:
    """The summary's memory fields: peak_mem_mb (MB), peak_mem_scope, and on CUDA
    device_mem_used_mb (MB in use on the whole device now). `reset_ok`: what
    reset_peak_memory returned at the run's start."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / _MB,
                "peak_mem_scope": memory_scope("cuda", loader, True),
                "device_mem_used_mb": (total - free) / _MB}
    peak_kb = _status_kb("VmHWM")
    if peak_kb is None:  # not Linux: the process's lifetime peak
        import resource
        peak_kb, reset_ok = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    return {"peak_mem_mb": peak_kb / 1024, "peak_mem_scope": memory_scope(device.type, loader, reset_ok)}


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])
