"""`fastft bench`: examples/sec per freezing strategy, fastft's defaults against the d2l-style reference.

    fastft bench                                   # synthetic data, random weights: minutes on 2 CPU cores
    fastft bench --device cuda --image-size 224 --batch-size 256 --amp bf16 --repeats 3 \\
                 --json bench.json --plot bench.png

Every strategy runs twice per round on the same data in the same process, through the
engine (`Trainer(cfg).setup().fit()`), each run in its own temp folder and with
Dynamo reset, so each compiles its own graphs:
  fastft     fastft's defaults: loader auto, amp auto, channels_last, compile auto, fast_frozen,
             threads auto (fastft.threads);
  reference  the chapter's way: torch/PIL loader, fp32, NCHW, eager, no fast path, torch's
             default thread count (what the chapter's code gets in this process).
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

from fastft.config import TrainConfig
from fastft.curves import image_file, image_format
from fastft.errors import ConfigError, FastftError
from fastft.safe_write import check_writable, replacing, write_text_atomic

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
    data: str = "synthetic"        # "synthetic" (generated once, cached) or an ImageFolder DIR
    train_images: int = 256        # images in the synthetic train split
    test_images: int = 64          # images in the synthetic test split
    image_size: int = 64           # px, training crop side
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


def make_config(spec: BenchSpec, strategy: str, variant: str, data_dir: Path, weights: str, out: Path
                ) -> TrainConfig:
    return TrainConfig(data=str(data_dir), strategy=strategy, weights=weights, epochs=spec.epochs,
                       batch_size=spec.batch_size, image_size=spec.image_size, device=spec.device,
                       workers=spec.workers, seed=spec.seed, out=str(out), **variant_settings(spec, variant))


def random_imagenet_weights(path: Path) -> Path:
    """A random 1000-way ResNet-18 state_dict: what `hotdog` needs to seed its head, offline."""
    import torch
    import torchvision
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    return path


def weights_for(strategy: str, imagenet_like: Path) -> str:
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
        summary = Trainer(cfg).setup().fit()
    summary = {**summary, "cpu_s": time.process_time() - cpu, "threads": torch.get_num_threads()}
    # The Trainer is gone; collect its cycles now, so its DALI pipelines release the decoder cache
    # (one per process, with fixed arguments) before the next run asks for its own.
    gc.collect()
    keys = METRICS + ("compiled_graphs", "loader", "amp", "compile", "channels_last", "device", "timed",
                      "test_acc", "peak_mem_scope", "threads")
    return {key: summary.get(key) for key in keys}  # .get: older engines lack peak_mem_mb, recompiles


# --- one step of the engine, on a fixed batch already on the device ---------------------
def ready_step(trainer):
    """The engine's own `train_step`, with the model in the mode `train_epoch` sets."""
    trainer.strategy.set_train_mode(trainer.model)
    return trainer.train_step


def fixed_batch(trainer, seed: int = 0):
    """A random (x, y) as the loader feeds the step: the data path taken out of the step.

    x takes the shape, dtype, strides and device of the loader's first train batch (one is drawn:
    bf16 under --amp bf16 from the cached and DALI loaders and the torch loader's uint8 batches,
    fp32 from its fp32 ones; channels_last where used), y its shape and device. A compiled step
    guards on all of these, so an fp32 batch where the loader feeds bf16 compiles a second, cold
    graph and times it. The loader handles a pass left unfinished (DALI drains it).
    """
    import torch
    x_real, y_real = trainer.data.to_device(*next(iter(trainer.data.train_batches(0))))
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty_strided(x_real.shape, x_real.stride(), dtype=x_real.dtype, device=x_real.device)
    x.copy_(torch.randn(x_real.shape, generator=gen))
    y = torch.randint(0, len(trainer.data.classes), y_real.shape, generator=gen)
    return x, y.to(y_real.device)


def seconds_per_step(step, x, y, steps: int, warmup: int = 1) -> float:
    """Seconds per call after `warmup` calls (compile, allocator, cuDNN autotune).

    CPU: the median of single steps (robust to a neighbour's burst). CUDA: the steps run back to
    back between two syncs, as in training (a sync per step would add a launch gap), and the mean.
    """
    import time

    import torch
    for _ in range(warmup):
        step(x, y)
    if x.is_cuda:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def round_order(round_index: int) -> tuple[str, ...]:
    """Who runs first alternates, so neither side always follows the other's cache misses."""
    return VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]


