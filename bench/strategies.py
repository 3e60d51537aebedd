"""Sweeps around `fastft bench`, one JSON line per result; and the step-level checks gpu_check.sh runs.

    python bench/strategies.py sweep --batch-sizes 16,32 --image-sizes 64,128 --compile-modes off \\
        --out sweep.jsonl                     # every combination x every strategy, fastft vs reference
    python bench/strategies.py step-vs-data --device cuda --image-size 224 --batch-size 256 --amp bf16 \\
        --compile --data DIR --strategy finetune,frozen --out step.json   # is the data path the bottleneck? MFU
    python bench/strategies.py optimizers --device cuda ... --out optim.json   # torch SGD vs apex FusedSGD

`sweep` calls fastft.bench.run_bench once per combination: the reference reruns with each, so every
line compares runs of the same process on the same data. The step checks time the engine's own
`train_step` (fastft.bench.ready_step) on a fixed batch already on the device, after a warm-up that
absorbs compile, against the same engine's epoch on real data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastft.bench import BenchSpec, fixed_batch, quiet, ready_step, run_bench, seconds_per_step  # noqa: E402
from fastft.config import TrainConfig  # noqa: E402

GFLOP_FWD_224 = 1.82  # ResNet-18 forward at 224 px, GMAC counted as GFLOP as the issue does
# Dense bf16 tensor-core peaks from NVIDIA's spec sheets (TFLOP/s, no sparsity); first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0))
PRACTICAL_H100_TFLOPS = 790.0  # the "in practice" figure for one H100
# Step FLOP per example in forward passes: forward + backward (2x) where every layer trains; the
# frozen step is the backbone's forward (its head's backward is ~0). Mixed strategies: not counted.
FLOP_FACTOR = {"finetune": 3, "scratch": 3, "frozen": 1}


def listed(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",") if v]


def sweep(args) -> None:
    combos = itertools.product(listed(args.batch_sizes, int), listed(args.image_sizes, int),
                               listed(args.loaders), listed(args.amps), listed(args.compile_modes))
    with open(args.out, "a") as out:
        for batch, size, loader, amp, mode in combos:
            spec = BenchSpec(strategies=tuple(listed(args.strategies)), data=args.data, image_size=size,
                             batch_size=batch, epochs=args.epochs, repeats=args.repeats, device=args.device,
                             amp=amp, loader=loader, compile=None if mode == "auto" else mode != "off",
                             compile_mode="default" if mode in ("off", "auto") else mode,
                             train_images=args.train_images, test_images=args.test_images)
            result = run_bench(spec)
            for row in result["rows"]:
                line = {"batch_size": batch, "image_size": size, "loader": loader, "amp": amp,
                        "compile_mode": mode, "device": result["header"]["device"], **flat(row)}
                out.write(json.dumps(line) + "\n")
                out.flush()
                print(json.dumps(line), flush=True)


def flat(row: dict) -> dict:
    if "error" in row:
        return {"strategy": row["strategy"], "error": row["error"]}
    line = {"strategy": row["strategy"], "speedup_e2e": row["speedup_e2e"], "speedup_compute": row["speedup_compute"]}
    for variant in ("fastft", "reference"):
        for key in ("examples_per_sec", "examples_per_sec_compute", "compile_s", "peak_mem_mb", "recompiles"):
            stat = row[variant][key]
            line[f"{variant}_{key}"] = None if stat is None else stat["median"]
    return line


def train_config(args, **overrides) -> TrainConfig:
    strategy = overrides.pop("strategy", args.strategy)
    values = dict(data=args.data, strategy=strategy, weights="none", device=args.device,
                  image_size=args.image_size, batch_size=args.batch_size, amp=args.amp, compile=args.compile,
                  compile_mode=args.compile_mode, loader=args.loader, epochs=2, workers=args.workers,
                  out=str(Path(args.work) / f"{strategy.replace(':', '-')}-{overrides.get('optimizer', 'sgd')}"))
    return TrainConfig(**{**values, **overrides})


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value, f"{key} dense bf16 spec {value:g} TFLOP/s"
    return None, f"no dense bf16 peak on file for {device_name!r}"


def step_vs_data(args) -> dict:
    """One row per strategy in --strategy (comma-separated), each in a fresh Trainer, in that order.

    --out is rewritten after every row, and a row that crashes holds its error instead, so a run
    cut short or one failing strategy keeps the other figures.
    """
    import torch
    rows = []
    for strategy in listed(args.strategy):
        torch._dynamo.reset()  # each strategy compiles and counts its own graphs
        try:
            rows.append(step_vs_data_row(args, strategy))
        except Exception as exc:  # noqa: BLE001 - a bench row, not the engine: report and go on
            rows.append({"strategy": strategy, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")  # a cut run keeps these
    return {"rows": rows}


def step_vs_data_row(args, strategy: str) -> dict:
    """The step on a fixed device batch vs the same engine's steady epoch on real data; MFU."""
    from fastft.engine import Trainer
    with quiet():
        trainer = Trainer(train_config(args, strategy=strategy)).setup()
    x, y = fixed_batch(trainer)
    device_s = seconds_per_step(ready_step(trainer), x, y, args.steps, warmup=3)
    with quiet():  # epoch 1 warms workers and compile; epoch 2 is timed
        trainer.train_epoch(0)
        trainer.train_epoch(1)
    epoch = trainer.timings[-1]
    batch, size = y.shape[0], args.image_size
    real_s = epoch.wall_s / len(epoch.step_s)
    name = describe(trainer)
    peak, peak_label = peak_tflops(name)
    factor = FLOP_FACTOR.get(strategy)
    flop = None if factor is None else factor * 2 * GFLOP_FWD_224 * 1e9 * (size / 224) ** 2  # 2 FLOP per MAC
    achieved = None if flop is None else batch / device_s * flop / 1e12
    return {"device": name, "strategy": strategy, "batch": batch, "image_size": size, "loader": trainer.data.name,
            "amp": trainer.rt.amp_name, "compile": trainer.rt.compile, "steps_timed": args.steps,
            "device_tensor_step_ms": device_s * 1e3, "real_data_step_ms": real_s * 1e3,
            "real_data_compute_step_ms": statistics.median(epoch.step_s) * 1e3,
            "data_overhead": real_s / device_s, "data_share": max(0.0, 1 - device_s / real_s),
            "device_tensor_examples_per_sec": batch / device_s,
            "real_data_examples_per_sec": epoch.examples / epoch.wall_s, "achieved_tflops": achieved,
            "peak": peak_label, "mfu": None if peak is None or achieved is None else achieved / peak,
            "of_practical_790": achieved / PRACTICAL_H100_TFLOPS
            if achieved is not None and ("H100" in name or "H200" in name) else None}


