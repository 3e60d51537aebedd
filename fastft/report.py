"""What a run tells the world: d2l-style console lines and the run folder's files.

RUN_DIR/config.json   the resolved settings, enough to redo the run
RUN_DIR/metrics.jsonl one JSON line per epoch, for plots
RUN_DIR/summary.json  the final figures
Only the main process writes or prints; the others get a silent reporter.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from fastft.phases import phases_line


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _parse(line: str) -> dict | None:
    """A metrics line, or None for a line cut short when a run was killed mid-write."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class Reporter:
    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir = run_dir
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"

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
        if self.enabled:
            write_json_atomic(self.run_dir / "config.json", config)

    def keep_metrics_up_to(self, epoch: int) -> None:
        """Drop lines of epochs the checkpoint does not hold (all of them for a fresh run)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if (record := _parse(line)) is not None and record.get("epoch", 0) <= epoch]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def append_metrics(self, record: dict) -> None:
        if self.enabled:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")

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
