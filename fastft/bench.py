"""`fastft bench`: examples/sec per model and freezing strategy, fastft's defaults against the d2l-style reference.

    fastft bench                                   # synthetic data, random weights: minutes on 2 CPU cores
    fastft bench --model efficientnet_b0           # another backbone (fastft models lists them; timm:NAME)
    fastft bench --models resnet18,resnet50,timm:efficientvit_b0   # one row per model x strategy
    fastft bench --device cuda --image-size 224 --batch-size 256 --amp bf16 --repeats 3 \\
                 --json bench.json --plot bench.png

Every model x strategy runs twice per round on the same data in the same process, through the
engine (`Trainer(cfg).setup().fit()`), each run in its own temp folder and with
Dynamo reset, so each compiles its own graphs:
  fastft     fastft's defaults: loader auto, amp auto, channels_last, compile auto, fast_frozen,
             threads auto (fastft.threads);
  reference  the chapter's way: torch/PIL loader, fp32, NCHW, eager, no fast path, torch's
             default thread count (what the chapter's code gets in this process), the same model.
The rounds interleave the variants (reference first in even rounds, fastft first in odd ones),
and each speedup is the median over rounds of that round's ratio, as the regression gate's
ratios are (tests/benchmarks): a neighbour's load falls on both runs of a round alike.
Rates are the engine's steady ones (warm-up epoch, or first step, excluded; see
fastft.timing); compile time is reported on its own. The whole-job columns are each
run's summary `job_s`: from the Trainer's own start to its summary, since a bench run
shares one process and has no process start of its own (so no import time is in it;
`bench/job_ceiling.py` times `fastft train` as a whole process). With --repeats N (rounds) the table
shows the median and the min-max spread. Weights are random: the timing of a
step does not depend on them, and it keeps the bench offline.
The step alone on a fixed batch is in fastft.bench_step; the table, JSON and plot in
fastft.bench_table (both re-exported here, where scripts and tests import them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastft.bench_step import fixed_batch, ready_step, seconds_per_step  # noqa: F401 (re-exported)
from fastft.bench_table import (COLUMNS, format_table, plot, require_matplotlib,  # noqa: F401
                                table_rows, write_json)
from fastft.config import TrainConfig
from fastft.curves import image_file, image_format
from fastft.errors import ConfigError, FastftError, WeightsError
from fastft.safe_write import check_writable

STRATEGIES = ("finetune", "frozen", "hotdog", "scratch", "partial:2")
REFERENCE = dict(loader="torch", amp="off", channels_last=False, compile=False, fast_frozen=False,
                 optimizer="sgd", uint8_batches=False)
VARIANTS = ("reference", "fastft")
METRICS = ("examples_per_sec", "examples_per_sec_compute", "compile_s", "peak_mem_mb", "recompiles",
           "eager_fallbacks", "job_s", "cpu_s")
# speedup label: (metric, True where higher is faster); each the median of the per-round ratios
SPEEDUPS = {"speedup_e2e": ("examples_per_sec", True), "speedup_compute": ("examples_per_sec_compute", True),
            "speedup_cpu": ("cpu_s", False)}


@dataclass
class BenchSpec:
    strategies: tuple[str, ...] = STRATEGIES
    models: tuple[str, ...] = ("resnet18",)  # fastft.models names: torchvision builders or timm:NAME
    data: str = "synthetic"        # "synthetic" (generated once, cached) or an ImageFolder DIR
    train_images: int = 256        # images in the synthetic train split
    test_images: int = 64          # images in the synthetic test split
    image_size: int = 64           # px, training crop side, every model; 0 = each model's own
    batch_size: int = 32           # examples per step
    epochs: int = 2                # epoch 1 is warm-up and is not in the rates
    repeats: int = 1               # rounds: interleaved (reference, fastft) pairs per strategy
    device: str = "auto"
    # The fastft variant's settings; the reference always runs REFERENCE.
    amp: str = "auto"
    compile: bool | None = None    # None = the engine's auto (on for CUDA)
    compile_mode: str = "default"
    loader: str = "auto"
    optimizer: str = "sgd"
    workers: int = -1              # both variants: -1 = the engine's default
    threads: int = 0               # fastft variant's torch threads; 0 = auto (fastft.threads)
    reference_threads: int = 0     # the reference's; 0 = torch's default in this process, read at start
    seed: int = 0
    quiet: bool = True             # hide the engine's per-epoch lines


def variant_settings(spec: BenchSpec, variant: str) -> dict:
    if variant == "reference":
        return dict(REFERENCE, threads=spec.reference_threads)
    return dict(loader=spec.loader, amp=spec.amp, channels_last=True, compile=spec.compile,
                compile_mode=spec.compile_mode, fast_frozen=True, optimizer=spec.optimizer, threads=spec.threads)


def make_config(spec: BenchSpec, strategy: str, variant: str, data_dir: Path, weights: str, out: Path,
                model: str = "resnet18") -> TrainConfig:
    return TrainConfig(data=str(data_dir), model=model, strategy=strategy, weights=weights, epochs=spec.epochs,
                       batch_size=spec.batch_size, image_size=spec.image_size, device=spec.device,
                       workers=spec.workers, seed=spec.seed, out=str(out), **variant_settings(spec, variant))


def random_imagenet_weights(path: Path, model: str = "resnet18", image_size: int = 0) -> Path:
    """A random state_dict of `model` with its pretrained head (1000-way for ImageNet-1k): what
    `hotdog` needs to seed its head, offline. Built for `image_size` px (0: the model's own), so a
    ViT's position embedding has the shape the run builds."""
    import torch

    from fastft.models import get_spec
    spec = get_spec(model)
    torch.manual_seed(0)
    torch.save(spec.build(spec.imagenet_classes(), image_size or None).state_dict(), path)
    return path


def weights_for(strategy: str, imagenet_like: Path | None) -> str:
    return str(imagenet_like) if strategy == "hotdog" else "none"


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """Swallow the engine's output (tqdm sees a non-terminal and stays off); replay it if a run crashes."""
    if not enabled:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except FastftError:
        raise  # a one-line user error says it all
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-4000:])
        raise


