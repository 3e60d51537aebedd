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
