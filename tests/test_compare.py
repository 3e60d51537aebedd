"""bench/compare.py: the regression gate over same-run ratios in pytest-benchmark saves.

Hand-written saves in pytest-benchmark's layout (.benchmarks/<machine>/NNNN_*.json); no
benchmark runs here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

MACHINE = "Linux-CPython-3.11-64bit"


@pytest.fixture(scope="module")
def gate(bench_script):
    return bench_script("compare")


def save(storage: Path, number: int, ratios: dict) -> Path:
    """A save as pytest-benchmark writes it, from {fullname: CPU-time ratio, or None for no ratio}.

    The wall-time ratio is 9.0 everywhere, so a test that gates on it sees no change.
    """
    benchmarks = []
    for name, ratio in ratios.items():
        extra = {"strategy": name} if ratio is None else {"speedup_vs_reference_cpu": ratio,
                                                          "speedup_vs_reference": 9.0}
        benchmarks.append({"group": None, "name": name.split("::")[-1], "fullname": name, "params": None,
                           "extra_info": extra, "stats": {"mean": 0.1, "min": 0.09, "rounds": 5}})
    path = storage / MACHINE / f"{number:04d}_0123abc_20260101_000000.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": benchmarks,
                                "datetime": "2026-01-01T00:00:00", "version": "5.3.1"}))
    return path


STEP = "tests/benchmarks/test_step.py::test_train_step[finetune]"
DALI = "tests/benchmarks/test_p.py::test_dali"


def run(gate, capsys, storage: Path, *argv: str) -> tuple[int, str, str]:
    rc = gate.main([*argv, "--storage", str(storage)])
    out, err = capsys.readouterr()
    return rc, out, err


def rows(out: str, key: str = "speedup_vs_reference_cpu") -> dict[str, list[str]]:
    """The printed table's rows of ratio `key` (or of no ratio: "-") as {benchmark: [old, new,
    change, verdict]} (columns are 2+ spaces apart)."""
    return {cells[0]: cells[2:] for cells in (re.split(r" {2,}", line) for line in out.splitlines())
            if cells[0].startswith("tests/") and cells[1] in (key, "-")}


def test_equal_ratios_pass_and_saves_are_found_by_number(gate, capsys, tmp_path):
    save(tmp_path, 1, {STEP: 1.2, DALI: 2.5})
    save(tmp_path, 2, {STEP: 1.2, DALI: 2.5})
    rc, out, _ = run(gate, capsys, tmp_path, "1", "0002")
    assert rc == 0
    assert f"old: {tmp_path / MACHINE / '0001_0123abc_20260101_000000.json'}" in out
    assert rows(out) == {STEP: ["1.200", "1.200", "+0.0%", "ok"], DALI: ["2.500", "2.500", "+0.0%", "ok"]}
    assert "pass: no ratio fell by more than 15% (2 compared)" in out


def test_a_fall_within_the_threshold_passes_and_one_past_it_fails(gate, capsys, tmp_path):
    save(tmp_path, 1, {STEP: 1.0, DALI: 2.0})
    save(tmp_path, 2, {STEP: 0.9, DALI: 2.4})   # -10% and +20%
    save(tmp_path, 3, {STEP: 0.7, DALI: 2.0})   # -30%
    rc, out, _ = run(gate, capsys, tmp_path, "1", "2")
    assert rc == 0
    assert rows(out) == {STEP: ["1.000", "0.900", "-10.0%", "ok"], DALI: ["2.000", "2.400", "+20.0%", "ok"]}
    rc, out, _ = run(gate, capsys, tmp_path, "1", "3")
    assert rc == 1
    assert rows(out) == {STEP: ["1.000", "0.700", "-30.0%", "REGRESSED"],
                         DALI: ["2.000", "2.000", "+0.0%", "ok"]}
    assert "FAIL: a ratio fell by more than 15% (2 compared; largest fall 30.0%)" in out
    # The threshold is the user's: 35% lets the same fall through.
    assert run(gate, capsys, tmp_path, "1", "3", "--threshold", "35")[0] == 0
    # Only the named ratio is gated: the wall-time one did not move.
    rc, out, _ = run(gate, capsys, tmp_path, "1", "3", "--key", "speedup_vs_reference")
    assert rc == 0 and rows(out, "speedup_vs_reference")[STEP] == ["9.000", "9.000", "+0.0%", "ok"]


def test_each_benchmark_is_gated_on_its_own_gate_key(gate, capsys, tmp_path):
    """A step benchmark names its same-precision ratio; the d2l ratio beside it is not gated."""
    def with_bare(path: Path, bare: float) -> None:
        data = json.loads(path.read_text())
        for b in data["benchmarks"]:
            if b["fullname"] == STEP:
                b["extra_info"].update(speedup_vs_bare_cpu=bare, gate_key="speedup_vs_bare_cpu")
        path.write_text(json.dumps(data))
    with_bare(save(tmp_path, 1, {STEP: 1.0, DALI: 2.0}), 0.8)
    with_bare(save(tmp_path, 2, {STEP: 0.6, DALI: 2.0}), 0.8)   # the d2l ratio fell 40%: not gated
    with_bare(save(tmp_path, 3, {STEP: 1.0, DALI: 2.0}), 0.6)   # the gated ratio fell 25%
    rc, out, _ = run(gate, capsys, tmp_path, "1", "2")
    assert rc == 0 and "(2 compared)" in out
    assert rows(out, "speedup_vs_bare_cpu")[STEP] == ["0.800", "0.800", "+0.0%", "ok"]
    assert STEP not in rows(out)  # no speedup_vs_reference_cpu row for it
    rc, out, _ = run(gate, capsys, tmp_path, "1", "3")
    assert rc == 1 and rows(out, "speedup_vs_bare_cpu")[STEP] == ["0.800", "0.600", "-25.0%", "REGRESSED"]
    # --key overrides every benchmark's own choice.
    assert run(gate, capsys, tmp_path, "1", "3", "--key", "speedup_vs_reference_cpu")[0] == 0


def test_no_saves_named_compares_the_two_latest_and_one_named_against_the_latest(gate, capsys, tmp_path):
    save(tmp_path, 1, {STEP: 1.0})
    save(tmp_path, 2, {STEP: 0.5})
    save(tmp_path, 3, {STEP: 0.5})
    rc, out, _ = run(gate, capsys, tmp_path)
    assert rc == 0 and "0002_" in out and "0003_" in out and "0001_" not in out
    rc, out, _ = run(gate, capsys, tmp_path, "1")
    assert rc == 1 and "0001_" in out and "0003_" in out


def test_a_benchmark_on_one_side_only_is_reported_not_gated(gate, capsys, tmp_path):
    old = save(tmp_path, 1, {STEP: 1.0, DALI: 2.0})
    new = save(tmp_path, 2, {STEP: 1.0, "tests/b.py::test_new": None})
    rc, out, _ = run(gate, capsys, tmp_path, str(old), str(new))
    assert rc == 0 and "(1 compared)" in out
    assert rows(out) == {STEP: ["1.000", "1.000", "+0.0%", "ok"],
                         DALI: ["-", "-", "-", "only in old: not compared"],
                         "tests/b.py::test_new": ["-", "-", "-", "only in new: not compared"]}


def test_a_benchmark_without_a_ratio_is_listed_not_gated(gate, capsys, tmp_path):
    save(tmp_path, 1, {STEP: 1.0, DALI: None})
    save(tmp_path, 2, {STEP: 1.0, DALI: 2.0})
    rc, out, _ = run(gate, capsys, tmp_path, "1", "2")
    assert rc == 0 and "(1 compared)" in out
    assert rows(out)[DALI] == ["-", "2.000", "-", "no ratio on both sides"]


@pytest.mark.parametrize("case, message", [
    ("missing file", "nope.json: no such file"),
    ("missing number", "no save 0007 under"),
    ("not json", "bad.json: not a pytest-benchmark save (JSONDecodeError"),
    ("no benchmarks", "empty.json: not a pytest-benchmark save (KeyError: 'benchmarks')"),
])
def test_a_missing_or_invalid_save_is_one_line_and_exit_2(gate, capsys, tmp_path, case, message):
    good = save(tmp_path, 1, {STEP: 1.0})
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text(json.dumps({"version": "5.3.1"}))
    other = {"missing file": "nope.json", "missing number": "7", "not json": str(tmp_path / "bad.json"),
             "no benchmarks": str(tmp_path / "empty.json")}[case]
    rc, out, err = run(gate, capsys, tmp_path, str(good), other)
    assert rc == 2 and out == ""
    assert err.startswith("compare.py: error: ") and message in err and err.count("\n") == 1


def test_too_few_saves_to_pick_from_is_one_line(gate, capsys, tmp_path):
    save(tmp_path, 1, {STEP: 1.0})
    rc, _, err = run(gate, capsys, tmp_path)
    assert rc == 2 and "1 save(s), need 2" in err and err.count("\n") == 1
