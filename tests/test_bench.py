"""`fastft bench`: one tiny real run of both variants, its table and JSON; plot and failure handling."""

from __future__ import annotations

import json

import pytest
import torch

from fastft import bench, bench_table, cli
from fastft.bench import BenchSpec, bench_main, format_table, run_bench, spread
from fastft.errors import ConfigError

TINY = dict(strategies=("frozen", "hotdog"), image_size=32, batch_size=4, epochs=1, train_images=8,
            test_images=4, workers=0, device="cpu")


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """One real run: frozen (cheap) and hotdog (needs the random 1000-way weights), 2 steps each."""
    home = tmp_path_factory.mktemp("bench-home")
    json_path = home / "bench.json"
    with pytest.MonkeyPatch.context() as mp:  # the synthetic set goes to a private cache
        mp.setenv("XDG_CACHE_HOME", str(home / "xdg"))
        mp.setenv("TORCH_HOME", str(home / "torch"))
        status = bench_main(BenchSpec(**TINY), json_path=json_path)
    return status, json.loads(json_path.read_text())


def test_both_variants_ran_for_every_strategy_with_their_own_settings(tiny_bench):
    status, result = tiny_bench
    assert status == 0 and result["complete"]
    assert [row["strategy"] for row in result["rows"]] == ["frozen", "hotdog"]
    for row in result["rows"]:
        (ref,), (fast,) = row["reference"]["runs"], row["fastft"]["runs"]
        assert (ref["loader"], ref["amp"], ref["channels_last"], ref["compile"]) == ("torch", "off", False, False)
        assert fast["channels_last"] is True and fast["device"] == ref["device"] == "cpu"
        for run in (ref, fast):
            assert run["examples_per_sec"] > 0 and run["examples_per_sec_compute"] > 0
            assert run["timed"] == "one epoch, first step excluded"
            assert (run["model"], run["arch"]) == ("resnet18", "ResNet")
        e2e = row["fastft"]["examples_per_sec"]["median"] / row["reference"]["examples_per_sec"]["median"]
        assert row["speedup_e2e"] == pytest.approx(e2e)
        assert row["speedup_compute"] > 0


def test_json_names_the_setup_and_holds_every_metric(tiny_bench):
    _, result = tiny_bench
    h = result["header"]
    assert h["device"].startswith("cpu") and (h["image_size"], h["batch_size"], h["repeats"]) == (32, 4, 1)
    assert "random" in h["weights"] and h["data"].startswith("synthetic")
    assert h["reference"] == {**bench.REFERENCE, "threads": torch.get_num_threads()}
    assert h["fastft"]["fast_frozen"] is True and h["fastft"]["threads"] == 0
    for row in result["rows"]:
        assert set(bench.METRICS) <= set(row["fastft"]) and set(bench.METRICS) <= set(row["reference"])


