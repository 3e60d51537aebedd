"""bench/job_ceiling.py's arithmetic and its process timer (no job runs here)."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="module")
def jc(bench_script):
    return bench_script("job_ceiling")


CEILING = {"step_img_s": 10.0, "forward_img_s": 40.0, "step_img_cpu": 5.0, "forward_img_cpu": 20.0}


def test_ideal_follows_the_module_doc_in_wall_and_cpu_seconds(jc):
    # finetune: import + epochs x train / step + epochs x test / forward
    assert jc.ideal_seconds("finetune", CEILING, 3.0, 400, 200, 2) == 3.0 + 800 / 10 + 400 / 40
    # frozen: every train image at the forward rate, the test set once (its features are kept)
    assert jc.ideal_seconds("frozen", CEILING, 3.0, 400, 200, 2) == 3.0 + 800 / 40 + 200 / 40
    assert jc.ideal_seconds("frozen", CEILING, 2.0, 400, 200, 2, "cpu") == 2.0 + 800 / 20 + 200 / 20


def test_timed_process_counts_the_child_cpu_and_not_a_sleep(jc):
    # The busy child spins until its own CPU clock has run 0.3 s, whatever the CPU's speed.
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    busy, busy_cpu = jc.timed_process([sys.executable, "-c", spin])
    idle, idle_cpu = jc.timed_process([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert idle >= 0.5 and idle_cpu < idle - 0.3   # a sleeping child costs wall time, little CPU
    assert busy >= 0.3 and busy_cpu >= 0.3          # a busy one costs both


def test_crop_ahead_runs_the_cli_with_the_crops_one_batch_ahead(jc, tiny_data, tmp_path):
    """--crop-ahead's launcher: the same job as `python -m fastft train`, but the cached loader says
    (and does) its CPU crops one batch ahead; the plain CLI crops in the loop."""
    import subprocess
    args = ["train", "--data", str(tiny_data), "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--epochs", "1", "--device", "cpu", "--amp", "off", "--no-compile", "--loader", "cached"]
    ahead = subprocess.run([sys.executable, *jc.CROP_AHEAD, *args, "--out", str(tmp_path / "ahead")],
                           capture_output=True, text=True, check=True)
    inline = subprocess.run([sys.executable, "-m", "fastft", *args, "--out", str(tmp_path / "inline")],
                            capture_output=True, text=True, check=True)
    crop_line = [line for line in ahead.stdout.splitlines() if line.startswith("cached train:")]
    assert len(crop_line) == 1 and crop_line[0].endswith("cropped during the step before, on a worker thread")
    inline_line = [line for line in inline.stdout.splitlines() if line.startswith("cached train:")]
    assert len(inline_line) == 1 and "worker thread" not in inline_line[0]
    assert (tmp_path / "inline" / "summary.json").is_file() and (tmp_path / "ahead" / "summary.json").is_file()
