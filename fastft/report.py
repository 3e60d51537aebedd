"""What a run tells the world: d2l-style console lines and the run folder's files.

RUN_DIR/config.json   the resolved settings, enough to redo the run
RUN_DIR/metrics.jsonl one JSON line per epoch, for plots
RUN_DIR/summary.json  the final figures
RUN_DIR/curves.png    train loss, train acc, test acc per epoch (fastft.curves), after an epoch
                      when cheap (CURVES_SHARE), after the last epoch and at the run's end; drawn
                      on a background thread, waited for at the run's end (close)
RUN_DIR/tb/           --tensorboard: the same per epoch, plus examples/sec and lr (fastft.tensorboard_log)
Only the main process writes or prints; the others get a silent reporter.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from fastft.curves import CURVES_NAME, CurvesThread, MatplotlibMissing, write_run_curves
from fastft.errors import WriteError
from fastft.phases import phases_line
from fastft.safe_write import write_text_atomic, writing
from fastft.tensorboard_log import TB_DIR, TensorBoardLog


# curves.png is redrawn after an epoch only when the last draw cost at most this share of the
# time since it: ~0.1 s a draw (2 CPU cores) is nothing to a CPU epoch of minutes, but a
# quarter of a 0.4 s GPU epoch of the chapter's 2,000 images. The last epoch and the run's end
# always draw. Drawn on a thread (CurvesThread), a draw still takes its CPU from the steps.
CURVES_SHARE = 0.02
FIRST_DRAW_S = 1.0  # the first draw's guess: matplotlib's import (~0.8 s) and one draw


def write_json_atomic(path: Path, obj: dict) -> None:
    """`obj` as indented JSON, via PATH.tmp renamed over `path`; WriteError (one line) on failure."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one line to `path`; on a failure (WriteError, one line) a part written is cut off
    again, so the log keeps only whole lines."""
    size = path.stat().st_size if path.exists() else 0
    data = (line + "\n").encode()
    try:
        with writing(path, len(data)), open(path, "ab") as handle:
            handle.write(data)
    except WriteError:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        raise


def precision_line(requested: str, resolved: str, device_type: str) -> str:
    """The log's line for the AMP dtype the run computes in: `requested` is --amp (auto|bf16|fp16|
    off), `resolved` Runtime.amp_name (bf16|fp16|off), `device_type` cpu or cuda."""
    what = {"bf16": "bf16 autocast, weights and optimizer in fp32",
            "fp16": "fp16 autocast with loss scaling (GradScaler), weights and optimizer in fp32",
            "off": "off, fp32 throughout"}[resolved]
    if requested != "auto":
        return f"amp: {what} (--amp {requested})"
    where = "this GPU" if device_type == "cuda" else "this CPU"
    why = (f"{where} has fast bf16" if resolved == "bf16" else
           f"{where} has no fast bf16 (no AVX512-BF16 or AMX), where bf16 runs slower than fp32"
           if device_type == "cpu" else f"{where} has no bf16; --amp fp16 uses loss scaling")
    return f"amp: {what} (--amp auto: {why})"


def _parse(line: str) -> dict | None:
    """A metrics line, or None for a line cut short when a run was killed mid-write."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class Reporter:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        """`tensorboard`: also log to RUN_DIR/tb; checked here (the package imports, else a one-line
        ConfigError), so the engine builds the Reporter before any data work."""
        self.run_dir = run_dir
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tensorboard = TensorBoardLog(run_dir / TB_DIR) if enabled and tensorboard else None
        if self.tensorboard is not None:
            self.say(f"tensorboard: per-epoch scalars to {self.tensorboard.log_dir}; view them with "
                     f"`tensorboard --logdir {shlex.quote(os.fspath(run_dir.parent))}`")
        self.config: dict = {}  # the run's config.json, once written: title, epochs, lrs
        self.curves = True  # False once matplotlib was found missing (said once)
        self.undrawn = False  # epochs logged since a draw of curves.png was last asked for
        self.draw_s = FIRST_DRAW_S  # what the last curves.png cost (s), for the next epoch's choice
        self.drawn_at = time.perf_counter()
        self.curves_thread = CurvesThread(self._draw)  # draws on its own thread (request, wait)

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def warn(self, line: str) -> None:
        if self.enabled:
            print(f"warning: {line}", file=sys.stderr, flush=True)

    def progress(self, iterable, total: int, desc: str) -> tqdm:
        # disable=None: a bar on a terminal, nothing in logs or pipes.
        return tqdm(iterable, total=total, desc=desc, leave=False, disable=None if self.enabled else True,
                    unit="batch", dynamic_ncols=True)

    def write_config(self, config: dict) -> None:
        self.config = config
        if self.enabled:
            write_json_atomic(self.run_dir / "config.json", config)

    def keep_metrics_up_to(self, epoch: int) -> None:
        """Drop lines of epochs the checkpoint does not hold (all of them for a fresh run)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if (record := _parse(line)) is not None and record.get("epoch", 0) <= epoch]
        write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))

    def append_metrics(self, record: dict) -> None:
        """Log one epoch: its metrics line, then a redraw of curves.png from every line asked of the
        curves thread (after the planned last epoch always: it draws while the run writes its
        checkpoint), then TensorBoard. An error of an earlier background draw is raised here."""
        if not self.enabled:
            return
        append_line(self.metrics_path, json.dumps(record, sort_keys=True))
        self.undrawn = True
        self._curves_error()
        last = 0 < int(self.config.get("epochs", 0)) <= int(record.get("epoch", 0))
        if last or self.draw_s <= CURVES_SHARE * (time.perf_counter() - self.drawn_at):
            self.draw_curves()
        if self.tensorboard is not None:
            self.tensorboard.add_epoch(record, self.config.get("resolved", {}).get("lr_per_group", []))

    def draw_curves(self) -> None:
        """Ask the curves thread for RUN_DIR/curves.png from every line of metrics.jsonl; returns
        at once (close() waits for it)."""
        if self.curves:
            self.undrawn = False
            self.curves_thread.request()

    def write_curves(self) -> None:
        """RUN_DIR/curves.png from metrics.jsonl, now, on this thread (~0.06 s on 2 CPU cores, plus
        ~0.3 s for the first import of matplotlib), after any background draw; without matplotlib
        one warning, once per run, and no figure. Raises WriteError (one line) when it cannot write."""
        self.finish_curves()
        if self.curves:
            try:
                self._draw()
            except MatplotlibMissing as exc:
                self._no_curves(exc)
            self.undrawn = False

    def _draw(self) -> None:
        """One draw, on the curves thread or the caller's; records its cost for CURVES_SHARE."""
        strategy = self.config.get("strategy", "")
        name = self.run_dir.name
        title = f"{strategy}, {name}" if strategy and name != strategy.replace(":", "") else strategy or name
        start = time.perf_counter()
        try:
            write_run_curves(self.run_dir, title, int(self.config.get("epochs", 0)))
        finally:
            self.drawn_at = time.perf_counter()
            self.draw_s = self.drawn_at - start

    def _no_curves(self, exc: MatplotlibMissing) -> None:
        if self.curves:  # once per run
            self.curves = False
            self.warn(f"no {self.run_dir / CURVES_NAME}: {exc.one_line()}")

    def _curves_error(self) -> None:
        """An error of a background draw already done: MatplotlibMissing is the one warning (no
        more draws), anything else (WriteError: a full disk) is raised."""
        try:
            self.curves_thread.raise_error()
        except MatplotlibMissing as exc:
            self._no_curves(exc)

    def finish_curves(self) -> None:
        """Wait for the curves thread's draws; a MatplotlibMissing there is the one warning, any other
        error is raised."""
        try:
            self.curves_thread.wait()
        except MatplotlibMissing as exc:
            self._no_curves(exc)

    def close(self, raise_errors: bool = True) -> None:
        """The run's end, also on an error or Ctrl-C: curves.png drawn with every logged epoch (the
        background draw waited for; its error raised, as WriteError's one line, or with
        `raise_errors` False, as the run stops for another error, said as a warning), TensorBoard's
        events flushed and its file closed."""
        try:
            if self.enabled and self.undrawn:
                self.draw_curves()
            self.finish_curves()
        except Exception as exc:
            if raise_errors:
                raise
            self.warn(f"no up-to-date {self.run_dir / CURVES_NAME}: {getattr(exc, 'one_line', lambda: exc)()}")
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            write_json_atomic(self.run_dir / "summary.json", summary)

    def epoch_lines(self, record: dict, epochs: int, device: str) -> None:
        self.say(f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.3f}, "
                 f"train acc {record['train_acc']:.3f}, test acc {record['test_acc']:.3f}")
        self.say(f"{record['examples_per_sec']:.1f} examples/sec on [{device}]")

    def final_lines(self, summary: dict) -> None:
        self.say(f"loss {summary['train_loss']:.3f}, train acc {summary['train_acc']:.3f}, "
                 f"test acc {summary['test_acc']:.3f} ({summary['test_examples']} test images)")
        self.say(f"{summary['examples_per_sec']:.1f} examples/sec end-to-end, "
                 f"{summary['examples_per_sec_compute']:.1f} examples/sec compute-only "
                 f"on [{summary['device']}] ({summary['timed']}; compile {summary['compile_s']:.1f} s)")
        if summary.get("eager_fallbacks"):  # the rates above are partly eager, not compiled
            self.warn(f"{summary['eager_fallbacks']} compiled frame(s) hit Dynamo's recompile limit and ran "
                      f"eager; see recompiles in summary.json")
        if "phases_s" in summary:  # where the job's wall time went (fastft.phases)
            self.say(phases_line(summary["job_s"], summary["phases_s"]))
        self.say(f"run folder: {self.run_dir}")
