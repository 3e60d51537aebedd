"""Where a job's time goes: job_s from the process start, phases_s adding up to it, the report line."""

from __future__ import annotations

import json
import re
import time

import pytest

from fastft import cli, phases
from fastft.phases import NAMES, PhaseClock, phases_line, process_start

IMPORTED = time.perf_counter()  # this test process had started before this module was imported


def test_process_start_is_this_process_start_and_falls_back_without_proc(monkeypatch):
    started = process_start()
    assert started is not None and started < IMPORTED

    def no_clock_ticks(name):
        raise ValueError(name)
    monkeypatch.setattr(phases.os, "sysconf", no_clock_ticks)
    assert process_start(fallback=123.0) == 123.0


def test_split_moves_compile_out_of_train_and_other_is_the_remainder():
    clock = PhaseClock(time.perf_counter() - 10.0)
    clock.add("train", 4.0)
    clock.add("eval", 1.5)
    with pytest.raises(KeyError):
        clock.add("lunch", 1.0)
    job_s, split = clock.split(compile_s=1.0)
    assert list(split) == [*NAMES, "other"]
    assert (split["train"], split["compile"], split["eval"]) == (3.0, 1.0, 1.5)
    assert job_s >= 10.0 and split["other"] == pytest.approx(job_s - 5.5)
    assert sum(split.values()) == pytest.approx(job_s, rel=1e-12)


def test_phases_line_format():
    split = dict(startup=8.12, data=0.4, first_decode=0.0, compile=0.0, train=30.2, eval=9.8,
                 checkpoints=1.1, other=1.64)
    assert phases_line(51.26, split) == ("job 51.3 s: start-up 8.1, data 0.4, first decode 0.0, compile 0.0, "
                                         "train 30.2, eval 9.8, checkpoints 1.1, other 1.6")


def test_cli_run_reports_phases_adding_up_to_the_job_from_the_process_start(tiny_data, imagenet_like,
                                                                              tmp_path, capsys):
    """A 2-epoch frozen run through the CLI (cached loader: a decode pass) in this process, so
    the job counts from pytest's own start: start-up covers at least the time before this test."""
    before = time.perf_counter() - process_start()
    out = tmp_path / "run"
    status = cli.main(["train", "--data", str(tiny_data), "--weights", str(imagenet_like), "--strategy", "frozen",
                       "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--workers", "0",
                       "--device", "cpu", "--amp", "off", "--no-compile", "--loader", "cached", "--out", str(out)])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    job_s, split = summary["job_s"], summary["phases_s"]
    assert set(split) == {*NAMES, "other"}  # summary.json's keys are sorted
    assert all(seconds >= 0 for seconds in split.values()), split
    assert sum(split.values()) == pytest.approx(job_s, rel=0.01)
    for name in ("data", "first_decode", "train", "eval", "checkpoints"):
        assert split[name] > 0, name
    assert split["compile"] == 0.0  # --no-compile
    assert split["startup"] >= before and job_s > summary["wall_s"] + before
    assert split["first_decode"] >= summary["cache_decode_s"] - 0.005  # the decode pass (rounded in stats)
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"job \d+\.\d s: start-up \d+\.\d, data \d+\.\d, first decode \d+\.\d, compile 0\.0, "
                        r"train \d+\.\d, eval \d+\.\d, checkpoints \d+\.\d, other \d+\.\d", lines[-2])
    assert lines[-1].startswith("run folder:")


def test_exit_without_teardown_joins_threads_runs_atexit_and_flushes(tmp_path):
    """The program's fast exit after a finished run: nothing a normal exit does for the user is lost."""
    import subprocess
    import sys
    code = f"""
import atexit, pathlib, threading, time
from fastft.cli import exit_without_teardown
out = pathlib.Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
def late():
    time.sleep(0.3)
    (out / "thread").write_text("done")
threading.Thread(target=late).start()
print("buffered line", end="")
exit_without_teardown(3)
print("never")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (3, "buffered line")
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