def prepare_data(spec: BenchSpec) -> Path:
    from fastft.data import resolve_data_dir
    cfg = TrainConfig(data=spec.data, synth_train=spec.train_images, synth_test=spec.test_images)
    with quiet(spec.quiet):
        return resolve_data_dir(cfg)


def run_once(cfg: TrainConfig, quiet_run: bool = True) -> dict:
    """One engine run: its summary's rates and costs, and the settings that really ran.

    Dynamo is reset first, so the run compiles its own graphs, as a fresh process would:
    cached graphs of an earlier run (finetune and scratch share ResNet.forward) would make
    the compile time read ~0 and count against the same recompile limit.
    """
    import time

    import torch

    from fastft.engine import Trainer
    torch._dynamo.reset()
    cpu = time.process_time()
    with quiet(quiet_run):
        trainer = Trainer(cfg).setup()
        summary = trainer.fit()
    # arch: the class the engine built, so a table row is known to have run the model it names.
    summary = {**summary, "cpu_s": time.process_time() - cpu, "threads": torch.get_num_threads(),
               "model": cfg.model, "arch": type(getattr(trainer, "model", None)).__name__}
    del trainer
    # The Trainer is gone; collect its cycles now, so its DALI pipelines release the decoder cache
    # (one per process, with fixed arguments) before the next run asks for its own.
    gc.collect()
    keys = METRICS + ("compiled_graphs", "loader", "amp", "compile", "channels_last", "device", "timed",
                      "test_acc", "peak_mem_scope", "threads", "model", "arch")
    return {key: summary.get(key) for key in keys}  # .get: older engines lack peak_mem_mb, recompiles


def spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def round_order(round_index: int) -> tuple[str, ...]:
    """Who runs first alternates, so neither side always follows the other's cache misses."""
    return VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]


def measure_row(spec: BenchSpec, model: str, strategy: str, data_dir: Path, imagenet_like: Path | None,
                work: Path) -> dict:
    """Both variants of one model x strategy in `spec.repeats` interleaved rounds: the model's
    fastft runs against its own reference runs, a round's two runs back to back."""
    runs = {variant: [] for variant in VARIANTS}
    weights = weights_for(strategy, imagenet_like)
    for repeat in range(spec.repeats):
        for variant in round_order(repeat):
            out = work / f"{model}-{strategy}-{variant}-{repeat}".replace(":", "-")
            cfg = make_config(spec, strategy, variant, data_dir, weights, out, model)
            runs[variant].append(run_once(cfg, spec.quiet))
    row = {"model": model, "strategy": strategy}
    for variant in VARIANTS:
        row[variant] = {"runs": runs[variant], **{k: spread([r[k] for r in runs[variant]]) for k in METRICS}}
    for label, (key, higher_is_faster) in SPEEDUPS.items():
        ratios = round_ratios(runs["fastft"], runs["reference"], key, higher_is_faster)
        row[label] = statistics.median(ratios) if ratios else None
        row[f"{label}_rounds"] = ratios
    return row


