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
# The chapter-size finetune job, command to summary (s): compiled with a cold compile cache, then
# warm; job_eager, the same job with --no-compile, has no target: it is what compile is weighed against.
JOB_TARGETS_S = {"job_cold": 30.0, "job_warm": 10.0}
JOBS = ("job_cold", "job_warm", "job_eager")
FORWARD_SHARE = 1 / 3  # fastft/compile_cache.py's: an eval batch costs about a third of a train step
BENCH_FILES = ("bench_e2e.json", "bench_rest.json")  # finetune + frozen first, then the rest


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or cut mid-write
        return None


def load_job(run: Path) -> dict | None:
    """A run folder's summary.json, plus its last epoch's train examples (metrics.jsonl `examples`:
    what one epoch stepped on, the ragged batch dropped when compiled) as train_examples_per_epoch."""
    summary = load(run / "summary.json")
    if summary is None:
        return None
    try:
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        summary["train_examples_per_epoch"] = last["examples"]
    except (OSError, ValueError, IndexError, KeyError):
        pass
    return summary


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
        # DDP's cost: job_eager's command under torchrun with 1 rank, against job_eager itself.
        "ddp": {"plain": load(work / "runs" / "job_eager" / "summary.json"),
                "1rank": load(work / "runs" / "ddp_1rank" / "summary.json")},
        "job": {k: load_job(work / "runs" / k) for k in JOBS},
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
    """The whole job, cold, warm and eager: job_s (process start to summary) against its target."""
    lines = []
    for name, summary in jobs.items():
        if not summary:
            continue
        phases = summary.get("phases_s", {})
        target = "" if dry or name not in JOB_TARGETS_S else f" (target < {JOB_TARGETS_S[name]:.0f} s)"
        lines.append(f"{name}: {summary['job_s']:.1f} s{target}; compile {'on' if summary['compile'] else 'off'} "
                     f"{phases.get('compile', 0.0):.1f} s, train {phases.get('train', 0.0):.1f} s, "
                     f"start-up {phases.get('startup', 0.0):.1f} s, {summary['examples_per_sec']:.0f} img/s "
                     f"end-to-end, test acc {summary['test_acc']:.3f}")
    return lines


def compile_figures(jobs: dict) -> dict | None:
    """The figures behind fastft/compile_cache.py's COMPILE_COSTS row, from the chapter's job run
    compiled cold, compiled warm and eager (summary.json of each), or None until job_eager and a
    compiled run have finished.

    cold_s / warm_s: the compiled run's compile phase (its first step's excess over a steady one)
    plus its eval phase's excess over the eager run's (the eval graphs compile inside eval).
    step_ms: batch_size / examples_per_sec_compute (steady train steps, warm-up excluded), per run.
    saved_s: choose_compile's own formula with the measured step saving, (train steps + eval batches x
    FORWARD_SHARE) x (eager - compiled step ms), train steps and eval batches as the compiled run ran.
    """
    eager = jobs.get("job_eager")
    compiled = {k: jobs[k] for k in ("job_cold", "job_warm") if jobs.get(k)}
    if not eager or not compiled:
        return None
    batch = eager["batch_size"]

    def step_ms(summary: dict) -> float:
        return batch / summary["examples_per_sec_compute"] * 1e3

    def compile_s(summary: dict) -> float:
        phases, eager_eval = summary.get("phases_s", {}), eager.get("phases_s", {}).get("eval", 0.0)
        return phases.get("compile", 0.0) + max(0.0, phases.get("eval", 0.0) - eager_eval)

    compiled_ms = sum(step_ms(s) for s in compiled.values()) / len(compiled)
    eager_ms = step_ms(eager)
    one = next(iter(compiled.values()))
    epochs = one["epochs"]
    train_steps = round(epochs * one.get("train_examples_per_epoch", 0) / batch) or None
    eval_batches = epochs * math.ceil(one["test_examples"] / batch)
    saved = None if train_steps is None else \
        (train_steps + eval_batches * FORWARD_SHARE) * (eager_ms - compiled_ms) / 1e3
    return {"cold_s": compile_s(compiled["job_cold"]) if "job_cold" in compiled else None,
            "warm_s": compile_s(compiled["job_warm"]) if "job_warm" in compiled else None,
            "eager_step_ms": eager_ms, "compiled_step_ms": compiled_ms, "batch": batch,
            "speedup": eager_ms / compiled_ms, "eager_ms_per_image": eager_ms / batch,
            "train_steps": train_steps, "eval_batches": eval_batches, "saved_s": saved,
            "job_s": {k: jobs[k]["job_s"] for k in JOBS if jobs.get(k)},
            "compiled": all(s.get("compile") for s in compiled.values())}


