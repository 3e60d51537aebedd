"""curves.png after each epoch when cheap and at the end, `fastft plot` over several runs, and runs without matplotlib."""

from __future__ import annotations

import json
import struct
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from fastft.cli import main
from fastft.curves import (CURVES_NAME, DPI, METRICS, OVERLAY_SIZE_IN, RUN_SIZE_IN, overlay_figure, read_metrics,
                           run_figure, run_labels)
from fastft.errors import WriteError

MATPLOTLIB_MODULES = ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg")
needs_matplotlib = pytest.mark.skipif(find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed: pip install 'fastft[plot]'")


def train_args(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--weights", str(weights), "--image-size", "32", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--amp", "off", "--no-compile", "--loader", "torch",
            "--epochs", "2", "--strategy", "frozen", "--out", str(out), *extra]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in px from a PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def px(size_in: tuple[float, float]) -> tuple[int, int]:
    return round(size_in[0] * DPI), round(size_in[1] * DPI)


def fake_run(folder: Path, strategy: str, test_accs: list[float]) -> Path:
    """A run folder as a finished run leaves it, as far as plotting reads it."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"strategy": strategy}))
    lines = [json.dumps({"epoch": e + 1, "train_loss": 1.0 / (e + 2), "train_acc": 0.5 + 0.1 * e, "test_acc": acc})
             for e, acc in enumerate(test_accs)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def trained(tiny_data, imagenet_like, tmp_path_factory) -> Path:
    """One 2-epoch run shared by the tests below."""
    run = tmp_path_factory.mktemp("curves") / "run"
    assert main(train_args(tiny_data, imagenet_like, run)) == 0
    return run


@needs_matplotlib
def test_a_run_writes_curves_png_of_the_stated_size(trained):
    assert png_size(trained / CURVES_NAME) == px(RUN_SIZE_IN) == (640, 400)
    assert not list(trained.glob("*.tmp"))


@needs_matplotlib
def test_the_run_figure_draws_metrics_jsonl(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    acc_ax, loss_ax = run_figure(read_metrics(trained), "t", epochs=2).axes  # accuracies left, loss right
    lines = {line.get_label(): line for ax in (acc_ax, loss_ax) for line in ax.get_lines()}
    assert list(lines) == ["train acc", "test acc", "train loss"] and loss_ax.get_lines()[0] is lines["train loss"]
    for key, label in METRICS:
        assert list(lines[label].get_xdata()) == [1, 2]
        assert list(lines[label].get_ydata()) == [r[key] for r in records]
    assert acc_ax.get_xlabel() == "epoch" and loss_ax.get_ylabel() == "train loss"
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == ["train loss", "train acc", "test acc"]


@needs_matplotlib
def test_plot_overlays_runs_one_labelled_line_each_per_metric(trained, tmp_path, capsys):
    frozen = fake_run(tmp_path / "a" / "frozen", "frozen", [0.6, 0.7, 0.8])
    scratch = fake_run(tmp_path / "scratch", "scratch", [0.5, 0.55])
    out = tmp_path / "all.png"
    assert main(["plot", str(trained), str(frozen), str(scratch), "--out", str(out)]) == 0
    assert png_size(out) == px(OVERLAY_SIZE_IN)
    assert capsys.readouterr().out.strip() == f"wrote {out}: frozen ({trained.name}), frozen (frozen), scratch"
    labels = ["frozen (run)", "frozen (frozen)", "scratch"]
    runs = [(label, read_metrics(d)) for label, d in zip(labels, [trained, frozen, scratch])]
    figure = overlay_figure(runs)
    assert [ax.get_title() for ax in figure.axes] == [name for _, name in METRICS]
    for ax, (key, _) in zip(figure.axes, METRICS):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == labels
        for line, (_, records) in zip(lines, runs):
            assert list(line.get_ydata()) == [r[key] for r in records]
    assert list(figure.axes[2].get_lines()[1].get_ydata()) == [0.6, 0.7, 0.8]
    accuracies = [r[key] for _, records in runs for r in records for key in ("train_acc", "test_acc")]
    low, high = figure.axes[1].get_ylim()
    assert figure.axes[2].get_ylim() == (low, high) and low <= min(accuracies) and max(accuracies) <= high


def test_runs_of_one_strategy_are_told_apart_by_folder(tmp_path):
    runs = [fake_run(tmp_path / "x" / "lr1", "frozen", [0.5]), fake_run(tmp_path / "x" / "lr2", "frozen", [0.6]),
            fake_run(tmp_path / "y" / "lr2", "frozen", [0.7]), fake_run(tmp_path / "z", "scratch", [0.7])]
    assert run_labels(runs) == ["frozen (lr1)", f"frozen ({runs[1]})", f"frozen ({runs[2]})", "scratch"]


@pytest.mark.parametrize("case, message", [
    ("missing", "no such run folder"),
    ("no-metrics", "no metrics.jsonl"),
    ("empty", "no complete epoch record"),
    ("no-out-folder", "does not exist"),
])
def test_plot_bad_input_is_one_line(tmp_path, capsys, case, message):
    run = tmp_path / "run"
    if case != "missing":
        fake_run(run, "frozen", [0.5])
    if case == "no-metrics":
        (run / "metrics.jsonl").unlink()
    if case == "empty":
        (run / "metrics.jsonl").write_text('{"epoch": 1, "train_lo')  # a line cut short by a kill
    out = tmp_path / ("nowhere/x.png" if case == "no-out-folder" else "x.png")
    assert main(["plot", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastft: error: ") and message in err
    assert not out.exists()


@needs_matplotlib
def test_a_failed_write_keeps_the_last_whole_png(trained, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from fastft.curves import write_run_curves
    before = (trained / CURVES_NAME).read_bytes()

    def dies_midway(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", dies_midway)
    with pytest.raises(WriteError, match=f"^{trained / CURVES_NAME}: disk full: .* free; free space there$"):
        write_run_curves(trained)
    assert (trained / CURVES_NAME).read_bytes() == before and not list(trained.glob("*.tmp"))


def test_without_matplotlib_the_run_completes_with_one_hint(tiny_data, imagenet_like, tmp_path, monkeypatch,
                                                             capsys):
    for name in MATPLOTLIB_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # `import` of these now raises ImportError
    run = tmp_path / "run"
    assert main(train_args(tiny_data, imagenet_like, run)) == 0
    captured = capsys.readouterr()
    hints = [line for line in (captured.out + captured.err).splitlines() if "install" in line]
    assert len(hints) == 1 and "pip install matplotlib" in hints[0] and "fastft[plot]" in hints[0]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert not (run / CURVES_NAME).exists()
    assert main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err


@needs_matplotlib
def test_short_epochs_draw_once_at_the_end(tmp_path, monkeypatch):
    """A draw that would cost more than CURVES_SHARE of its epoch waits for the run's end, which
    always draws every logged epoch."""
    from fastft import report
    draws = []
    monkeypatch.setattr(report, "write_run_curves", lambda run_dir, title, epochs: draws.append(run_dir))
    reporter = report.Reporter(tmp_path, enabled=True)
    reporter.write_config({"strategy": "frozen", "epochs": 4})  # epoch 4, the last, always draws
    record = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.5, "test_acc": 0.5}
    reporter.drawn_at -= 10.0            # a 10 s epoch: the first draw's 1.0 s guess is 10% of it
    reporter.append_metrics(record)
    reporter.append_metrics({**record, "epoch": 2})
    reporter.curves_thread.wait()
    assert draws == []
    reporter.close()
    assert draws == [tmp_path]
    reporter.drawn_at -= 100.0           # a 100 s epoch after a ~0 s draw: drawn at once (on the thread)
    reporter.append_metrics({**record, "epoch": 3})
    reporter.curves_thread.wait()
    assert draws == [tmp_path, tmp_path]
    reporter.close()                     # nothing new since: no second end-of-run draw
    assert len(draws) == 2
