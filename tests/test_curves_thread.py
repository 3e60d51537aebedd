"""curves.png drawn on a background thread: the run does not wait for it until its end, the figure
holds every epoch, requests made during a draw are served by one later draw, errors surface once."""

from __future__ import annotations

import json
import threading

import pytest

from fastft import report
from fastft.curves import CurvesThread, MatplotlibMissing
from fastft.errors import WriteError

RECORD = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.5, "test_acc": 0.5}


class GatedDraw:
    """A draw that blocks until the test opens its gate; records the epochs metrics.jsonl held then."""

    def __init__(self, run_dir=None):
        self.run_dir, self.gate, self.started = run_dir, threading.Event(), threading.Event()
        self.seen: list[list[int]] = []
        self.threads: set[str] = set()

    def __call__(self, *args, **kwargs):
        self.threads.add(threading.current_thread().name)
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines() if self.run_dir else []
        self.seen.append([json.loads(line)["epoch"] for line in lines])


def test_requests_during_a_draw_are_served_by_one_later_draw():
    draw = GatedDraw()
    thread = CurvesThread(draw)
    thread.request()
    assert draw.started.wait(10)
    thread.request()   # while the first draw runs: both are served by one second draw
    thread.request()
    draw.gate.set()
    thread.wait()
    assert len(draw.seen) == 2 and draw.threads == {"fastft-curves"}
    thread.request()   # after a wait, a new request starts a new thread
    thread.wait()
    assert len(draw.seen) == 3


def test_a_draw_error_is_raised_once_by_wait_and_later_draws_still_run():
    calls = []

    def draw():
        calls.append(1)
        if len(calls) == 1:
            raise WriteError("curves.png: disk full")
    thread = CurvesThread(draw)
    thread.request()
    with pytest.raises(WriteError, match="^curves.png: disk full$"):
        thread.wait()
    thread.wait()  # raised once
    thread.request()
    thread.wait()
    assert len(calls) == 2


def reporter_with_gated_draw(tmp_path, monkeypatch, epochs: int) -> tuple[report.Reporter, GatedDraw]:
    draw = GatedDraw(tmp_path)
    monkeypatch.setattr(report, "write_run_curves", draw)
    reporter = report.Reporter(tmp_path, enabled=True)
    reporter.write_config({"strategy": "frozen", "epochs": epochs})
    return reporter, draw


def test_the_last_epoch_draws_in_the_background_and_close_waits_for_every_epoch(tmp_path, monkeypatch):
    """The last epoch's draw is asked for even when CURVES_SHARE would skip it, and append_metrics
    returns while it runs (the gate is still shut); close() returns only once it has drawn both epochs."""
    reporter, draw = reporter_with_gated_draw(tmp_path, monkeypatch, epochs=2)
    reporter.append_metrics(RECORD)  # epoch 1 of 2, a short epoch: no draw (CURVES_SHARE)
    reporter.append_metrics({**RECORD, "epoch": 2})
    assert draw.started.wait(10) and draw.seen == []  # drawing, and append_metrics has returned
    opener = threading.Timer(0.2, draw.gate.set)
    opener.start()
    reporter.close()
    opener.join()
    assert draw.seen == [[1, 2]] and draw.threads == {"fastft-curves"}


def test_close_draws_epochs_logged_since_the_last_draw(tmp_path, monkeypatch):
    """A run stopped before its last epoch (an error, Ctrl-C): close() draws what was logged."""
    reporter, draw = reporter_with_gated_draw(tmp_path, monkeypatch, epochs=5)
    draw.gate.set()
    reporter.append_metrics(RECORD)
    reporter.append_metrics({**RECORD, "epoch": 2})
    reporter.curves_thread.wait()
    assert draw.seen == []
    reporter.close()
    assert draw.seen == [[1, 2]]


def test_a_background_write_error_surfaces_as_one_line_at_close(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise WriteError(f"{tmp_path}/curves.png: disk full: 1.0 MB needed, 0 B free; free space there")
    monkeypatch.setattr(report, "write_run_curves", full_disk)
    reporter = report.Reporter(tmp_path, enabled=True)
    reporter.write_config({"strategy": "frozen", "epochs": 1})
    reporter.append_metrics(RECORD)  # the last epoch: drawn on the thread, which fails
    with pytest.raises(WriteError) as raised:
        reporter.close()
    assert "\n" not in raised.value.one_line() and "disk full" in raised.value.one_line()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["epoch"] == 1  # the log is kept


def test_matplotlib_missing_on_the_thread_is_one_warning_and_no_more_draws(tmp_path, monkeypatch, capsys):
    calls = []

    def missing(*args, **kwargs):
        calls.append(1)
        raise MatplotlibMissing("curves need matplotlib (x): pip install matplotlib")
    monkeypatch.setattr(report, "write_run_curves", missing)
    reporter = report.Reporter(tmp_path, enabled=True)
    reporter.write_config({"strategy": "frozen", "epochs": 3})
    reporter.drawn_at -= 1000.0  # long epochs: every epoch asks for a draw
    reporter.append_metrics(RECORD)
    reporter.finish_curves()
    reporter.drawn_at -= 1000.0
    reporter.append_metrics({**RECORD, "epoch": 2})
    reporter.append_metrics({**RECORD, "epoch": 3})
    reporter.close()
    assert calls == [1]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: no {tmp_path}/curves.png: curves need matplotlib (x): pip install matplotlib"]
