"""bench/gpu_check.sh's plan (its --plan mode runs nothing) and bench/gpu_report.py's figures.

The lent GPU comes once, for one run of gpu_check.sh: the plan must fit its budget with margin,
the chapter's job must really compile cold and warm beside an eager run, and the report must turn
those runs into the figures choose_compile's CUDA row needs.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUDGET, RESERVE = 450, 20  # gpu_check.sh: the real run's deadline (s) and what it keeps back


@pytest.fixture(scope="module")
def plan() -> dict:
    text = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--plan"], capture_output=True,
                          text=True, check=True, timeout=60).stdout
    rows = re.findall(r"^  (\S+) +(\d+) s expected, limit +(\d+) s(, goal|, only where apex or DALI imports)?$",
                      text, re.M)
    commands = dict(re.findall(r"^(\S+) \(limit \d+s\): (.*)$", text, re.M))
    total = re.search(r"^plan total: goal stages (\d+) s expected \(with (\d+) s .* margin (\d+) s; with the two "
                      r"worst goal overruns .* (\d+) s; every stage the lent machine runs (\d+) s", text, re.M)
    return {"rows": [(name, int(e), int(lim), kind) for name, e, lim, kind in rows],
            "commands": {k: shlex.split(v) for k, v in commands.items()}, "total": [int(v) for v in total.groups()]}


def test_goal_stages_come_first_and_fit_the_budget_with_margin(plan):
    rows = plan["rows"]
    goal = [r for r in rows if r[3] == ", goal"]
    assert [r[0] for r in rows[:len(goal)]] == [r[0] for r in goal]  # no other stage runs before a goal one
    assert {r[0] for r in goal} >= {"e2e", "job_cold", "job_warm", "job_eager", "ddp_1rank", "kernel", "step"}
    expected, overhead, margin, worst, every = plan["total"]
    assert expected == sum(r[1] for r in goal) + overhead and margin == BUDGET - expected
    assert expected <= 0.75 * BUDGET  # a quarter of the budget spare for estimates that are guesses
    overruns = sorted((lim - e for _, e, lim, _ in goal), reverse=True)
    assert worst == expected + overruns[0] + overruns[1] <= BUDGET - RESERVE  # two stages at their limits
    assert all(e < lim for _, e, lim, _ in rows)
    assert every == sum(e for _, e, _, kind in rows if "apex" not in kind) + overhead


def test_every_stage_the_script_runs_is_in_the_plan_in_its_order(plan):
    assert list(plan["commands"]) == [r[0] for r in plan["rows"]]


def test_the_chapters_job_compiles_cold_and_warm_beside_an_eager_run(plan):
    c = plan["commands"]

    def without_out(cmd: list[str], flag: str) -> list[str]:
        assert cmd.count(flag) == 1 and "--out" in cmd
        rest = [a for a in cmd if a != flag]
        i = rest.index("--out")
        return rest[:i] + rest[i + 2:]
    cold, warm, eager = (without_out(c[k], f) for k, f in
                         (("job_cold", "--compile"), ("job_warm", "--compile"), ("job_eager", "--no-compile")))
    assert cold == warm == eager  # one job, three ways
    assert cold[:3] == ["env", "-u", "TORCHINDUCTOR_CACHE_DIR"] and "XDG_CACHE_HOME=" in cold[3]
    assert cold[cold.index("--batch-size") + 1] == "128" and cold[cold.index("--epochs") + 1] == "5"
    ddp = c["ddp_1rank"]
    assert "torch.distributed.run" in ddp and "--nproc_per_node=1" in ddp
    assert without_out(ddp, "--no-compile")[-len(eager) + 5:] == eager[5:]  # job_eager's args after torchrun's


def summary(rate: float, compile_s: float, eval_s: float, job_s: float, compiled: bool) -> dict:
    return {"batch_size": 128, "examples_per_sec_compute": rate, "examples_per_sec": rate / 2, "epochs": 5,
            "test_examples": 800, "compile": compiled, "job_s": job_s, "test_acc": 0.5,
            "phases_s": {"compile": compile_s, "eval": eval_s, "train": 3.0, "startup": 6.0}}


def write_run(work: Path, name: str, summary_: dict, examples: int) -> None:
    run = work / "runs" / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary_))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 4, "examples": examples + 7}) + "\n"
                                       + json.dumps({"epoch": 5, "examples": examples}) + "\n")


def test_report_prints_cold_and_warm_compile_and_the_step_saving(bench_script, tmp_path, capsys):
    report = bench_script("gpu_report")
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    write_run(work, "job_eager", summary(6400.0, 0.0, 2.0, 14.0, False), 2000)        # 20 ms a step
    write_run(work, "job_cold", summary(128 / 0.015, 40.0, 14.0, 66.0, True), 1920)   # 15 ms a step
    write_run(work, "job_warm", summary(128 / 0.015, 6.0, 3.0, 20.0, True), 1920)
    write_run(work, "ddp_1rank", summary(6000.0, 0.0, 2.0, 19.0, False), 2000)
    (work / "kernels.json").write_text(json.dumps({"device": "H200", "args": {"size": 224, "batch": 256},
                                                   "rows": [{"method": "exact", "error": "RuntimeError: x"}],
                                                   "notes": ["reference: not timed on CUDA"]}))
    assert report.main([str(work), str(out)]) == 0
    text = capsys.readouterr().out
    # cold: 40 s first-step excess + (14 - 2) s of eval graphs; warm: 6 + (3 - 2); 75 steps of 1920/128 a
    # epoch, 5 x ceil(800 / 128) = 35 eval batches at a third: (75 + 35/3) x 5 ms = 0.43 s saved.
    assert ("compile on the chapter's job: cold compile 52.0 s, warm compile 7.0 s; per step (batch 128) "
            "eager 20.0 ms vs compiled 15.0 ms (x1.33); over the job's 75 steps + 35 eval batches ~0.4 s saved "
            "against 52.0 s cold / 7.0 s warm; job_s cold 66.0 s, warm 20.0 s, eager 14.0 s") in text
    assert ("choose_compile's cuda row from these (fastft/compile_cache.py): CompileCost(eager_ms_per_image=0.156, "
            "speedup=1.33, cold_s=52.0, warm_s=7.0)") in text
    assert "job_eager: 14.0 s; compile off" in text and "job_cold: 66.0 s (target < 30 s)" in text
    assert "plain 6400/s, 1-rank DDP 6000/s (wrapper cost +6.2%)" in text
    assert "crop exact       failed: RuntimeError: x" in text and "crop reference: not timed on CUDA" in text
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["job"]["job_cold"]["train_examples_per_epoch"] == 1920


def test_report_waits_for_the_eager_run_before_any_compile_figure(bench_script):
    report = bench_script("gpu_report")
    cold, eager = summary(128 / 0.015, 40.0, 14.0, 66.0, True), summary(6400.0, 0.0, 2.0, 14.0, False)
    assert report.compile_figures({"job_cold": cold, "job_warm": None, "job_eager": None}) is None
    assert report.compile_lines({"job_cold": cold, "job_eager": None}) == []
    figures = report.compile_figures({"job_cold": cold, "job_warm": None, "job_eager": eager})
    assert figures["cold_s"] == pytest.approx(52.0) and figures["speedup"] == pytest.approx(20 / 15)
    assert figures["warm_s"] is None and figures["saved_s"] is None  # no metrics.jsonl: steps unknown
    assert report.compile_lines({"job_cold": cold, "job_eager": eager})[1].endswith(
        "CompileCost(eager_ms_per_image=0.156, speedup=1.33, cold_s=52.0, warm_s=None)")


def test_report_says_when_the_jobs_did_not_compile(bench_script):
    report = bench_script("gpu_report")
    eager = summary(6400.0, 0.0, 2.0, 14.0, False)
    first = report.compile_lines({"job_cold": eager, "job_eager": eager})[0]
    assert first.startswith("compile on the chapter's job (NONE of these runs compiled")
