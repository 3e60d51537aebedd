"""Peak memory: the figure starts anew per run where it can, and its label says what it covers."""

from __future__ import annotations

import mmap

import torch

from fastft.resources import _status_kb, memory_scope, peak_memory, reset_peak_memory

CPU = torch.device("cpu")


def test_labels_say_what_the_peak_covers_and_leaves_out():
    gpu_dali = memory_scope("cuda", "dali", True)
    assert "torch CUDA allocator" in gpu_dali and "excludes" in gpu_dali and "DALI" in gpu_dali
    assert "DALI" not in memory_scope("cuda", "torch", True)
    assert "since the run started" in memory_scope("cpu", "dali", True)
    lifetime = memory_scope("cpu", "dali", False)
    assert "process lifetime" in lifetime and "since the run started" not in lifetime
    assert "worker processes" in memory_scope("cpu", "torch", True)


def test_a_reset_forgets_an_earlier_peak_or_the_label_says_it_did_not():
    # 200 MB of anonymous mmap, every page written: resident, and unmapped (gone from RSS) on
    # close whatever the malloc in use does with freed memory. A numpy array freed after a full
    # test session stayed resident (the allocator kept it), and the peak rightly stayed high.
    block = mmap.mmap(-1, 200 * 2**20)
    page = b"\x01" * mmap.PAGESIZE
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset:offset + mmap.PAGESIZE] = page
    before = peak_memory(CPU, "torch", reset_ok=False)["peak_mem_mb"]
    block.close()
    if reset_peak_memory(CPU):
        after = peak_memory(CPU, "torch", reset_ok=True)
        assert after["peak_mem_mb"] < before - 150
        assert after["peak_mem_mb"] * 1024 <= _status_kb("VmRSS") + 1024
        assert "since the run started" in after["peak_mem_scope"]
    else:  # a kernel that keeps the peak: the figure is the process's, and says so
        after = peak_memory(CPU, "torch", reset_ok=False)
        assert after["peak_mem_mb"] >= before and "process lifetime" in after["peak_mem_scope"]