def measure_row(spec: BenchSpec, strategy: str, data_dir: Path, imagenet_like: Path, work: Path) -> dict:
    """Both variants of one strategy in `spec.repeats` interleaved rounds."""
    runs = {variant: [] for variant in VARIANTS}
    for repeat in range(spec.repeats):
        for variant in round_order(repeat):
            out = work / f"{strategy.replace(':', '-')}-{variant}-{repeat}"
            cfg = make_config(spec, strategy, variant, data_dir, weights_for(strategy, imagenet_like), out)
            runs[variant].append(run_once(cfg, spec.quiet))
    row = {"strategy": strategy}
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
            "batch_size": spec.batch_size, "epochs": spec.epochs, "repeats": spec.repeats,
            "data": f"{spec.data} ({data_dir})", "weights": "random (timing only; accuracy means nothing)",
            "fastft": variant_settings(spec, "fastft"), "reference": variant_settings(spec, "reference")}


def run_bench(spec: BenchSpec, on_row=None) -> dict:
    """Every strategy of `spec`; `on_row(result)` after each row (for partial JSON on a timeout)."""
    if spec.reference_threads <= 0:  # read before any fastft run sets its own count
        import torch
        spec = dataclasses.replace(spec, reference_threads=torch.get_num_threads())
    data_dir = prepare_data(spec)
    result = {"header": header(spec, data_dir), "rows": [], "complete": False}
    with tempfile.TemporaryDirectory(prefix="fastft-bench-") as tmp:
        imagenet_like = random_imagenet_weights(Path(tmp) / "random-imagenet-resnet18.pth")
        for strategy in spec.strategies:
            try:
                row = measure_row(spec, strategy, data_dir, imagenet_like, Path(tmp))
            except FastftError:
                raise  # a setting the user can fix fails every row alike: stop at once
            except Exception as exc:  # one strategy failing (a compile error) must not hide the rest
                first_line = (str(exc).splitlines() or [""])[0]
                row = {"strategy": strategy, "error": f"{type(exc).__name__}: {first_line}"}
            result["rows"].append(row)
            if on_row:
                on_row(result)
    result["complete"] = True
    return result


