"""`--tensorboard`: a run's per-epoch scalars in RUN_DIR/tb, through torch.utils.tensorboard.

    fastft train --data synthetic --tensorboard --out runs/s && tensorboard --logdir runs

The step of every scalar is the epoch number (1-based, as in metrics.jsonl), so a resumed run's
curves continue where the checkpoint left them. Only the main process writes (the Reporter of
the others is disabled). The tensorboard package is optional: the Reporter builds this log in
Trainer.setup, before any data work, so a missing package stops the run at once.
"""

from __future__ import annotations

from pathlib import Path

from fastft.errors import ConfigError
from fastft.safe_write import writing

TB_DIR = "tb"
# metrics.jsonl key -> TensorBoard tag; tags group by their prefix in TensorBoard's scalar view.
SCALARS = {
    "train_loss": "loss/train",                                   # cross-entropy per example
    "train_acc": "accuracy/train",
    "test_acc": "accuracy/test",
    "examples_per_sec": "examples_per_sec/end_to_end",            # data loading included
    "examples_per_sec_compute": "examples_per_sec/compute_only",  # the steps alone
}
LR_TAG = "lr/group{}"  # per optimizer parameter group, in config.json's resolved.lr_per_group order


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter; a one-line ConfigError naming the package when the
    tensorboard package (which torch.utils.tensorboard needs) does not import."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({exc}): pip install tensorboard "
                          f"(or run without --tensorboard)") from exc
    return SummaryWriter


class TensorBoardLog:
    """Scalars per epoch in `log_dir`. The writer opens with the first record it is given, so a
    run that fails in setup leaves no folder behind."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer_class = summary_writer_class()  # raises now, not after an epoch
        self.writer = None

    def add_epoch(self, record: dict, lrs: list[float]) -> None:
        """One metrics.jsonl record (needs "epoch"; the keys of SCALARS present are written) and
        the parameter groups' learning rates, at step = record["epoch"]; flushed at once."""
        with writing(self.log_dir):  # a full disk or read-only folder: one line
            self._add(record, lrs)

    def _add(self, record: dict, lrs: list[float]) -> None:
        step = int(record["epoch"])
        if self.writer is None:
            # purge_step: TensorBoard hides events at steps >= this one from earlier event files,
            # i.e. the epochs a resumed run redoes (those its checkpoint did not hold).
            self.writer = self.writer_class(str(self.log_dir), purge_step=step)
        for key, tag in SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, float(record[key]), step)
        for index, lr in enumerate(lrs):
            self.writer.add_scalar(LR_TAG.format(index), float(lr), step)
        self.writer.flush()  # a live `tensorboard --logdir` sees each epoch as it ends

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with writing(self.log_dir):
                writer.close()
