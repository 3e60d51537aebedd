"""Whole-job efficiency: `fastft train` timed as a process, against the machine's ceiling for the same job.

    fastft data synth /tmp/job --train 400 --test 200
    python bench/job_ceiling.py --data /tmp/job                      # finetune and frozen, 3 repeats
    python bench/job_ceiling.py --data /tmp/job --reference --json job.json   # + the d2l-style runs
    python bench/job_ceiling.py --data /tmp/job --timm train.py      # + timm's train.py (finetune)
    python bench/job_ceiling.py --data /tmp/job --model efficientnet_b0 --reference   # another backbone
    python bench/job_ceiling.py --data /tmp/job --crop-ahead         # + each job with the cached
                                      # loader's CPU crops made one batch ahead on a worker thread

timm's train.py is the script at the top of github.com/huggingface/pytorch-image-models (not in
the pip package, nor in its sdist; `pip install timm` for the library it imports). It trains
timm's models only: a torchvision name runs as its closest timm equivalent (timm_model_name),
and a model without one gets no timm run (the JSON says why).

--model NAME (fastft.models: a torchvision builder or timm:NAME; default resnet18): every job,
the reference and the ceiling use that model, at its own input size unless --image-size says
otherwise, and the import is timed with timm's where the model is timm's.

Ceiling (measured here, in this process, each repeat): the import of torch and torchvision in a
fresh interpreter (process wall time), a bare train step of the model (ResNet-18 by default;
SGD, summed cross-entropy, channels_last, no data) and a bare forward (eval, inference mode), at
the job's batch, size and AMP dtype (`--amp auto` resolves as the engine does: bf16 on a CPU with AVX512-BF16).

    ideal finetune = import + epochs x train / step rate + epochs x test / forward rate
    ideal frozen   = import + epochs x train / forward rate + test / forward rate
                     (the train images only go forward; the test features are kept after epoch 1)
    efficiency     = ideal / the job's process wall time
    efficiency_cpu = the same ideal in CPU seconds (import's CPU time, the ceiling's images per
                     CPU second) / the job's CPU seconds (its process and workers, getrusage)

Import is timed as the issue's table times it, a whole process (`python -c "import torch,
torchvision"`), which includes the interpreter's teardown of those modules at exit; the
efficiency with import timed without that teardown (os._exit) is printed beside it.

Each repeat measures the ceiling and then every job, so a noisy neighbour hits ideal and job alike;
the table gives every repeat and the median. `--reference` adds each job run with `fastft bench`'s
REFERENCE settings (torch loader, fp32, NCHW, eager, no fast path, fp32 batches): "vs d2l" is its
process wall over fastft's, and the same in CPU seconds. On a machine shared with other work the
wall figures swing with the neighbours (a job's wall time doubled from one repeat to the next);
the CPU-second figures count the work each job did and move far less, so read those first there.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastft.phases import NAMES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
REFERENCE_FLAGS = ["--loader", "torch", "--amp", "off", "--no-channels-last", "--no-compile",
                   "--no-fast-frozen", "--no-uint8-batches"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="ImageFolder DIR with train/ and test/")
    p.add_argument("--jobs", default="finetune,frozen", help="strategies, comma-separated")
    p.add_argument("--model", default="resnet18", help="fastft.models name, torchvision's or timm:NAME")
    p.add_argument("--image-size", type=int, default=0, help="px; 0 = the model's own (224 for resnet18)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps (and forwards) per ceiling")
    p.add_argument("--ceiling-threads", type=int, default=0, help="the ceiling's torch threads: 0 = torch's "
                   "default (as before), -1 = what `fastft train` would pick now (fastft.threads.decide: 1 "
                   "beside a busy neighbour, where 2 threads wait on each other), N = N")
    p.add_argument("--reference", action="store_true", help="also run each job with the REFERENCE settings")
    p.add_argument("--reference-jobs", default="", help="with --reference: only these jobs (default: all)")
    p.add_argument("--with-teardown", action="store_true",
                   help="also run each job through main(argv), which exits normally (the teardown kept)")
    p.add_argument("--crop-ahead", action="store_true",
                   help="also run each job with the cached loader's CPU crops one batch ahead, on a worker thread")
    p.add_argument("--timm", type=Path, metavar="TRAIN_PY",
                   help="also run the finetune job with timm's train.py (fp32, channels_last, 2 workers)")
    p.add_argument("--extra", default="", help="more `fastft train` flags for the fastft runs")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.image_size = args.image_size or model_image_size(args.model)
    return args


def model_image_size(model: str) -> int:
    """The input size (px) of the model's default weights (fastft.models' Preprocessing)."""
    from fastft.models import get_spec
    return get_spec(model).preprocessing().image_size


# torchvision builder -> timm's name for the same network (architecture, not weights), for train.py,
# where the names differ; where timm has the torchvision name itself (resnet50, efficientnet_b0,
# convnext_tiny, densenet121, vgg16...) it is the same network. None: alexnet, googlenet,
# maxvit_t (timm's MaxViTs differ), regnet_y_128gf, shufflenet_v2_*, squeezenet*.
TIMM_RENAMED = {
    "mobilenet_v2": "mobilenetv2_100", "mobilenet_v3_large": "mobilenetv3_large_100",
    "mobilenet_v3_small": "mobilenetv3_small_100", "mnasnet0_5": "mnasnet_050", "mnasnet0_75": "mnasnet_075",
    "mnasnet1_0": "mnasnet_100", "mnasnet1_3": "mnasnet_140", "efficientnet_v2_s": "tf_efficientnetv2_s",
    "efficientnet_v2_m": "tf_efficientnetv2_m", "efficientnet_v2_l": "tf_efficientnetv2_l",
    "vit_b_16": "vit_base_patch16_224", "vit_b_32": "vit_base_patch32_224", "vit_l_16": "vit_large_patch16_224",
    "vit_l_32": "vit_large_patch32_224", "vit_h_14": "vit_huge_patch14_224",
    "swin_t": "swin_tiny_patch4_window7_224", "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224", "swin_v2_t": "swinv2_tiny_window8_256",
    "swin_v2_s": "swinv2_small_window8_256", "swin_v2_b": "swinv2_base_window8_256",
    **{f"regnet_{kind}_{size}": f"regnet{kind}_{code}" for kind in "xy" for size, code in
       (("400mf", "004"), ("800mf", "008"), ("1_6gf", "016"), ("3_2gf", "032"), ("8gf", "080"),
        ("16gf", "160"), ("32gf", "320"))}}


def timm_model_name(model: str) -> str | None:
    """The name timm's train.py takes for `model`: timm:NAME's NAME, a torchvision name's entry in
    TIMM_RENAMED, the torchvision name itself where timm has it, else None (no timm run)."""
    if model.startswith("timm:"):
        return model[len("timm:"):]
    if model in TIMM_RENAMED:
        return TIMM_RENAMED[model]
    try:
        import timm
    except ImportError:  # no timm, no train.py run either
        return None
    return model if timm.is_model(model) else None


def count_images(split: Path) -> int:
    return sum(1 for p in split.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def import_seconds(teardown: bool = True, model: str = "resnet18") -> tuple[float, float]:
    """(wall, CPU) s of a fresh interpreter that imports torch and torchvision (and timm, for a
    timm:NAME model) and exits; with teardown=False it ends with os._exit, skipping the
    interpreter's teardown of those modules."""
    code = "import torch, torchvision" + (", timm" if model.startswith("timm:") else "")
    code += "" if teardown else ", os; os._exit(0)"
    return timed_process([sys.executable, "-c", code])


