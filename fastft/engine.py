"""The training run, in named phases: setup -> fit (train_epoch, evaluate, save) -> summary.

    fastft train --data synthetic                                      # one process
    torchrun --standalone --nproc_per_node=4 -m fastft train ...       # DDP, 4 processes
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 -m fastft train ...             # DDP, 2 machines

The loss follows the chapter: per-example cross-entropy summed over the batch,
so `--lr` is the step per summed example gradient (see README, "lr and the loss").
`--batch-size` is the global batch; under DDP each process takes batch/world.

Hot loop rule: no host-device sync per step. Loss and accuracy accumulate in
device tensors and are read (and summed over processes) once per epoch; step
times use CUDA events. Only the main process (rank 0) prints and writes files.
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastft import __version__, distributed
from fastft.checkpoint import checkpoint_path, load_checkpoint, restore_rng, rng_state, save_atomic
from fastft.config import TrainConfig, validate
from fastft.data import build_loaders, resolve_data_dir
from fastft.data.layout import scan_dataset
from fastft.errors import CheckpointError, ConfigError
from fastft.forward import Forward
from fastft.model import build_resnet18, load_matching, source_weights
from fastft.optim import build_optimizer
from fastft.report import Reporter
from fastft.resources import compiled_graphs, peak_memory_mb, reset_peak_memory
from fastft.rundir import adopt_saved_config, choose_run_dir
from fastft.runtime import pick_device, resolve_runtime
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
        validate(self.cfg)
        self.launch = distributed.launch_from_env()
        # The process group's backend follows the device typed now; a resumed run may record another.
        self.group_device = pick_device(self.cfg.device).type
        distributed.start(self.launch, self.group_device, self.cfg.dist_timeout_s)
        # Rank 0 names the run folder (its default name holds the start time) for everyone.
        self.run_dir = distributed.from_main(choose_run_dir(self.cfg) if self.launch.rank == 0 else None)
        saved = load_checkpoint(self.run_dir) if self.cfg.resume else None
        warnings = []
        if saved:
            self.cfg, warnings = adopt_saved_config(self.cfg, saved["config"], self.typed)
        self.rt = resolve_runtime(self.cfg, self.launch)
        self._check_distributed_settings()
        self.reporter = Reporter(self.run_dir, self.rt.is_main)
        for line in warnings:
            self.reporter.warn(line)
        self.strategy = get_strategy(self.cfg.strategy)  # a typo fails before any data work
        reset_peak_memory(self.rt.device)
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        with distributed.local_main_first(self.launch):  # one download per machine
            self._setup_data()
            self._setup_model(saved)
        self._setup_optimizer()
        if saved:
            self._restore(saved)
        self._wrap_model()
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.reporter.keep_metrics_up_to(self.start_epoch)  # a fresh run in a used folder: a fresh log
        self.reporter.write_config({**self.cfg.to_dict(), "resolved": self._resolved()})
        return self

    def _check_distributed_settings(self) -> None:
        if self.rt.distributed and self.rt.device.type != self.group_device:
            raise ConfigError(f"the resumed run uses --device {self.cfg.device}, but the processes joined a "
                              f"{self.group_device} group; type --device {self.rt.device.type} or "
                              f"--device {self.group_device} with --resume")
        if self.cfg.sync_bn and self.rt.distributed and self.rt.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel); "
                              "drop --sync-bn on CPU: BN statistics are then per process")

    def _setup_data(self) -> None:
        self.data_dir = resolve_data_dir(self.cfg)
        # --skip-bad decodes every file once, so no bad file can stop the run later.
        skip = self.cfg.skip_bad
        self.layout = scan_dataset(self.data_dir, full_decode=skip, progress=skip and self.rt.is_main,
                                   skip_bad=skip)
        if self.layout.dropped:
            path, reason = self.layout.dropped[0]
            self.reporter.warn(f"--skip-bad: left out {len(self.layout.dropped)} bad file(s); "
                               f"the first, {path}: {reason}")
        self.data = build_loaders(self.cfg, self.layout, self.rt)
        self.reporter.say(
            f"data {self.data_dir}: {self.data.train_size} train / {self.data.test_size} test images, "
            f"classes {list(self.data.classes)}, loader {self.data.name}")
        for line in self.data.describe():
            self.reporter.say(line)

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
        if self.cfg.sync_bn and self.rt.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.rt.device, memory_format=self.rt.memory_format)
        # Each process draws its own augmentation numbers from here on; the model above
        # is built from the same seed everywhere.
        torch.manual_seed(self.cfg.seed + self.rt.rank)

    def _setup_optimizer(self) -> None:
        groups = self.strategy.param_groups(self.model, self.cfg.lr, self.cfg.head_lr_mult)
        self.optimizer = build_optimizer(groups, self.cfg, self.rt.device)
        # Only fp16 needs loss scaling; a disabled scaler passes everything straight through.
        self.scaler = torch.amp.GradScaler(self.rt.device.type, enabled=self.rt.amp_dtype == torch.float16)

    def _wrap_model(self) -> None:
        """The forward as it will run: frozen fast path, DDP, compile (built after any resume)."""
        self.forward = Forward(self.model, self.strategy.frozen_stages, self.cfg.fast_frozen, self.rt,
                               self.cfg.compile_mode)
        if self.forward.prefix is not None:
            self.reporter.say(f"fast path: {self.strategy.frozen_stages} frozen stage(s) run BN-folded "
                              f"without autograd" + ("; test features computed once and kept"
                                                     if self.forward.cache is not None else ""))
        self.graphs_before = compiled_graphs()

    def _restore(self, saved: dict) -> None:
        if list(saved["classes"]) != list(self.data.classes):
            raise CheckpointError(f"{self.run_dir}: the run was trained on classes {list(saved['classes'])}, "
                                  f"the dataset now has {list(self.data.classes)}")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self._restore_rng(saved)
        self.start_epoch = saved["epoch"]
        self.reporter.say(f"resumed {self.run_dir} after epoch {self.start_epoch}")

    def _restore_rng(self, saved: dict) -> None:
        per_rank = saved.get("rng_per_rank") or [saved["rng"]]
        loaders = saved.get("loader_per_rank") or [None] * len(per_rank)
        if len(per_rank) == self.rt.world_size:
            restore_rng(per_rank[self.rt.rank])
            self.data.load_state_dict(loaders[self.rt.rank])
        else:
            self.reporter.warn(f"the run was saved by {len(per_rank)} processes and resumes with "
                               f"{self.rt.world_size}; random streams restart from the seed")

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
        if self.cfg.loss_reduction == "sum":
            # DDP averages gradients over processes; the chapter's update is their sum.
            loss = loss * self.rt.world_size
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
        total_loss, total_correct, total = self._sum_over_ranks(loss_sum, correct, examples)
        self.timings.append(EpochTiming(int(total), wall, clock.durations_s(),
                                        first_batch * self.rt.world_size, first_step_wall))
        return {"train_loss": total_loss / total, "train_acc": total_correct / total,
                "examples": int(total), "epoch_s": wall}

    def _sum_over_ranks(self, *values) -> list[float]:
        """Per-process totals summed over all processes: the epoch's one read of device values."""
        stacked = torch.stack([torch.as_tensor(v, device=self.rt.device).double() for v in values])
        return distributed.sum_over_ranks(stacked).tolist()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, int]:
        """Test accuracy over every test image, each counted once over all processes."""
        self.model.eval()
        cache = self.forward.cache
        if cache is not None and cache.ready:  # a frozen backbone: the head alone on kept features
            counts = self.forward.cached_accuracy((), self._autocast)
        else:
            batches = self.reporter.progress(self.data.test_batches(), len(self.data.test_batches()), "test")
            on_device = (self._to_device(x, y) for x, y in batches)
            counts = self.forward.cached_accuracy(on_device, self._autocast)
            if counts is None:
                counts = self._full_evaluation(on_device)
        total_correct, total = self._sum_over_ranks(*counts)
        return total_correct / max(total, 1), int(total)

    def _full_evaluation(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        correct = torch.zeros((), dtype=torch.int64, device=self.rt.device)
        count = torch.zeros((), dtype=torch.int64, device=self.rt.device)
        for x, y in batches:
            with self._autocast():
                logits = self.forward(x)
            correct += (logits.argmax(dim=1) == y).sum()
            count += y.shape[0]
        return correct, count

    # --- the run -----------------------------------------------------------------------
    def fit(self) -> dict:
        started = time.perf_counter()
        record, graphs_after_warmup = None, None
        for epoch in range(self.start_epoch, self.cfg.epochs):
            record = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            record["test_acc"], record["test_examples"] = self.evaluate()
            graphs_after_warmup = compiled_graphs() if graphs_after_warmup is None else graphs_after_warmup
            timing = self.timings[-1]
            record["examples_per_sec"] = timing.examples / timing.wall_s
            record["examples_per_sec_compute"] = timing.examples / sum(timing.step_s)
            self.save_checkpoint(epoch + 1)  # before the metrics line, so resume never duplicates one
            self.reporter.append_metrics(record)
            self.reporter.epoch_lines(record, self.cfg.epochs, str(self.rt.device))
        if record is None:
            raise ConfigError(f"{self.run_dir} already finished {self.start_epoch} epochs; "
                              f"pass a larger --epochs to train on")
        summary = self._summary(record, time.perf_counter() - started, graphs_after_warmup)
        self.reporter.write_summary(summary)
        self.reporter.final_lines(summary)
        return summary

    def save_checkpoint(self, epochs_done: int) -> None:
        # Every process's random stream and loader position, for an exact resume.
        rngs = distributed.gather_to_all(rng_state())
        loaders = distributed.gather_to_all(self.data.state_dict())
        if not self.rt.is_main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": epochs_done, "rng": rngs[0],
                 "rng_per_rank": rngs, "loader_per_rank": loaders, "config": self.cfg.to_dict(), "classes": list(self.data.classes),
                 "world_size": self.rt.world_size, "fastft_version": __version__}
        save_atomic(state, checkpoint_path(self.run_dir))

    def _replicas_identical(self) -> bool:
        """DDP keeps replicas equal; a silent divergence would make rank 0's checkpoint a lie."""
        if not self.rt.distributed:
            return True
        prints = distributed.gather_to_all(distributed.replica_fingerprint(self.model.parameters()))
        return all(p == prints[0] for p in prints)

    def _summary(self, last: dict, wall_s: float, graphs_after_warmup: int) -> dict:
        graphs = compiled_graphs()
        return {
            "strategy": self.cfg.strategy, "epochs": last["epoch"],
            "train_loss": last["train_loss"], "train_acc": last["train_acc"],
            "test_acc": last["test_acc"], "test_examples": last["test_examples"],
            **steady_rates(self.timings, self.rt.compile),
            "compiled_graphs": graphs - self.graphs_before, "recompiles": graphs - graphs_after_warmup,
            "peak_mem_mb": peak_memory_mb(self.rt.device),
            "world_size": self.rt.world_size, "replicas_identical": self._replicas_identical(),
            "device": str(self.rt.device), "loader": self.data.name,
            "amp": self.rt.amp_name, "compile": self.rt.compile, "channels_last": self.rt.channels_last,
            "batch_size": self.cfg.batch_size, "image_size": self.cfg.image_size, "wall_s": wall_s,
        }


def train(cfg: TrainConfig, typed: frozenset[str] | None = None) -> dict:
    summary = Trainer(cfg, typed).setup().fit()
    distributed.stop()
    return summary