def round_ratios(fast: list[dict], ref: list[dict], key: str, higher_is_faster: bool) -> list[float]:
    """fastft over the reference in each round (> 1: fastft faster); rounds missing a value are left out."""
    pairs = [(f[key], r[key]) for f, r in zip(fast, ref) if f.get(key) and r.get(key)]
    return [f / r if higher_is_faster else r / f for f, r in pairs]


def describe_device(spec: BenchSpec) -> str:
    import torch
    from fastft.runtime import pick_device
    from fastft.threads import usable_cpus
    device = pick_device(spec.device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    return f"cpu ({model}, {len(usable_cpus())} usable cores)"


def header(spec: BenchSpec, data_dir: Path) -> dict:
    import torch
    return {"device": describe_device(spec), "torch": torch.__version__, "image_size": spec.image_size,
            "batch_size": spec.batch_size, "epochs": spec.epochs, "repeats": spec.repeats, "models": list(spec.models),
            "data": f"{spec.data} ({data_dir})", "weights": "random (timing only; accuracy means nothing)",
            "fastft": variant_settings(spec, "fastft"), "reference": variant_settings(spec, "reference")}


def run_bench(spec: BenchSpec, on_row=None) -> dict:
    """Every model x strategy of `spec`, model by model; `on_row(result)` after each row (for
    partial JSON on a timeout)."""
    if spec.reference_threads <= 0:  # read before any fastft run sets its own count
        import torch
        spec = dataclasses.replace(spec, reference_threads=torch.get_num_threads())
    data_dir = prepare_data(spec)
    result = {"header": header(spec, data_dir), "rows": [], "complete": False}
    with tempfile.TemporaryDirectory(prefix="fastft-bench-") as tmp:
        for model in spec.models:
            imagenet_like = None
            if "hotdog" in spec.strategies:  # only hotdog reads it; a ViT-B's is 350 MB
                path = Path(tmp) / f"random-imagenet-{model.replace(':', '-')}.pth"
                imagenet_like = random_imagenet_weights(path, model, spec.image_size)
            for strategy in spec.strategies:
                result["rows"].append(guarded_row(spec, model, strategy, data_dir, imagenet_like, Path(tmp)))
                if on_row:
                    on_row(result)
    result["complete"] = True
    return result


def guarded_row(spec: BenchSpec, model: str, strategy: str, data_dir: Path, imagenet_like: Path | None,
                work: Path) -> dict:
    """measure_row, with a failure other than the user's (a compile error) turned into a row that
    says so, so it does not hide the other rows. A FastftError (a setting the user can fix)
    fails every row alike: it stops the bench at once. A WeightsError is about the weights file
    the bench made itself for hotdog, so it is one row's failure."""
    try:
        return measure_row(spec, model, strategy, data_dir, imagenet_like, work)
    except WeightsError as exc:
        return {"model": model, "strategy": strategy, "error": f"WeightsError: {exc.one_line()}"}
    except FastftError:
        raise
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        return {"model": model, "strategy": strategy, "error": f"{type(exc).__name__}: {first_line}"}


def bench_main(spec: BenchSpec, json_path: Path | None = None, plot_path: Path | None = None) -> int:
    """The CLI's job: run, print the table, write JSON/PNG. Exit 1 if a row failed. An unknown
    model name is a ConfigError (one line) before anything runs."""
    from fastft.models import get_spec
    if not spec.models:
        raise ConfigError("--models names none; e.g. --models resnet18,efficientnet_b0")
    for model in spec.models:
        get_spec(model)
    if plot_path:
        require_matplotlib()  # before minutes of running, not after
        plot_path = image_file(plot_path, "bench.png")
        plot_format = image_format(plot_path, "--plot")  # a .jpg is a JPEG, not PNG bytes
    for flag, target in (("--json", json_path), ("--plot", plot_path)):
        if target:  # a read-only folder, said before minutes of running
            check_writable(Path(target).absolute().parent, f"{flag} {target}")
    print(f"fastft bench: {len(spec.models)} model(s) x {len(spec.strategies)} strategies x 2 variants x "
          f"{spec.repeats} repeat(s)...", flush=True)
    save = (lambda result: write_json(result, json_path)) if json_path else None
    result = run_bench(spec, on_row=save)
    if save:
        save(result)
    if plot_path:
        plot(result, plot_path, plot_format)
    print(format_table(result))
    return 1 if any("error" in row for row in result["rows"]) else 0

