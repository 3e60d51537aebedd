"""Training curves as PNGs: each run's own `curves.png`, and `fastft plot` over several runs (a PNG,
or the format its --out suffix names).

    fastft plot runs/finetune runs/frozen runs/scratch --out strategies.png

A run's figure is the chapter's (d2l.ai 13.2, `train_ch13` drawn by d2l's `Animator`): x =
epoch, the lines "train loss", "train acc" and "test acc", with the loss on a twin axis that
only departs from the accuracies' 0-1 scale when the loss exceeds 1 (see run_figure). The
Reporter redraws it from `metrics.jsonl` after an epoch when that is cheap against the epoch
(~0.1 s a draw; report.CURVES_SHARE), and always after the last epoch and at the run's end,
on a CurvesThread: matplotlib's import and the draw (~0.3 s on 2 cores) overlap the last
checkpoint's write instead of following it. `fastft plot` draws one panel per metric, one line
per run, labelled by strategy.

matplotlib is optional and imported on first use; only its object API is used (a Figure on
the Agg canvas), never pyplot, so no global backend or figure list is touched. Without it,
`MatplotlibMissing` (a one-line ConfigError) names the install.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path

from fastft.errors import CheckpointError, ConfigError
from fastft.safe_write import check_writable, replacing, shown

CURVES_NAME = "curves.png"
PLOT_NAME = "runs-curves.png"  # `fastft plot`'s --out by default, and in an --out folder
METRICS = (("train_loss", "train loss"), ("train_acc", "train acc"), ("test_acc", "test acc"))
D2L_FORMATS = ("-", "m--", "g-.")  # d2l Animator's default fmts, in its legend's order
DPI = 100
RUN_SIZE_IN = (6.4, 4.0)  # inches: a run's curves.png is 640 x 400 px
OVERLAY_SIZE_IN = (15.0, 4.5)  # inches: `fastft plot`'s three panels, 1500 x 450 px
MATPLOTLIB_HINT = "pip install matplotlib (or pip install 'fastft[plot]')"


class MatplotlibMissing(ConfigError):
    """matplotlib does not import; the message names the install."""


def new_figure(size_in: tuple[float, float]):
    """An empty matplotlib Figure of `size_in` inches at DPI, drawn by the Agg canvas (files only).

    Raises MatplotlibMissing when matplotlib does not import."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MatplotlibMissing(f"curves need matplotlib ({exc}): {MATPLOTLIB_HINT}") from exc
    figure = Figure(figsize=size_in, dpi=DPI)
    FigureCanvasAgg(figure)  # binds itself to the figure
    return figure


def read_metrics(run_dir: Path) -> list[dict]:
    """The epoch records of RUN_DIR/metrics.jsonl, in file (epoch) order; a line cut short by a
    kill is skipped. Raises CheckpointError (one line) for a missing folder, a folder without
    metrics.jsonl, or one with no complete epoch record."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no metrics.jsonl (not a fastft run folder, or its first "
                              f"epoch never finished)")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and all(key in record for key, _ in METRICS) and "epoch" in record:
            records.append(record)
    if not records:
        raise CheckpointError(f"{path}: no complete epoch record to plot")
    return records


def column(records: list[dict], key: str) -> list[float]:
    return [float(record[key]) for record in records]


def run_figure(records: list[dict], title: str = "", epochs: int = 0):
    """The chapter's figure for one run: train loss, train acc and test acc against epoch.

    `records`: metrics.jsonl's epoch records; `epochs`: the planned epochs, so the x axis spans
    the whole run from epoch 1 on, as d2l's Animator does (0 = up to the last record).
    The chapter draws all three on one 0-1 axes. Here the accuracies keep that axis (left) and
    the loss (cross-entropy per example) has a twin axis (right) from 0 to max(1, its highest
    value): while the loss stays under 1 the two scales are the same and the figure reads as the
    chapter's; a loss above 1 (a high lr, an early scratch epoch) no longer flattens the
    accuracies, and is not clipped as the chapter's ylim=[0, 1] clips it.
    """
    figure = new_figure(RUN_SIZE_IN)
    acc_ax = figure.add_subplot()
    loss_ax = acc_ax.twinx()
    x = column(records, "epoch")
    lines = []
    for (key, label), fmt in zip(METRICS, D2L_FORMATS):
        ax = loss_ax if key == "train_loss" else acc_ax
        lines += ax.plot(x, column(records, key), fmt, label=label, marker=".")  # a one-epoch run: a point
    losses = [v for v in column(records, "train_loss") if math.isfinite(v)]
    loss_ax.set_ylim(0, max([1.0, *losses]) * 1.05)
    acc_ax.set_ylim(0, 1.05)
    right = max(epochs, int(x[-1]))
    pad = max(0.05 * (right - 1), 0.25)
    acc_ax.set_xlim(1 - pad, right + pad)
    acc_ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)  # epochs are whole numbers
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    loss_ax.set_ylabel("train loss")
    acc_ax.grid(True, alpha=0.3)
    # One row under the axes, as no spot inside is free of lines for every run.
    acc_ax.legend(lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.14),
                  ncol=len(METRICS), frameon=False)
    if title:
        acc_ax.set_title(title, fontsize=10)
    # Fixed margins (room for the legend row): tight_layout would draw the figure twice per epoch.
    figure.subplots_adjust(left=0.09, right=0.91, top=0.92, bottom=0.22)
    return figure


def overlay_figure(runs: list[tuple[str, list[dict]]]):
    """`fastft plot`'s figure: one panel per metric (train loss, train acc, test acc), one line per
    run in each, labelled by the run's label; a line's colour is the same run in every panel.

    Three panels, not the chapter's one axes: five runs of three metrics on one axes are fifteen
    lines that cannot be told apart."""
    figure = new_figure(OVERLAY_SIZE_IN)
    axes = figure.subplots(1, len(METRICS), sharex=True)
    axes[2].sharey(axes[1])  # train and test accuracy on one scale
    for ax, (key, name) in zip(axes, METRICS):
        for label, records in runs:
            ax.plot(column(records, "epoch"), column(records, key), label=label, marker=".")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(0, 1.05)  # accuracies on a run's curves.png scale (run_figure), so figures compare
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def save_png(figure, path: Path, fmt: str = "png") -> Path:
    """Write `figure` as a PNG (or as `fmt`, a format matplotlib writes) to `path` atomically: to
    `path.tmp`, then renamed over `path`, so a run killed mid-write keeps its last whole figure
    (a leftover .tmp is overwritten next time). Raises WriteError (one line) for a full disk or
    a folder that cannot be written."""
    with replacing(path) as tmp:
        figure.savefig(tmp, format=fmt)
    return Path(path)


def image_file(out: Path, default_name: str = PLOT_NAME) -> Path:
    """Where an image option (`fastft plot --out`, `bench --plot`) writes: FOLDER/default_name
    for a folder, else `out`."""
    out = Path(out)
    return out / default_name if out.is_dir() else out


def image_format(out: Path, flag: str) -> str:
    """The format `out`'s suffix names, as matplotlib writes them (png, pdf, svg, jpg, ...), so a
    file is never PNG bytes under another name. Raises ConfigError for a suffix matplotlib does
    not write, MatplotlibMissing without matplotlib."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise MatplotlibMissing(f"{flag} needs matplotlib ({exc}): {MATPLOTLIB_HINT}") from exc
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    fmt = Path(out).suffix.lower().lstrip(".")
    if fmt not in formats:
        why = f"matplotlib writes no .{fmt} images" if fmt else "no suffix to name the image format"
        others = ", ".join(f".{f}" for f in formats if f != "png")
        raise ConfigError(f"{flag} {shown(out)}: {why}; name a .png file (or {others})")
    return fmt


