"""bench/kernels.py: which methods each device times, and rows that fail or get cut on their own."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bk(bench_script):
    return bench_script("kernels")


TINY = ["--device", "cpu", "--size", "16", "--batch", "2", "--sources", "2", "--iters", "1", "--warmup", "0"]


def test_cuda_times_the_kernel_and_never_the_cpu_only_uint8_reference(bk):
    names, notes = bk.planned("cuda", "")
    assert names == ["kernel", "exact", "torchvision", "dali"]
    assert notes == [f"reference: {bk.DEVICE_ONLY['reference'][1]}"] and "uint8" in notes[0]
    names, notes = bk.planned("cpu", "dali")
    assert names == ["reference", "exact", "torchvision"]
    assert [n.split(":")[0] for n in notes] == ["kernel", "dali"]


def test_a_failing_row_keeps_the_others_and_every_row_is_saved_as_it_finishes(bk, monkeypatch, tmp_path):
    path = tmp_path / "kernels.json"
    saved_before = {}
    real_row = bk.row

    def spy_row(method, *args, **kwargs):  # what the file held when this method's timing finished
        saved_before[method] = [r["method"] for r in json.loads(path.read_text())["rows"]] if path.exists() else []
        return real_row(method, *args, **kwargs)

    def byte_error(*args, **kwargs):  # what torch's CUDA antialias raises on uint8
        raise RuntimeError('"upsample_bilinear2d_aa" not implemented for \'Byte\'\nsecond line')

    monkeypatch.setattr(bk, "row", spy_row)
    monkeypatch.setattr(bk, "torchvision_loop", byte_error)
    status = bk.main(TINY + ["--skip", "dali", "--json", str(path)])
    result = json.loads(path.read_text())
    assert status == 1
    assert [r["method"] for r in result["rows"]] == ["reference", "exact", "torchvision"]
    ok, failed = result["rows"][:2], result["rows"][2]
    assert all(r["images_per_s"] > 0 and "error" not in r for r in ok)
    assert failed == {"method": "torchvision", "error": "RuntimeError: \"upsample_bilinear2d_aa\" not implemented "
                                                        "for 'Byte'"}
    assert saved_before == {"reference": [], "exact": ["reference"]}  # reference was on disk before exact ended
    assert result["copy_gb_per_s"] > 0


def test_a_method_that_fails_to_build_is_its_own_row(bk, monkeypatch, tmp_path):
    def broken_pipeline(sources, args):
        raise RuntimeError("pipeline build failed")

    monkeypatch.setattr(bk, "dali_runner", broken_pipeline)
    path = tmp_path / "kernels.json"
    assert bk.main(TINY + ["--skip", "exact,torchvision", "--json", str(path)]) == 1
    rows = json.loads(path.read_text())["rows"]
    assert [r["method"] for r in rows] == ["reference", "dali"]
    assert rows[0]["images_per_s"] > 0 and rows[1]["error"] == "RuntimeError: pipeline build failed"
