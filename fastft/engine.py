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

import math
import random
import time
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastft import __version__, distributed
from fastft.checkpoint import CheckpointWriter, checkpoint_path, load_checkpoint, restore_rng, rng_state
from fastft.compile_cache import compile_key, mark_warm, settle_compile
from fastft.config import TrainConfig, oversized_batch_line, validate
from fastft.data import build_loaders, resolve_data_dir
from fastft.data.layout import check_classes, scan_dataset
from fastft.errors import CheckpointError, ConfigError, WriteError
from fastft.fastpath import TrainFeatures
from fastft.forward import Forward, compile_fallbacks, fast_path_line
from fastft.models import get_spec
from fastft.models.for_run import build_run_model
from fastft.optim import build_optimizer
from fastft.phases import PhaseClock
from fastft.report import Reporter, precision_line
from fastft.resources import compiled_graphs, reset_peak_memory
from fastft.rundir import adopt_saved_config, cache_notes, choose_run_dir
from fastft.run_record import resolved_settings, run_summary
from fastft.run_faults import guard
from fastft.safe_write import shown
from fastft.runtime import check_distributed_settings, cudnn_benchmark, pick_device, resolve_runtime
from fastft.strategy import get_strategy
from fastft.step_threads import StepThreads
from fastft.threads import CpuSample
from fastft.timing import EpochTiming, StepClock, sync
from fastft.weights import save_run_weights


