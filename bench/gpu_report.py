"""gpu_check.sh's report: gather what the stages wrote so far into one JSON and print the table.

    python bench/gpu_report.py WORK OUT [--dry-run] [--title TEXT]

WORK is the check's temporary folder (stage JSONs, run folders, env.txt); OUT is what comes back
from the GPU machine. gpu_check.sh runs this after every stage, so a run cut short still shows,
and returns, every figure that finished; the last call prints the final table. Missing or
half-written inputs are left out, never fatal: this script must not lose what other stages made.
Standard library only, so it runs even where torch does not import.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

# The one-H100 targets for fastft's end-to-end rate (img/s).
TARGETS = {"finetune": 20000, "frozen": 60000}
# The chapter-size finetune job, command to summary (s): cold compile cache, then warm.
JOB_TARGETS_S = {"job_cold": 30.0, "job_warm": 10.0}
BENCH_FILES = ("bench_e2e.json", "bench_rest.json")  # finetune + frozen first, then the rest


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or cut mid-write
        return None


def gather(work: Path, out: Path) -> dict:
    """Every stage's result found so far, under one dict (the content of gpu_check.json)."""
    benches = [b for b in (load(work / name) for name in BENCH_FILES) if b]
    step = load(work / "step_vs_data.json")
    step_torch = load(work / "step_vs_data_torch.json")
    stages = out / "stages.txt"
    env = work / "env.txt"
    return {
        "env": env.read_text().splitlines() if env.exists() else [],
        "stages": stages.read_text().splitlines() if stages.exists() else [],
        "bench": {"header": benches[0]["header"] if benches else None,
                  "complete": [b.get("complete") for b in benches],
                  "rows": [row for b in benches for row in b.get("rows", [])]},
        "step_vs_data": [*(step or {}).get("rows", [step] if step else []),
                         *(step_torch or {}).get("rows", [step_torch] if step_torch else [])],
        "kernels": load(work / "kernels.json"),
        "optimizers": load(work / "optimizers.json"),
        "loaders": load(work / "loaders.json"),
        "dali_handoff": load(work / "dali_handoff.json"),
        "ddp": {k: load(work / "runs" / "ddp" / k / "summary.json") for k in ("plain", "1rank")},
        "job": {k: load(work / "runs" / k / "summary.json") for k in JOB_TARGETS_S},
    }


def write_atomic(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)  # a run killed mid-write keeps the previous complete file


def med(stat) -> float:
    return float("nan") if not stat else stat["median"]


def rate(stat, width: int) -> str:
    """A median img/s: whole numbers on a GPU, one decimal for the dry run's single digits."""
    value = med(stat)
    return f"{value:{width}.0f}" if math.isnan(value) or value >= 100 else f"{value:{width}.1f}"


def bench_lines(bench: dict, dry: bool) -> list[str]:
    head = bench["header"]
    if head is None:
        return []
    cut = "" if all(bench["complete"]) else " (INCOMPLETE: a bench stage was cut)"
    lines = [f"bench: {head['device']}, {head['image_size']} px, batch {head['batch_size']}{cut}",
             f"{'strategy':10} {'e2e/s':>9} {'ref e2e/s':>9} {'x e2e':>6} {'compute/s':>10} {'x comp':>7} "
             f"{'compile s':>9} {'recomp':>6} {'target':>7}"]
    for row in bench["rows"]:
        if "error" in row:
            lines.append(f"{row['strategy']:10} failed: {row['error']}")
            continue
        f, r = row["fastft"], row["reference"]
        target = "" if dry else TARGETS.get(row["strategy"], "")
        lines.append(f"{row['strategy']:10} {rate(f['examples_per_sec'], 9)} {rate(r['examples_per_sec'], 9)} "
                     f"{row['speedup_e2e']:6.2f} {rate(f['examples_per_sec_compute'], 10)} "
                     f"{row['speedup_compute']:7.2f} {med(f['compile_s']):9.1f} {med(f['recompiles']):6.0f} "
                     f"{target:>7}")
    return lines