def ceiling_rates(batch: int, size: int, amp: str, steps: int, model_name: str = "resnet18",
                  threads: int = 0) -> dict:
    """Bare `model_name` (2 classes; fastft.models' build) img/s: a train step and a forward,
    random data, no loader; on `threads` torch threads (see --ceiling-threads)."""
    import torch

    from fastft.models import get_spec
    from fastft.runtime import pick_amp
    if threads:
        from fastft.threads import decide
        torch.set_num_threads(decide().threads if threads < 0 else threads)
    dtype = pick_amp(amp, torch.device("cpu"))
    model = get_spec(model_name).build(2, size).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-3)
    autocast = lambda: torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)  # noqa: E731

    def step():
        with autocast():
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward():
        with torch.inference_mode(), autocast():
            model(x)

    model.train()
    step_s, step_cpu = _median_seconds(step, steps)
    model.eval()
    forward_s, forward_cpu = _median_seconds(forward, steps)
    # *_cpu: images per CPU second of this process (all its threads), for the CPU-time ideal.
    return {"amp": str(dtype).replace("torch.", "") if dtype else "fp32",
            "step_img_s": batch / step_s, "forward_img_s": batch / forward_s,
            "step_img_cpu": batch / step_cpu, "forward_img_cpu": batch / forward_cpu,
            "ceiling_threads": torch.get_num_threads()}  # the job picks its own (its config.json)