class Trainer:
    def __init__(self, cfg: TrainConfig, typed: frozenset[str] | None = None, job_start: float | None = None,
                 cpu_since: CpuSample | None = None, ahead=None):
        self.cfg = cfg
        # job_start: the process start (perf_counter scale) from the CLI; None = now (bench, library).
        self.phases = PhaseClock(job_start)
        # Where the window that reads other processes' load starts (fastft.threads); None = setup.
        self.cpu_since = cpu_since
        self.ahead = ahead  # data.decode_ahead's child (the CLI starts it before torch loads), or None
        self.typed = typed  # options typed on the command line (None: all of cfg), for --resume
        self.start_epoch = 0
        self.timings: list[EpochTiming] = []
        self.checkpoints = CheckpointWriter()  # one background write at a time

    # --- setup -------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        self.phases.setup_begins()
        self.cpu_since = self.cpu_since or CpuSample.take()
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
            if saved["epoch"] >= self.cfg.epochs:  # said before any data or model work
                raise ConfigError(f"{self.run_dir} already finished {saved['epoch']} epochs; "
                                  f"pass a larger --epochs to train on")
        self.rt = resolve_runtime(self.cfg, self.launch)
        check_distributed_settings(self.cfg, self.rt, self.group_device)
        # --tensorboard's package is checked here, before any data work.
        self.reporter = Reporter(self.run_dir, self.rt.is_main, tensorboard=self.cfg.tensorboard)
        self.reporter.say(f"run folder: {self.run_dir}")  # first, so a stopped run can be found
        for line in [*warnings, *cache_notes()]:
            self.reporter.warn(line)
        self._choose_model()  # a typo in the strategy or model fails before any data work
        self.peak_reset = reset_peak_memory(self.rt.device)  # False: the peak covers earlier runs too
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        with distributed.local_main_first(self.launch):  # one download per machine
            self._scan_data()
            self._setup_model(saved)
        self._build_data()  # outside: --loader auto's choice is agreed on by every process
        self._set_threads()  # before the first step: Inductor's C++ kernels bake the count in
        self._set_cudnn_benchmark()
        self._setup_optimizer()
        if saved:
            self._restore(saved)
        self._wrap_model()
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.reporter.keep_metrics_up_to(self.start_epoch)  # a fresh run in a used folder: a fresh log
        self.reporter.write_config({**self.cfg.to_dict(), "resolved": resolved_settings(self)})
        return self

    def _choose_model(self) -> None:
        """The strategy and the model by name; --image-size 0 becomes the model's own size."""
        self.strategy = get_strategy(self.cfg.strategy)
        self.spec = get_spec(self.cfg.model)
        self.cfg.image_size = self.cfg.image_size or self.spec.preprocessing().image_size

    def _set_cudnn_benchmark(self) -> None:
        """Set for every run (a bench process runs several): on where all train steps share a shape."""
        sizes = self.data.train_batch_sizes()
        self.cudnn_benchmark = cudnn_benchmark(self.rt.device, sizes)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.rt.device.type == "cuda":
            self.reporter.say(f"cudnn.benchmark {'on' if self.cudnn_benchmark else 'off'}: train batches of "
                              f"{sorted(sizes)} image(s) per process")

    def _set_threads(self) -> None:
        """torch's intra-op threads for the step, from the cores this process really has (step_threads)."""
        self.threads = StepThreads(self.cfg.threads, self.rt, self.data.name, getattr(self.data, "threads", 0),
                                   self.launch.local_world_size)
        self.reporter.say(self.threads.start(self.cpu_since).line())

    def _scan_data(self) -> None:
        started = time.perf_counter()
        self.data_dir = resolve_data_dir(self.cfg)
        # --skip-bad decodes every file once, so no bad file can stop the run later.
        skip = self.cfg.skip_bad
        self.layout = scan_dataset(self.data_dir, full_decode=skip, progress=skip and self.rt.is_main,
                                   skip_bad=skip)
        check_classes(self.layout)  # one class would train to loss 0 while learning nothing
        if self.layout.dropped:
            path, reason = self.layout.dropped[0]
            self.reporter.warn(f"--skip-bad: left out {len(self.layout.dropped)} bad file(s); "
                               f"the first, {path}: {reason}")
        for line in self.layout.warnings:  # classes the test split lacks, empty test folders
            self.reporter.warn(line)
        self.scan_s = time.perf_counter() - started

    def _build_data(self) -> None:
        started = time.perf_counter()
        # --compile auto weighs the work ahead, known from here on; the loaders need the answer.
        self.rt, self.compile_reason = settle_compile(self.cfg, self.rt, len(self.layout.files["train"]),
                                                      len(self.layout.files["test"]))
        self.reporter.say(self.compile_reason)
        self.reporter.say(precision_line(self.cfg.amp, self.rt.amp_name, self.rt.device.type))
        try:
            self.data = build_loaders(self.cfg, self.layout, self.rt, self.preprocessing,
                                      self.strategy.bn_downsample(self.structure), self.ahead)
        finally:  # reaped before the thread count reads this process's CPU time (children's included)
            self.close_ahead()
        self.phases.data_ready(self.scan_s + time.perf_counter() - started, getattr(self.data, "decode_s", 0.0))
        self.reporter.say(
            f"data {self.data_dir}: {self.data.train_size} train / {self.data.test_size} test images, "
            f"classes {list(self.data.classes)}, loader {self.data.name}")
        for line in self.data.describe():
            self.reporter.say(line)
        oversized = oversized_batch_line(self.cfg.batch_size, self.data.train_size, self.rt.world_size)
        if oversized:
            self.reporter.warn(oversized)

    def close_ahead(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
            self.ahead = None

    def _setup_model(self, saved: dict | None) -> None:
        self.model, self.structure = build_run_model(self.spec, self.strategy, self.cfg, self.rt,
                                                     list(self.layout.classes), self.reporter.say, saved is None)
        self.preprocessing = self.spec.preprocessing().at_size(self.cfg.image_size)
        # Each process draws its own augmentation numbers from here on; the model above
        # is built from the same seed everywhere.
        torch.manual_seed(self.cfg.seed + self.rt.rank)

    def _setup_optimizer(self) -> None:
        groups = self.strategy.param_groups(self.model, self.cfg.lr, self.cfg.head_lr_mult, self.structure)
        self.optimizer = build_optimizer(groups, self.cfg, self.rt.device)
        # Only fp16 needs loss scaling; a disabled scaler passes everything straight through.
        self.scaler = torch.amp.GradScaler(self.rt.device.type, enabled=self.rt.amp_dtype == torch.float16)

    def _wrap_model(self) -> None:
        """The forward as it will run: frozen fast path, DDP, compile (built after any resume)."""
        keeps = self.strategy.keep_train_features  # its features come from the prefix: always split
        self.forward = Forward(self.model, self.strategy.frozen_units(self.structure), self.cfg.fast_frozen or keeps,
                               self.rt, self.cfg.compile_mode, self.structure)
        self.train_features = self._train_features() if keeps else None
        line = fast_path_line(self.spec.name, self.structure, self.strategy.frozen_units(self.structure), self.forward)
        if line:
            self.reporter.say(line)
        self.graphs_before, self.fallbacks_before = compiled_graphs(), compile_fallbacks()

    def _train_features(self) -> TrainFeatures:
        """Kept train features, for a strategy that keeps them (probe); filled in the first epoch."""
        if not self.cfg.fast_frozen:
            self.reporter.warn(f"--no-fast-frozen does not apply to --strategy {self.strategy.name}: "
                               f"its kept features come from the BN-folded prefix")
        rt = self.rt
        kept = TrainFeatures(self.data.train_size, self.cfg.batch_size // rt.world_size, self.cfg.seed,
                             rt.rank, rt.world_size, drop_ragged=rt.compile)
        self.reporter.say(f"{self.strategy.name}: train images take the test transform (no augmentation); "
                          f"their features are computed in the first epoch and kept, and every epoch trains "
                          f"the head on them: {kept.steps} steps of {kept.batch} per process")
        return kept

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
            note = restore_rng(per_rank[self.rt.rank], self.rt.device)
            if note:
                self.reporter.warn(note)
            self.data.load_state_dict(loaders[self.rt.rank])
        else:
            self.reporter.warn(f"the run was saved by {len(per_rank)} processes and resumes with "
                               f"{self.rt.world_size}; random streams restart from the seed")

    # --- the hot loop ------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One call per batch: the backend knows its batches (uint8 pixels are normalised there)."""
        return self.data.to_device(x, y)

    def _autocast(self):
        dtype = self.rt.amp_dtype
        return torch.autocast(self.rt.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, features: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step; returns this batch's summed loss and correct count, on the device.
        `features`: x is kept (N, 512) features of the frozen backbone, and the head alone runs."""
        with self._autocast():
            logits = self.forward.head(x) if features else self.forward(x)
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
        self.strategy.set_train_mode(self.model, self.structure)
        device = self.rt.device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        clock, examples, first_batch, first_step_wall = StepClock(device), 0, 0, 0.0
        source, steps = self._train_source(epoch)
        batches = self.reporter.progress(source, steps, f"epoch {epoch + 1}/{self.cfg.epochs}")
        start = time.perf_counter()
        for x, y in batches:
            clock.start()
            batch_loss, batch_correct = self.train_step(x, y, features=self.train_features is not None)
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
        # The first batch's wait (loader start, first decode, copy to the device) = the first step's
        # wall from the epoch start less the step itself: no clock reading in the loop.
        first_wait = first_step_wall - self.timings[-1].step_s[0]
        self.phases.train_epoch(wall, first_wait, first=epoch == self.start_epoch)
        return {"train_loss": total_loss / total, "train_acc": total_correct / total,
                "examples": int(total), "epoch_s": wall}

    def _train_source(self, epoch: int) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], int]:
        """(batches on the device, steps per process) for one epoch: the backend's augmented
        batches, or, with kept train features, this epoch's shuffled features."""
        if self.train_features is None:
            batches = self.data.train_batches(epoch)
            return (self._to_device(x, y) for x, y in batches), self.data.steps_per_epoch()
        return self._kept_feature_batches(epoch), self.train_features.steps

    def _kept_feature_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first call (of a run, or after a resume) fills the features: one forward pass over
        the train split through the test transform, inside the epoch's wall time."""
        if not self.train_features.ready:
            source = self.data.train_eval_batches()
            batches = self.reporter.progress(source, len(source), "train features")
            with self._autocast():
                self.train_features.fill((self._to_device(x, y) for x, y in batches), self.forward.features)
        yield from self.train_features.epoch_batches(epoch)

    def _sum_over_ranks(self, *values) -> list[float]:
        """Per-process totals summed over all processes: the epoch's one read of device values."""
        stacked = torch.stack([torch.as_tensor(v, device=self.rt.device).double() for v in values])
        return distributed.sum_over_ranks(stacked).tolist()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, int]:
        """Test accuracy over every test image, each counted once over all processes.

        Every process makes the same collectives (a buffer broadcast, then one all-reduce),
        whether or not it holds a test batch: a skipped collective would stall the others.
        """
        self.model.eval()
        self.forward.sync_for_evaluation()
        cache = self.forward.cache
        if cache is not None and cache.ready:  # a frozen backbone: the head alone on kept features
            counts = self.forward.cached_accuracy((), self._autocast)
        else:
            batches = self.reporter.progress(self.data.test_batches(), len(self.data.test_batches()), "test")
            on_device = (self._to_device(x, y) for x, y in batches)
            counts = self.forward.cached_accuracy(on_device, self._autocast)
            if counts is None:
                counts = self.forward.full_accuracy(on_device, self._autocast, self.rt.device)
        total_correct, total = self._sum_over_ranks(*counts)
        return total_correct / max(total, 1), int(total)

    # --- the run -----------------------------------------------------------------------
    def fit(self) -> dict:
        started = time.perf_counter()
        record, failed = None, True
        self.graphs_after_warmup = None
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                record = self._run_epoch(epoch)
            with self.phases.timed("checkpoints"):  # the last write's wait is the job's; its error the run's
                self.checkpoints.wait()
            failed = False
        finally:  # an error or Ctrl-C: the write in flight lands before the run reports; the error
            # that stopped the run is the one said (saved_epoch says which checkpoint is on disk)
            self.checkpoints.wait(raise_error=not failed)
            # curves.png with every logged epoch; TensorBoard's file closed. After a failure (a full
            # disk) the curves' own error is a warning: it must not replace the one that stopped the run.
            self.reporter.close(raise_errors=not failed)
        if record is None:
            raise ConfigError(f"{self.run_dir} already finished {self.start_epoch} epochs; "
                              f"pass a larger --epochs to train on")
        summary = run_summary(self, record, time.perf_counter() - started)
        summary["job_s"], summary["phases_s"] = self.phases.split(summary["compile_s"])
        if self.rt.compile and self.rt.is_main:  # the next run of this configuration compiles warm
            mark_warm(compile_key(self.cfg, self.rt))
        self.reporter.write_summary(summary)
        self.reporter.final_lines(summary)
        return summary

    def _run_epoch(self, epoch: int) -> dict:
        """One epoch: train, evaluate, log, a checkpoint when due, then the thread count checked
        over the epoch (not after the last); returns its metrics record."""
        epoch_cpu = CpuSample.take()  # the window the thread count is checked over
        record = {"epoch": epoch + 1, "threads": self.threads.choice.threads, **self.train_epoch(epoch)}
        self._stop_if_diverged(epoch, record["train_loss"])  # before this epoch's checkpoint
        with self.phases.timed("eval"):
            record["test_acc"], record["test_examples"] = self.evaluate()
        if self.graphs_after_warmup is None:
            self.graphs_after_warmup = compiled_graphs()
        timing = self.timings[-1]
        record["examples_per_sec"] = timing.examples / timing.wall_s
        record["examples_per_sec_compute"] = timing.examples / sum(timing.step_s)
        # The epoch's figures are on disk before its checkpoint, so a write that fails
        # there (a full disk) loses no result; a metrics line ahead of the checkpoint is
        # dropped on resume (keep_metrics_up_to), so resume never duplicates one.
        self.reporter.append_metrics(record)
        self.reporter.epoch_lines(record, self.cfg.epochs, str(self.rt.device))
        if self._checkpoint_due(epoch + 1):
            # Written in the background, the last too: model.safetensors is written beside it
            # (0.12 -> 0.10 s for ResNet-18 on 2 cores), and fit waits for it before reporting.
            with self.phases.timed("checkpoints"):
                self.save_checkpoint(epoch + 1, background=True)
        line = self.threads.recheck(epoch_cpu) if epoch + 1 < self.cfg.epochs else None
        if line:
            self.reporter.say(line)
        return record

    def _stop_if_diverged(self, epoch: int, loss: float) -> None:
        """Stop with one line when the epoch's train loss (read once per epoch, the same on every
        process) is NaN or infinite: every later step would train on NaN weights, and saving them
        would overwrite the last good checkpoint."""
        if math.isfinite(loss):
            return
        saved = [e for e in range(self.start_epoch + 1, epoch + 1) if self._checkpoint_due(e)]
        last = saved[-1] if saved else self.start_epoch
        kept = (f"the last good checkpoint (epoch {last}) is kept" if last else
                "no checkpoint was written")
        raise ConfigError(f"epoch {epoch + 1}: train loss is {loss}; {kept}; lower --lr (now {self.cfg.lr:g}), "
                          f"or check --weights and the data for NaN values")

    def _checkpoint_due(self, epochs_done: int) -> bool:
        """Every --save-every epochs, and always after the last; the same answer on every process."""
        return epochs_done % self.cfg.save_every == 0 or epochs_done == self.cfg.epochs

    def save_checkpoint(self, epochs_done: int, background: bool = False) -> None:
        """Save the run after `epochs_done` epochs; every process must call it (it gathers RNG states).

        background=True returns once a CPU copy is taken (after any write still in flight) and
        writes on the writer's thread; `self.checkpoints.wait()` blocks until it has landed.
        After the last epoch rank 0 also writes model.safetensors, at once (~0.1 s for 45 MB),
        while a background checkpoint write goes on.
        """
        # Every process's random stream and loader position, for an exact resume.
        rngs = distributed.gather_to_all(rng_state(self.rt.device))
        loaders = distributed.gather_to_all(self.data.state_dict())
        if not self.rt.is_main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": epochs_done, "rng": rngs[0],
                 "rng_per_rank": rngs, "loader_per_rank": loaders, "config": self.cfg.to_dict(), "classes": list(self.data.classes),
                 "preprocessing": self.preprocessing.to_dict(),
                 "world_size": self.rt.world_size, "fastft_version": __version__}
        self.checkpoints.save(state, checkpoint_path(self.run_dir), background)
        if epochs_done == self.cfg.epochs:  # the run's final weights, for other tools (fastft.weights)
            self._save_model_file(epochs_done)

    def _save_model_file(self, epochs_done: int) -> None:
        """model.safetensors after the last epoch. It is a copy of what the checkpoint holds, so a
        failed write (safetensors missing, a full disk) is a warning and the run still reports."""
        try:
            note = save_run_weights(self.run_dir, self.model, self.data.classes, epochs_done, self.spec.name,
                                    self.preprocessing)
        except WriteError as exc:
            note = (f"{exc.one_line()}; the checkpoint holds the same weights: `fastft export --checkpoint "
                    f"{shown(self.run_dir)} --format safetensors` writes the file once there is room")
        if note:
            self.reporter.warn(note)


def train(cfg: TrainConfig, typed: frozenset[str] | None = None, job_start: float | None = None,
          cpu_since: CpuSample | None = None, ahead=None) -> dict:
    """One run; `job_start` (perf_counter scale) is where summary.json's job_s counts from;
    `cpu_since` where the reading of other processes' load starts (fastft.threads); `ahead` a
    data.decode_ahead child decoding the images already (closed here whatever happens)."""
    trainer = Trainer(cfg, typed, job_start, cpu_since, ahead)
    try:
        with guard(trainer):  # out of memory, Ctrl-C, a full disk: one line on what was saved (run_faults)
            summary = trainer.setup().fit()
    finally:  # an error before the data: the child is stopped and reaped all the same
        trainer.close_ahead()
    distributed.stop()
    return summary