def test_table_has_a_row_per_strategy_under_a_header_naming_the_setup(tiny_bench):
    _, result = tiny_bench
    text = format_table(result)
    assert "cpu" in text and "32 px, batch 4" in text and "1 repeat(s)" in text and "random" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in lines[0].split("|")[1:3]] == ["model", "strategy"] and "speedup e2e" in lines[0]
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["frozen", "hotdog"]
    for line in lines[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert len(cells) == len(bench.COLUMNS) and cells[0] == "resnet18"
        assert cells[4].endswith("x") and float(cells[2]) > 0


def test_plot_writes_a_png(tiny_bench, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (pip install 'fastft[plot]')")
    path = tmp_path / "bench.png"
    bench.plot(tiny_bench[1], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_in_one_line_before_any_run(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("ran before checking matplotlib"))
    with pytest.raises(ConfigError, match="pip install matplotlib") as info:
        bench_main(BenchSpec(**TINY), plot_path=tmp_path / "x.png")
    assert "\n" not in info.value.one_line()


def test_spread_is_median_min_max_and_skips_missing_values():
    assert spread([3.0, 1.0, 2.0, None]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert spread([None]) is None
    assert bench_table._cell({"median": 2.0, "min": 1.0, "max": 3.0}) == "2.0 (1.0-3.0)"
    assert bench_table._cell({"median": 2.0, "min": 2.0, "max": 2.0}) == "2.0"


def test_recompiles_cell_says_how_many_frames_ran_eager():
    def stat(value: float) -> dict:
        return {"median": value, "min": value, "max": value}
    assert bench_table._recompiles_cell({"recompiles": stat(2), "eager_fallbacks": stat(2)}) == "2 (2 ran eager)"
    assert bench_table._recompiles_cell({"recompiles": stat(1), "eager_fallbacks": stat(0)}) == "1"
    assert bench_table._recompiles_cell({"recompiles": stat(0), "eager_fallbacks": None}) == "0"  # an older JSON


def fake_row(strategy: str) -> dict:
    stat = {"median": 2.0, "min": 2.0, "max": 2.0}
    variant = {"runs": [], **{k: stat for k in bench.METRICS}}
    return {"model": "resnet18", "strategy": strategy, "fastft": variant, "reference": variant, "speedup_e2e": 1.0,
            "speedup_compute": 1.0}


def test_a_failing_strategy_is_reported_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    def measure(spec, model, strategy, *args):
        if strategy == "frozen":
            raise RuntimeError("inductor failed\nlong trace")
        return fake_row(strategy)
    monkeypatch.setattr(bench, "prepare_data", lambda spec: tmp_path)
    monkeypatch.setattr(bench, "measure_row", measure)
    partial = []
    result = run_bench(BenchSpec(strategies=("frozen", "scratch")), on_row=lambda r: partial.append(len(r["rows"])))
    assert partial == [1, 2] and result["complete"]
    assert result["rows"][0] == {"model": "resnet18", "strategy": "frozen", "error": "RuntimeError: inductor failed"}
    assert "failed: RuntimeError: inductor failed" in format_table(result)
    assert bench_main(BenchSpec(strategies=("frozen", "scratch"))) == 1
    assert "| scratch" in capsys.readouterr().out


def test_a_user_error_stops_the_bench_at_once(monkeypatch, tmp_path):
    calls = []
    def measure(spec, model, strategy, *args):
        calls.append(strategy)
        raise ConfigError("--loader dali is not available")
    monkeypatch.setattr(bench, "prepare_data", lambda spec: tmp_path)
    monkeypatch.setattr(bench, "measure_row", measure)
    with pytest.raises(ConfigError):
        run_bench(BenchSpec(strategies=("frozen", "scratch")))
    assert calls == ["frozen"]


def test_cli_bench_turns_options_into_a_spec(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench, "bench_main", lambda spec, j, p: seen.update(spec=spec, json=j, plot=p) or 0)
    argv = ["bench", "--strategies", "frozen,partial:2", "--image-size", "48", "--no-compile", "--repeats", "3",
            "--amp", "off", "--json", str(tmp_path / "b.json")]
    assert cli.main(argv) == 0
    spec = seen["spec"]
    assert spec.strategies == ("frozen", "partial:2") and spec.image_size == 48 and spec.repeats == 3
    assert spec.compile is False and spec.amp == "off" and spec.quiet and seen["json"] == tmp_path / "b.json"
    assert cli.main(["bench"]) == 0 and seen["spec"] == BenchSpec()


def test_rounds_interleave_the_variants_and_speedups_are_medians_of_per_round_ratios(monkeypatch, tmp_path):
    """Round ratios 3, 2, 2: the headline is their median, 2.0, not the ratio of the variants'
    medians (24 / 10 = 2.4), which pairs runs from different rounds (different loads)."""
    calls = []
    rates = {("reference", 0): 10.0, ("fastft", 0): 30.0, ("fastft", 1): 6.0, ("reference", 1): 3.0,
             ("reference", 2): 12.0, ("fastft", 2): 24.0}

    def run_once(cfg, quiet_run):
        variant = "reference" if cfg.amp == "off" else "fastft"
        round_index = int(cfg.out.rsplit("-", 1)[1])
        calls.append((variant, round_index, cfg.threads))
        rate = rates[(variant, round_index)]
        return {**dict.fromkeys(bench.METRICS), "examples_per_sec": rate, "examples_per_sec_compute": rate,
                "cpu_s": 100.0 / rate, "threads": cfg.threads}
    monkeypatch.setattr(bench, "run_once", run_once)
    spec = BenchSpec(repeats=3, threads=1, reference_threads=2)
    row = bench.measure_row(spec, "resnet18", "frozen", tmp_path, tmp_path / "w.pth", tmp_path)
    assert [(v, r) for v, r, _ in calls] == [("reference", 0), ("fastft", 0), ("fastft", 1), ("reference", 1),
                                            ("reference", 2), ("fastft", 2)]
    assert {(v, t) for v, _, t in calls} == {("reference", 2), ("fastft", 1)}
    for label in ("speedup_e2e", "speedup_compute", "speedup_cpu"):
        assert row[f"{label}_rounds"] == pytest.approx([3.0, 2.0, 2.0]) and row[label] == pytest.approx(2.0)
    assert bench_table._ratio(row, "speedup_e2e") == "2.00x (2.00-3.00)" and bench_table._threads_cell(row) == "1/2"


def test_the_reference_keeps_the_thread_count_the_process_started_with(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(bench, "prepare_data", lambda spec: tmp_path)
    monkeypatch.setattr(bench, "measure_row", lambda spec, *a: seen.append(spec) or fake_row("frozen"))
    run_bench(BenchSpec(strategies=("frozen",)))
    assert seen[0].reference_threads == torch.get_num_threads() and seen[0].threads == 0