def describe(trainer) -> str:
    import torch
    device = trainer.rt.device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def optimizers(args) -> dict:
    """torch SGD (fused on CUDA) vs apex FusedSGD: the engine's step on a fixed device batch."""
    from fastft.engine import Trainer
    from fastft.errors import FastftError
    out = {}
    for name in ("sgd", "apex-sgd"):
        try:
            with quiet():
                trainer = Trainer(train_config(args, optimizer=name)).setup()
        except FastftError as exc:  # apex missing, or no CUDA: say so and keep the other figure
            out[name] = {"skipped": exc.one_line()}
            continue
        x, y = fixed_batch(trainer)
        step_s = seconds_per_step(ready_step(trainer), x, y, args.steps, warmup=3)
        out[name] = {"step_ms": step_s * 1e3, "examples_per_sec": y.shape[0] / step_s}
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("sweep", help="fastft bench over every combination; JSON lines appended to --out")
    s.add_argument("--strategies", default="finetune,frozen,hotdog,scratch,partial:2")
    s.add_argument("--batch-sizes", default="32")
    s.add_argument("--image-sizes", default="64")
    s.add_argument("--loaders", default="auto", help="fastft variant, e.g. auto,torch,dali")
    s.add_argument("--amps", default="auto", help="fastft variant, e.g. auto,off,bf16")
    s.add_argument("--compile-modes", default="auto", help="auto|off|default|max-autotune|reduce-overhead")
    s.add_argument("--epochs", type=int, default=2)
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument("--train-images", type=int, default=256)
    s.add_argument("--test-images", type=int, default=64)
    for mode in ("step-vs-data", "optimizers"):
        m = sub.add_parser(mode)
        m.add_argument("--strategy", default="finetune",
                       help="step-vs-data: comma-separated, e.g. finetune,frozen; one row each")
        m.add_argument("--image-size", type=int, default=224)
        m.add_argument("--batch-size", type=int, default=256)
        m.add_argument("--amp", default="auto")
        m.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
        m.add_argument("--compile-mode", default="default")
        m.add_argument("--loader", default="auto")
        m.add_argument("--workers", type=int, default=-1)
        m.add_argument("--steps", type=int, default=20, help="timed steps on the device batch")
        m.add_argument("--work", default="runs/bench-steps", help="run folders")
    for m in sub.choices.values():
        m.add_argument("--data", default="synthetic", help="synthetic or an ImageFolder DIR")
        m.add_argument("--device", default="auto")
        m.add_argument("--out", required=True, help="JSON lines (sweep) or a JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.mode == "sweep":
        sweep(args)
        return 0
    if args.mode == "step-vs-data":
        result = step_vs_data(args)  # prints and writes each row as it comes
        return 1 if any("error" in row for row in result["rows"]) else 0
    result = optimizers(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