def compile_lines(jobs: dict) -> list[str]:
    """What compile costs and saves on the chapter's job, and the CompileCost row it measures."""
    fig = compile_figures(jobs)
    if fig is None:
        return []

    def secs(value) -> str:
        return "n/a" if value is None else f"{value:.1f} s"
    saved = "" if fig["saved_s"] is None else \
        (f"; over the job's {fig['train_steps']} steps + {fig['eval_batches']} eval batches ~{fig['saved_s']:.1f} s "
         f"saved against {secs(fig['cold_s'])} cold / {secs(fig['warm_s'])} warm")
    jobs_s = ", ".join(f"{k[4:]} {v:.1f} s" for k, v in fig["job_s"].items())
    def num(value) -> str:
        return "None" if value is None else f"{value:.1f}"
    row = (f"CompileCost(eager_ms_per_image={fig['eager_ms_per_image']:.3f}, speedup={fig['speedup']:.2f}, "
           f"cold_s={num(fig['cold_s'])}, warm_s={num(fig['warm_s'])})")
    ran = "" if fig["compiled"] else " (NONE of these runs compiled: the dry run passes --no-compile)"
    return [f"compile on the chapter's job{ran}: cold compile {secs(fig['cold_s'])}, warm compile {secs(fig['warm_s'])}; "
            f"per step (batch {fig['batch']}) eager {fig['eager_step_ms']:.1f} ms vs compiled "
            f"{fig['compiled_step_ms']:.1f} ms (x{fig['speedup']:.2f}){saved}; job_s {jobs_s}",
            f"choose_compile's cuda row from these (fastft/compile_cache.py): {row}"]


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
        if "error" in row:
            lines.append(f"crop {row['method']:11} failed: {row['error']}")
            continue
        lines.append(f"crop {row['method']:11} {row['images_per_s']:10.0f} img/s {row['gb_per_s']:7.2f} GB/s "
                     f"({kernels['device']}, {kernels['args']['size']} px, batch {kernels['args']['batch']})")
    lines += [f"crop {note}" for note in (kernels or {}).get("notes", [])]
    if report["optimizers"]:
        lines.append("optimizers: " + json.dumps(report["optimizers"]))
    ddp = report["ddp"]
    if all(ddp.values()):
        plain, one = (ddp[k]["examples_per_sec_compute"] for k in ("plain", "1rank"))
        lines.append(f"ddp (job_eager vs the same under torchrun, compute-only): plain {plain:.0f}/s, "
                     f"1-rank DDP {one:.0f}/s (wrapper cost "
                     f"{1 - one / plain:+.1%}); end-to-end {ddp['plain']['examples_per_sec']:.0f} vs "
                     f"{ddp['1rank']['examples_per_sec']:.0f}/s")
    return lines


def table(report: dict, dry: bool, title: str) -> str:
    lines = ["=" * 30 + f" {title}{' (dry run, CPU)' if dry else ''} " + "=" * 30]
    lines += [line for line in report["env"] if line.startswith(("torch", "gpu"))]
    lines += report["stages"]
    lines += job_lines(report.get("job", {}), dry)
    lines += compile_lines(report.get("job", {}))
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