def _median_seconds(fn, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Medians of (wall, CPU) seconds per call of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def ideal_seconds(strategy: str, ceiling: dict, import_s: float, train: int, test: int, epochs: int,
                  unit: str = "s") -> float:
    """The job with nothing but import and model work (see the module doc); unit "s" in wall
    seconds, "cpu" in CPU seconds (the ceiling's images per CPU second)."""
    fwd = ceiling[f"forward_img_{unit}"]
    if strategy == "frozen":
        return import_s + epochs * train / fwd + test / fwd
    return import_s + epochs * train / ceiling[f"step_img_{unit}"] + epochs * test / fwd


# `fastft train` through main(argv): the CLI's fast exit is for the program only, so this one tears down.
WITH_TEARDOWN = ["-c", "import sys; from fastft.cli import main; sys.exit(main(sys.argv[1:]))"]
# `fastft train` as the program runs it (the same fast exit), the cached loader's CPU crops made one
# batch ahead on a worker thread (fastft.data.cached_loader._one_ahead): --crop-ahead's comparison.
CROP_AHEAD = ["-c", "import sys; from fastft.data.cached_loader import CachedLoaders; "
              "CachedLoaders.crop_ahead = True; from fastft.cli import exit_without_teardown, main; "
              "exit_without_teardown(main(sys.argv[1:]))"]


def timed_process(cmd: list[str], **kwargs) -> tuple[float, float]:
    """Run `cmd` to its end: (wall s, CPU s). CPU is user + system time of the process and the
    processes it waited for (DataLoader workers), from getrusage(RUSAGE_CHILDREN). On a machine
    shared with other work a job's wall time swings with its neighbours; its CPU time, the work
    it did, moves far less, so the "vs" ratios are also given in CPU seconds."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kwargs)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_job(args, strategy: str, out: Path, extra: list[str], launcher: list[str] = ("-m", "fastft")) -> dict:
    """`fastft train` as its own process: wall and CPU time (s) and the summary's job_s and phases_s."""
    model = getattr(args, "model", "resnet18")  # bench/threads_jobs.py's args have no --model
    cmd = [sys.executable, *launcher, "train", "--data", str(args.data), "--model", model, "--strategy", strategy,
           "--weights", "none", "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--epochs", str(args.epochs), "--out", str(out), *extra]
    wall, cpu = timed_process(cmd)
    summary = json.loads((out / "summary.json").read_text())
    return {"cmd": " ".join(cmd[1:]), "wall_s": wall, "cpu_s": cpu, "job_s": summary.get("job_s"),
            "phases_s": summary.get("phases_s"), "amp": summary["amp"], "loader": summary["loader"]}


def timm_job(args, out: Path) -> tuple[float, float]:
    """Process (wall, CPU) time (s) of the same finetune job through timm's train.py, as the issue's table
    ran it: fp32, channels_last, 2 workers, random init (--weights none), plain momentum SGD at
    the chapter's lr, no schedule (a step schedule that never steps), evaluation every epoch."""
    cmd = [sys.executable, str(args.timm), "--data-dir", str(args.data), "--train-split", "train",
           "--val-split", "test", "--model", timm_model_name(args.model), "--num-classes", "2",
           "--img-size", str(args.image_size), "-b", str(args.batch_size), "--epochs", str(args.epochs),
           "--channels-last", "-j", "2", "--device", "cpu", "--opt", "momentum", "--lr", "5e-5",
           "--weight-decay", "1e-3", "--sched", "step", "--decay-epochs", "1000", "--warmup-epochs", "0",
           "--output", str(out), "--log-interval", "1000", *timm_size_kwargs(args.model, args.image_size)]
    return timed_process(cmd, stderr=subprocess.DEVNULL)


def timm_size_kwargs(model: str, image_size: int) -> list[str]:
    """train.py's `--model-kwargs img_size=N` where timm's model fixes its input size (a ViT) and
    the job's differs: train.py's --img-size only sizes the data, so the model would refuse it."""
    from fastft.models.timm_models import pretrained_cfg
    cfg = pretrained_cfg(timm_model_name(model))
    fixed = cfg.get("fixed_input_size") and int(cfg["input_size"][-1]) != image_size
    return ["--model-kwargs", f"img_size={image_size}"] if fixed else []


def add_timm_run(args, run: dict, out: Path) -> None:
    """The finetune job through timm's train.py into `run` (timm_wall_s, vs_timm...), or
    `timm_note` saying why not: timm has no equivalent of the model, or train.py failed."""
    if not timm_model_name(args.model):
        run["timm_note"] = f"n/a: timm has no equivalent of {args.model} (bench/job_ceiling.py TIMM_RENAMED)"
        return
    run["timm_model"] = timm_model_name(args.model)
    try:
        run["timm_wall_s"], run["timm_cpu_s"] = timm_job(args, out)
    except subprocess.CalledProcessError as exc:  # timm's failure; fastft's figures for the model stand
        run["timm_note"] = f"failed: timm's train.py exited {exc.returncode} (its stderr is not kept)"
        return
    run["vs_timm"], run["vs_timm_cpu"] = run["timm_wall_s"] / run["wall_s"], run["timm_cpu_s"] / run["cpu_s"]


def one_repeat(args, repeat: int, jobs: list[str], work: Path, train: int, test: int) -> dict:
    (import_s, import_cpu), (lean_s, _) = import_seconds(model=args.model), import_seconds(False, args.model)
    result = {"model": args.model, "import_s": import_s, "import_cpu_s": import_cpu, "import_no_teardown_s": lean_s,
              **ceiling_rates(args.batch_size, args.image_size, args.amp, args.steps, args.model,
                              args.ceiling_threads), "jobs": {}}
    for strategy in jobs:
        run = run_job(args, strategy, work / f"{strategy}-{repeat}", args.extra.split())
        run["ideal_s"] = ideal_seconds(strategy, result, result["import_s"], train, test, args.epochs)
        run["efficiency"] = run["ideal_s"] / run["wall_s"]
        # In CPU seconds: the work the ideal job does against the work the job did, which a busy
        # neighbour changes far less than it changes either's wall time.
        run["ideal_cpu_s"] = ideal_seconds(strategy, result, import_cpu, train, test, args.epochs, "cpu")
        run["efficiency_cpu"] = run["ideal_cpu_s"] / run["cpu_s"]
        # The same ideal with import timed without the interpreter's teardown (see import_seconds).
        lean = ideal_seconds(strategy, result, result["import_no_teardown_s"], train, test, args.epochs)
        run["efficiency_no_teardown"] = lean / run["wall_s"]
        if args.reference and strategy in (args.reference_jobs.split(",") if args.reference_jobs else jobs):
            ref = run_job(args, strategy, work / f"{strategy}-ref-{repeat}", REFERENCE_FLAGS)
            run["reference_wall_s"], run["vs_d2l"] = ref["wall_s"], ref["wall_s"] / run["wall_s"]
            run["reference_cpu_s"], run["vs_d2l_cpu"] = ref["cpu_s"], ref["cpu_s"] / run["cpu_s"]
        if args.timm and strategy == "finetune":  # timm has no frozen mode
            add_timm_run(args, run, work / f"timm-{repeat}")
        result["jobs"][strategy] = run
        print(f"repeat {repeat + 1}: {strategy} {_job_text(run)}", flush=True)
        if args.crop_ahead:
            ahead = run_job(args, strategy, work / f"{strategy}-ahead-{repeat}", args.extra.split(), CROP_AHEAD)
            run["crop_ahead_wall_s"], run["crop_ahead_phases_s"] = ahead["wall_s"], ahead["phases_s"]
            print(f"repeat {repeat + 1}: {strategy} with the crops one batch ahead {ahead['wall_s']:.1f} s "
                  f"(efficiency {run['ideal_s'] / ahead['wall_s']:.2f}); train {ahead['phases_s']['train']:.1f} "
                  f"(in the loop: {run['phases_s']['train']:.1f})", flush=True)
        if args.with_teardown:
            kept = run_job(args, strategy, work / f"{strategy}-teardown-{repeat}", args.extra.split(),
                           WITH_TEARDOWN)
            run["teardown_wall_s"], run["efficiency_teardown"] = kept["wall_s"], run["ideal_s"] / kept["wall_s"]
            print(f"repeat {repeat + 1}: {strategy} with the exit teardown {kept['wall_s']:.1f} s "
                  f"(efficiency {run['efficiency_teardown']:.2f})", flush=True)
    return result


def _job_text(run: dict) -> str:
    text = f"{run['wall_s']:.1f} s (ideal {run['ideal_s']:.1f} s, efficiency {run['efficiency']:.2f})"
    if "vs_d2l" in run:
        text += f", reference {run['reference_wall_s']:.1f} s ({run['vs_d2l']:.2f}x; CPU {run['vs_d2l_cpu']:.2f}x)"
    if "vs_timm" in run:
        text += f", timm {run['timm_wall_s']:.1f} s ({run['vs_timm']:.2f}x; CPU {run['vs_timm_cpu']:.2f}x)"
    text += f"; CPU {run['cpu_s']:.1f} s (ideal {run['ideal_cpu_s']:.1f} s, efficiency {run['efficiency_cpu']:.2f})"
    phases = run.get("phases_s") or {}
    text += f"; job_s {run['job_s']:.1f} + {run['wall_s'] - run['job_s']:.1f} s after the summary" if run["job_s"] else ""
    return text + "; " + ", ".join(f"{k} {phases[k]:.1f}" for k in (*NAMES, "other") if k in phases)


def median_of(repeats: list[dict], get) -> float:
    return statistics.median(get(r) for r in repeats)


def summary_lines(repeats: list[dict], jobs: list[str]) -> list[str]:
    amp = repeats[0]["amp"]
    lines = [f"medians of {len(repeats)} repeat(s) (min-max in brackets):",
             f"  import torch, torchvision: {_spread(repeats, lambda r: r['import_s'])} s as a whole process, "
             f"{_spread(repeats, lambda r: r['import_no_teardown_s'])} s without the exit teardown",
             f"  ceiling step ({repeats[0].get('model', 'resnet18')}, {amp}, channels_last): "
             f"{_spread(repeats, lambda r: r['step_img_s'])} img/s",
             f"  ceiling forward ({amp}, channels_last): {_spread(repeats, lambda r: r['forward_img_s'])} img/s"]
    for job in jobs:
        line = (f"  {job}: whole job {_spread(repeats, lambda r: r['jobs'][job]['wall_s'])} s, "
                f"ideal {_spread(repeats, lambda r: r['jobs'][job]['ideal_s'])} s, efficiency "
                f"{_spread(repeats, lambda r: r['jobs'][job]['efficiency'], 2)} (import without teardown: "
                f"{_spread(repeats, lambda r: r['jobs'][job]['efficiency_no_teardown'], 2)}; in CPU seconds: "
                f"{_spread(repeats, lambda r: r['jobs'][job]['efficiency_cpu'], 2)})")
        if "teardown_wall_s" in repeats[0]["jobs"][job]:
            line += (f"; exiting with the teardown {_spread(repeats, lambda r: r['jobs'][job]['teardown_wall_s'])}"
                     f" s, efficiency {_spread(repeats, lambda r: r['jobs'][job]['efficiency_teardown'], 2)}")
        if "vs_d2l" in repeats[0]["jobs"][job]:
            line += (f", reference {_spread(repeats, lambda r: r['jobs'][job]['reference_wall_s'])} s, "
                     f"vs d2l {_spread(repeats, lambda r: r['jobs'][job]['vs_d2l'], 2)}x faster "
                     f"(CPU seconds: {_spread(repeats, lambda r: r['jobs'][job]['vs_d2l_cpu'], 2)}x)")
        if "vs_timm" in repeats[0]["jobs"][job]:
            line += (f", timm {_spread(repeats, lambda r: r['jobs'][job]['timm_wall_s'])} s, "
                     f"vs timm {_spread(repeats, lambda r: r['jobs'][job]['vs_timm'], 2)}x faster "
                     f"(CPU seconds: {_spread(repeats, lambda r: r['jobs'][job]['vs_timm_cpu'], 2)}x)")
        if "timm_note" in repeats[0]["jobs"][job]:
            line += f", timm train.py {repeats[0]['jobs'][job]['timm_note']}"
        lines.append(line)
    return lines


def _spread(repeats: list[dict], get, digits: int = 1) -> str:
    values = [get(r) for r in repeats]
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv=None) -> int:
    args = parse_args(argv)
    jobs = [j for j in args.jobs.split(",") if j]
    train, test = count_images(args.data / "train"), count_images(args.data / "test")
    print(f"job: {args.model}, {train} train / {test} test images, {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs, jobs {jobs}, {args.repeats} repeat(s)", flush=True)
    repeats = []
    with tempfile.TemporaryDirectory(prefix="fastft-job-") as tmp:
        for repeat in range(args.repeats):
            repeats.append(one_repeat(args, repeat, jobs, Path(tmp), train, test))
            if args.json:  # rewritten after each repeat: a timeout keeps what finished
                args.json.write_text(json.dumps({"model": args.model, "image_size": args.image_size,
                                                 "repeats": repeats}, indent=2) + "\n")
    print("\n".join(summary_lines(repeats, jobs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