def job_lines(jobs: dict, dry: bool) -> list[str]:
    """The whole job, cold then warm: job_s (process start to summary) against its target."""
    lines = []
    for name, summary in jobs.items():
        if not summary:
            continue
        phases = summary.get("phases_s", {})
        target = "" if dry else f" (target < {JOB_TARGETS_S[name]:.0f} s)"
        lines.append(f"{name}: {summary['job_s']:.1f} s{target}; compile {'on' if summary['compile'] else 'off'} "
                     f"{phases.get('compile', 0.0):.1f} s, train {phases.get('train', 0.0):.1f} s, "
                     f"start-up {phases.get('startup', 0.0):.1f} s, {summary['examples_per_sec']:.0f} img/s "
                     f"end-to-end, test acc {summary['test_acc']:.3f}")
    return lines


def step_line(row: dict) -> str:
    if "error" in row:
        return f"step {row['strategy']}: failed: {row['error']}"
    mfu = "" if row.get("mfu") is None else f", MFU {row['mfu']:.1%} of {row['peak']}"
    tflops = "" if row.get("achieved_tflops") is None else f"; {row['achieved_tflops']:.1f} TFLOP/s"
    share = row.get("data_share")
    share = "" if share is None or math.isnan(share) else f", data path {share:.0%} of the step"
    return (f"step {row['strategy']:8} ({row['loader']} loader): device batch {row['device_tensor_step_ms']:.1f} ms, "
            f"real data {row['real_data_step_ms']:.1f} ms (x{row['data_overhead']:.2f}{share}){tflops}{mfu}")


def other_lines(report: dict) -> list[str]:
    lines = []
    for row in (report["loaders"] or {}).get("rows", []):
        lines.append(f"loader {row['loader']:5} {row['split']:5} {row['setting']:30} {row['images_per_s']:9.0f} img/s")
    hand = report["dali_handoff"]
    if hand:
        lines.append(f"dali handoff ({hand['device']}): {hand['batches']} batches held {hand['hold']} more, "
                     f"{hand['rewritten']} rewritten")
    kernels = report["kernels"]
    for row in (kernels or {}).get("rows", []):  # the cached loader's crop: kernel, reference, torchvision
        lines.append(f"crop {row['method']:11} {row['images_per_s']:10.0f} img/s {row['gb_per_s']:7.2f} GB/s "
                     f"({kernels['device']}, {kernels['args']['size']} px, batch {kernels['args']['batch']})")
    if report["optimizers"]:
        lines.append("optimizers: " + json.dumps(report["optimizers"]))
    ddp = report["ddp"]
    if all(ddp.values()):
        plain, one = (ddp[k]["examples_per_sec_compute"] for k in ("plain", "1rank"))
        lines.append(f"ddp (eager, compute-only): plain {plain:.0f}/s, 1-rank DDP {one:.0f}/s (wrapper cost "
                     f"{1 - one / plain:+.1%}); end-to-end {ddp['plain']['examples_per_sec']:.0f} vs "
                     f"{ddp['1rank']['examples_per_sec']:.0f}/s")
    return lines


def table(report: dict, dry: bool, title: str) -> str:
    lines = ["=" * 30 + f" {title}{' (dry run, CPU)' if dry else ''} " + "=" * 30]
    lines += [line for line in report["env"] if line.startswith(("torch", "gpu"))]
    lines += report["stages"]
    lines += job_lines(report.get("job", {}), dry)
    lines += bench_lines(report["bench"], dry)
    lines += [step_line(row) for row in report["step_vs_data"]]
    lines += other_lines(report)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--title", default="gpu_check")
    args = p.parse_args(argv)
    report = gather(args.work, args.out)
    write_atomic(args.out / "gpu_check.json", report)
    print(f"JSON: {args.out / 'gpu_check.json'}")
    try:  # the table is the last thing printed
        print(table(report, args.dry_run, args.title), flush=True)
    except (KeyError, TypeError, ValueError) as exc:  # a stage's JSON of another shape: the file has it all
        print(f"gpu_report: cannot format the table ({type(exc).__name__}: {exc}); see gpu_check.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
