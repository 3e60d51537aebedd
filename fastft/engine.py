"""The training run, in named phases: setup -> fit (train_epoch, evaluate, save) -> summary.

Single process:   fastft train --data synthetic
The loss follows the chapter: per-example cross-entropy summed over the batch,
so `--lr` is the step per summed example gradient (see README, "lr and the loss").

Hot loop rule: no host-device sync per step. Loss and accuracy accumulate in
device tensors and are read once per epoch; step times use CUDA events.
"""

from __future__ import annotations

import os
import random
import time

import torch
import torch.nn.functional as F

from fastft import __version__
from fastft.checkpoint import checkpoint_path, load_checkpoint, restore_rng, rng_state, save_atomic
from fastft.config import TrainConfig, validate
from fastft.data import build_loaders, resolve_data_dir
from fastft.data.layout import scan_dataset
from fastft.errors import CheckpointError, ConfigError
from fastft.model import build_resnet18, load_matching, source_weights
from fastft.report import Reporter
from fastft.rundir import adopt_saved_config, choose_run_dir
from fastft.runtime import resolve_runtime
from fastft.strategy import get_strategy
from fastft.timing import EpochTiming, StepClock, steady_rates, sync


class Trainer:
    def __init__(self, cfg: TrainConfig, typed: frozenset[str] | None = None):
        self.cfg = cfg
        self.typed = typed  # options typed on the command line (None: all of cfg), for --resume
        self.start_epoch = 0
        self.timings: list[EpochTiming] = []

    # --- setup -------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("multi-process launch (torchrun) is not supported yet; run fastft train directly")
        validate(self.cfg)
        self.run_dir = choose_run_dir(self.cfg)
        saved = load_checkpoint(self.run_dir) if self.cfg.resume else None
        warnings = []
        if saved:
            self.cfg, warnings = adopt_saved_config(self.cfg, saved["config"], self.typed)
        self.rt = resolve_runtime(self.cfg)
        self.reporter = Reporter(self.run_dir, self.rt.is_main)
        for line in warnings:
            self.reporter.warn(line)
        self.strategy = get_strategy(self.cfg.strategy)  # a typo fails before any data work
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        self._setup_data()
        self._setup_model(saved)
        self._setup_optimizer()
        if saved:
            self._restore(saved)
        self.forward = torch.compile(self.model) if self.rt.compile else self.model
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.reporter.keep_metrics_up_to(self.start_epoch)  # a fresh run in a used folder: a fresh log
        self.reporter.write_config({**self.cfg.to_dict(), "resolved": self._resolved()})
        return self

    def _setup_data(self) -> None:
        self.data_dir = resolve_data_dir(self.cfg)
        self.layout = scan_dataset(self.data_dir)
        self.data = build_loaders(self.cfg, self.layout, self.rt)
        self.reporter.say(
            f"data {self.data_dir}: {self.data.train_size} train / {self.data.test_size} test images, "
            f"classes {list(self.data.classes)}, loader {self.data.name}")

    def _setup_model(self, saved: dict | None) -> None:
        model = build_resnet18(len(self.data.classes))
        if saved is None:  # a resumed run takes every tensor from its checkpoint, no download
            weights = self.cfg.weights or self.strategy.default_weights
            source, label = source_weights(weights)
            if source is not None:
                for line in load_matching(model, source, label).lines():
                    self.reporter.say(line)
            self.strategy.init_head(model, source, list(self.data.classes))
        self.strategy.freeze(model)
        self.model = model.to(self.rt.device, memory_format=self.rt.memory_format)

    def _setup_optimizer(self) -> None:
        groups = self.strategy.param_groups(self.model, self.cfg.lr, self.cfg.head_lr_mult)
        fused = self.rt.device.type == "cuda"
        self.optimizer = torch.optim.SGD(groups, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                         weight_decay=self.cfg.weight_decay,
                                         fused=fused or None, foreach=None if fused else True)
        # Only fp16 needs loss scaling; a disabled scaler passes everything straight through.
        self.scaler = torch.amp.GradScaler(self.rt.device.type, enabled=self.rt.amp_dtype == torch.float16)

    def _restore(self, saved: dict) -> None:
        if list(saved["classes"]) != list(self.data.classes):
            raise CheckpointError(f"{self.run_dir}: the run was trained on classes {list(saved['classes'])}, "
                                  f"the dataset now has {list(self.data.classes)}")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        restore_rng(saved["rng"])
        self.start_epoch = saved["epoch"]
        self.reporter.say(f"resumed {self.run_dir} after epoch {self.start_epoch}")

    def _resolved(self) -> dict:
        return {"device": str(self.rt.device), "amp": self.rt.amp_name, "compile": self.rt.compile,
                "workers": self.rt.workers, "world_size": self.rt.world_size,
                "data_dir": str(self.data_dir), "loader": self.data.name,
                "classes": list(self.data.classes), "fastft_version": __version__}

    # --- the hot loop ------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.rt.device, non_blocking=True, memory_format=self.rt.memory_format)
        return x, y.to(self.rt.device, non_blocking=True)

    def _autocast(self):
        dtype = self.rt.amp_dtype
        return torch.autocast(self.rt.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step; returns this batch's summed loss and correct count, on the device."""
        with self._autocast():
            logits = self.forward(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        loss = losses.sum() if self.cfg.loss_reduction == "sum" else losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return losses.detach().sum(), (logits.detach().argmax(dim=1) == y).sum()

    def train_epoch(self, epoch: int) -> dict:
        self.strategy.set_train_mode(self.model)
        device = self.rt.device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        clock, examples, first_batch, first_step_wall = StepClock(device), 0, 0, 0.0
        batches = self.reporter.progress(self.data.train_batches(epoch), self.data.steps_per_epoch(),
                                         f"epoch {epoch + 1}/{self.cfg.epochs}")
        start = time.perf_counter()
        for x, y in batches:
            x, y = self._to_device(x, y)
            clock.start()
            batch_loss, batch_correct = self.train_step(x, y)
            clock.stop()
            loss_sum += batch_loss
            correct += batch_correct
            examples += y.shape[0]
            if not first_batch:  # once per epoch: the warm-up step's true end
                sync(device)
                first_batch, first_step_wall = y.shape[0], time.perf_counter() - start
        sync(device)
        wall = time.perf_counter() - start
        self.timings.append(EpochTiming(examples, wall, clock.durations_s(), first_batch, first_step_wall))
        return {"train_loss": loss_sum.item() / examples, "train_acc": correct.item() / examples,
                "examples": examples, "epoch_s": wall}

    @torch.no_grad()
    def evaluate(self) -> tuple[float, int]:
        """Test accuracy over every test image; returns (accuracy, images counted)."""
        self.model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.rt.device)
        count = torch.zeros((), dtype=torch.int64, device=self.rt.device)
        batches = self.reporter.progress(self.data.test_batches(), len(self.data.test_batches()), "test")
        for x, y in batches:
            x, y = self._to_device(x, y)
            with self._autocast():
                logits = self.forward(x)
            correct += (logits.argmax(dim=1) == y).sum()
            count += y.shape[0]
        n = int(count.item())
        return correct.item() / max(n, 1), n

    # --- the run -----------------------------------------------------------------------
    def fit(self) -> dict:
        started = time.perf_counter()
        record = None
        for epoch in range(self.start_epoch, self.cfg.epochs):
            record = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            record["test_acc"], record["test_examples"] = self.evaluate()
            timing = self.timings[-1]
            record["examples_per_sec"] = timing.examples / timing.wall_s
            record["examples_per_sec_compute"] = timing.examples / sum(timing.step_s)
            self.save_checkpoint(epoch + 1)  # before the metrics line, so resume never duplicates one
            self.reporter.append_metrics(record)
            self.reporter.epoch_lines(record, self.cfg.epochs, str(self.rt.device))
        if record is None:
            raise ConfigError(f"{self.run_dir} already finished {self.start_epoch} epochs; "
                              f"pass a larger --epochs to train on")
        summary = self._summary(record, time.perf_counter() - started)
        self.reporter.write_summary(summary)
        self.reporter.final_lines(summary)
        return summary

    def save_checkpoint(self, epochs_done: int) -> None:
        if not self.rt.is_main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": epochs_done, "rng": rng_state(),
                 "config": self.cfg.to_dict(), "classes": list(self.data.classes),
                 "fastft_version": __version__}
        save_atomic(state, checkpoint_path(self.run_dir))

    def _summary(self, last: dict, wall_s: float) -> dict:
        return {
            "strategy": self.cfg.strategy, "epochs": last["epoch"],
            "train_loss": last["train_loss"], "train_acc": last["train_acc"],
            "test_acc": last["test_acc"], "test_examples": last["test_examples"],
            **steady_rates(self.timings, self.rt.compile),
            "world_size": self.rt.world_size, "device": str(self.rt.device), "loader": self.data.name,
            "amp": self.rt.amp_name, "compile": self.rt.compile, "channels_last": self.rt.channels_last,
            "batch_size": self.cfg.batch_size, "image_size": self.cfg.image_size, "wall_s": wall_s,
        }


def train(cfg: TrainConfig, typed: frozenset[str] | None = None) -> dict:
    return Trainer(cfg, typed).setup().fit()