def write_run_curves(run_dir: Path, title: str = "", epochs: int = 0) -> Path:
    """RUN_DIR/curves.png from RUN_DIR/metrics.jsonl (run_figure); raises MatplotlibMissing."""
    return save_png(run_figure(read_metrics(run_dir), title, epochs), Path(run_dir) / CURVES_NAME)


def run_strategy(run_dir: Path) -> str:
    """The strategy recorded in config.json (or summary.json), else the folder's name."""
    for name in ("config.json", "summary.json"):
        try:
            strategy = json.loads((run_dir / name).read_text()).get("strategy")
        except (OSError, ValueError, AttributeError):
            continue
        if strategy:
            return str(strategy)
    return run_dir.name


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's strategy; runs that share one add their folder's name, then its path."""
    labels = [run_strategy(d) for d in run_dirs]
    for name_of in (lambda d: d.name, lambda d: str(d)):
        labels = [f"{run_strategy(d)} ({name_of(d)})" if labels.count(label) > 1 else label
                  for d, label in zip(run_dirs, labels)]
    return labels


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """`fastft plot`: the runs' curves overlaid in one image at image_file(out), in the format
    its suffix names (image_format), written atomically; returns its path.

    Raises CheckpointError for a bad run folder, ConfigError for a missing output folder or a
    suffix matplotlib does not write, WriteError for a folder that cannot be written, and
    MatplotlibMissing, each before anything is written; WriteError for a disk that fills while
    writing."""
    run_dirs, out = [Path(d) for d in run_dirs], image_file(out)
    records = [read_metrics(d) for d in run_dirs]
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    check_writable(out.parent, f"--out {out}")  # before the drawing
    fmt = image_format(out, "--out")
    figure = overlay_figure(list(zip(run_labels(run_dirs), records)))
    return save_png(figure, out, fmt)


class CurvesThread:
    """Runs `draw()` (a run's curves.png from its metrics.jsonl) on a background thread, so the
    run goes on, or writes its last checkpoint, while matplotlib imports and draws.

    request() asks for a draw and returns at once. Draws never overlap, and requests made while
    one runs are served by ONE draw after it: the draw reads metrics.jsonl when it starts, so it
    holds every epoch logged before any of those requests, and the figure on disk only moves
    forward. wait() blocks until no draw is asked for or running, then raises the first error a
    draw raised since the last wait (MatplotlibMissing, WriteError, anything else as raised), once;
    raise_error() does the same without waiting, for errors of draws already done.
    The thread is not a daemon: a process that ends while a draw runs lets it land first (the
    file is replaced atomically either way: a killed draw leaves the last whole figure).
    """

    def __init__(self, draw: Callable[[], None]):
        self._draw = draw
        self._cond = threading.Condition()
        self._wanted = False  # a draw asked for and not yet started
        self._thread: threading.Thread | None = None  # set while the thread has work or is starting
        self._error: BaseException | None = None

    def request(self) -> None:
        with self._cond:
            self._wanted = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fastft-curves", daemon=False)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._wanted:  # said under the lock: a later request starts a new thread
                    self._thread = None
                    self._cond.notify_all()
                    return
                self._wanted = False
            try:
                self._draw()
            except BaseException as exc:  # handed to the run's thread by wait() / raise_error()
                with self._cond:
                    self._error = self._error or exc

    def wait(self) -> None:
        with self._cond:
            while self._thread is not None:
                self._cond.wait()
        self.raise_error()

    def raise_error(self) -> None:
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error