def _cell(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "n/a"
    text = f"{stat['median']:.{digits}f}"
    return text if stat["min"] == stat["max"] else f"{text} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


COLUMNS = ("strategy", "e2e img/s", "ref e2e img/s", "speedup e2e", "compute img/s", "ref compute img/s",
           "speedup compute", "speedup CPU s", "threads", "compile s", "peak MB", "recompiles", "job s", "ref job s")


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for row in result["rows"]:
        if "error" in row:
            rows.append([row["strategy"], f"failed: {row['error']}"] + [""] * (len(COLUMNS) - 2))
            continue
        fast, ref = row["fastft"], row["reference"]
        rows.append([row["strategy"], _cell(fast["examples_per_sec"]), _cell(ref["examples_per_sec"]),
                     _ratio(row, "speedup_e2e"), _cell(fast["examples_per_sec_compute"]),
                     _cell(ref["examples_per_sec_compute"]), _ratio(row, "speedup_compute"),
                     _ratio(row, "speedup_cpu"), _threads_cell(row), _cell(fast["compile_s"]), _cell(fast["peak_mem_mb"], 0), _recompiles_cell(fast),
                     _cell(fast["job_s"]), _cell(ref["job_s"])])
    return rows


def _ratio(row: dict, label: str) -> str:
    """The median of the per-round ratios, and their range where there are several rounds."""
    rounds = [r for r in row.get(f"{label}_rounds") or [] if r is not None]
    if row.get(label) is None:
        return "n/a"
    text = f"{row[label]:.2f}x"
    return text if len(set(rounds)) < 2 else f"{text} ({min(rounds):.2f}-{max(rounds):.2f})"


def _threads_cell(row: dict) -> str:
    """fastft's / the reference's torch threads (each round's, where they differ)."""
    def counts(variant: str) -> str:
        seen = sorted({r.get("threads") for r in row[variant]["runs"] if r.get("threads")})
        return ",".join(map(str, seen)) or "?"
    return f"{counts('fastft')}/{counts('reference')}"


def _recompiles_cell(variant: dict) -> str:
    """Recompiles, and how many of them Dynamo refused (the recompile limit: those frames ran eagerly)."""
    text, eager = _cell(variant["recompiles"], 0), variant.get("eager_fallbacks")
    return text if not eager or not eager["max"] else f"{text} ({_cell(eager, 0)} ran eager)"


def format_table(result: dict) -> str:
    h = result["header"]
    lines = [f"fastft bench on {h['device']}, torch {h['torch']}: {h['image_size']} px, batch {h['batch_size']}, "
             f"{h['epochs']} epochs (rates exclude warm-up), {h['repeats']} repeat(s) as interleaved rounds, "
             f"median (min-max); speedups: the median of each round's ratio",
             f"data {h['data']}; weights {h['weights']}",
             f"fastft: {_settings(h['fastft'])}; reference: {_settings(h['reference'])}",
             "job s: each run's Trainer start to its summary (runs share this process: no start-up in it); "
             "speedup CPU s: the reference's process CPU seconds over fastft's; threads: fastft/reference", ""]
    body = [list(COLUMNS)] + table_rows(result)
    widths = [max(len(r[i]) for r in body) for i in range(len(COLUMNS))]
    for i, r in enumerate(body):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _settings(settings: dict) -> str:
    return ", ".join(f"{k} {'auto' if v is None else v}" for k, v in settings.items())


def write_json(result: dict, path: Path) -> None:
    """Via PATH.tmp renamed over `path`; a full disk or read-only folder is one WriteError line."""
    write_text_atomic(Path(path), json.dumps(result, indent=2) + "\n")


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib (or pip install 'fastft[plot]')") from exc
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot(result: dict, path: Path, fmt: str = "png") -> None:
    """Grouped bars, fastft against the reference, end-to-end and compute-only, min-max as error bars."""
    plt = require_matplotlib()
    rows = [r for r in result["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, key, title in zip(axes, ("examples_per_sec", "examples_per_sec_compute"), ("end-to-end", "compute")):
        for offset, variant in ((-0.2, "reference"), (0.2, "fastft")):
            stats = [r[variant][key] for r in rows]
            medians = [s["median"] for s in stats]
            errors = [[m - s["min"] for m, s in zip(medians, stats)], [s["max"] - m for m, s in zip(medians, stats)]]
            ax.bar([i + offset for i in range(len(rows))], medians, 0.4, yerr=errors, label=variant, capsize=3)
        ax.set_xticks(range(len(rows)), [r["strategy"] for r in rows])
        ax.set_title(f"{title} examples/sec")
        ax.legend()
    h = result["header"]
    fig.suptitle(f"{h['device']}: {h['image_size']} px, batch {h['batch_size']}, {h['repeats']} repeat(s)")
    fig.tight_layout()
    try:
        with replacing(path) as tmp:  # a failed write keeps no half PNG and is one line
            fig.savefig(tmp, dpi=100, format=fmt)
    finally:
        plt.close(fig)


def bench_main(spec: BenchSpec, json_path: Path | None = None, plot_path: Path | None = None) -> int:
    """The CLI's job: run, print the table, write JSON/PNG. Exit 1 if a strategy failed."""
    if plot_path:
        require_matplotlib()  # before minutes of running, not after
        plot_path = image_file(plot_path, "bench.png")
        plot_format = image_format(plot_path, "--plot")  # a .jpg is a JPEG, not PNG bytes
    for flag, target in (("--json", json_path), ("--plot", plot_path)):
        if target:  # a read-only folder, said before minutes of running
            check_writable(Path(target).absolute().parent, f"{flag} {target}")
    print(f"fastft bench: {len(spec.strategies)} strategies x 2 variants x {spec.repeats} repeat(s)...", flush=True)
    save = (lambda result: write_json(result, json_path)) if json_path else None
    result = run_bench(spec, on_row=save)
    if save:
        save(result)
    if plot_path:
        plot(result, plot_path, plot_format)
    print(format_table(result))
    return 1 if any("error" in row for row in result["rows"]) else 0

