"""`fastft bench --model NAME` and `--models A,B,C`: real tiny runs through the CLI, one table row
per model x strategy, each model's fastft runs against its own reference runs."""

from __future__ import annotations

import json

import pytest

from fastft import bench, cli
from fastft.bench import BenchSpec, bench_main, format_table
from fastft.errors import WeightsError

TINY_ARGS = ["--image-size", "32", "--batch-size", "4", "--epochs", "1", "--synth-train", "8", "--synth-test", "4",
             "--workers", "0", "--device", "cpu"]


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the synthetic set goes here
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def bench_cli(argv: list[str], json_path) -> dict:
    assert cli.main(["bench", *argv, *TINY_ARGS, "--json", str(json_path)]) == 0
    return json.loads(json_path.read_text())


def table_cells(result: dict) -> list[list[str]]:
    lines = [line for line in format_table(result).splitlines() if line.startswith("| ")][2:]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines]


def assert_rows_ran(result: dict, expected: list[tuple[str, str, str]]) -> None:
    """Rows in (model, strategy) order; each variant's run built the model the row names (its class:
    `arch`), the reference with the reference's settings; every speedup positive."""
    assert [(r["model"], r["strategy"]) for r in result["rows"]] == [(m, s) for m, s, _ in expected]
    for row, (model, _, arch) in zip(result["rows"], expected):
        (ref,), (fast,) = row["reference"]["runs"], row["fastft"]["runs"]
        assert (ref["model"], ref["arch"]) == (fast["model"], fast["arch"]) == (model, arch)
        assert (ref["loader"], ref["amp"], ref["channels_last"]) == ("torch", "off", False)
        assert fast["channels_last"] is True
        assert row["speedup_e2e"] > 0 and row["speedup_compute"] > 0 and row["speedup_cpu"] > 0


def test_model_option_benches_that_model(private_cache):
    result = bench_cli(["--model", "efficientnet_b0", "--strategies", "frozen,finetune"], private_cache / "b.json")
    assert result["complete"] and result["header"]["models"] == ["efficientnet_b0"]
    assert_rows_ran(result, [("efficientnet_b0", "frozen", "EfficientNet"),
                             ("efficientnet_b0", "finetune", "EfficientNet")])
    cells = table_cells(result)
    assert [c[:2] for c in cells] == [["efficientnet_b0", "frozen"], ["efficientnet_b0", "finetune"]]
    assert all(float(c[4].rstrip("x")) > 0 and float(c[2]) > 0 for c in cells)  # speedup e2e, e2e img/s


def test_models_option_gives_one_row_per_model_and_strategy(private_cache):
    result = bench_cli(["--models", "resnet18,mobilenet_v3_large", "--strategies", "frozen,partial:2"],
                       private_cache / "b.json")
    assert result["header"]["models"] == ["resnet18", "mobilenet_v3_large"]
    assert_rows_ran(result, [("resnet18", "frozen", "ResNet"), ("resnet18", "partial:2", "ResNet"),
                             ("mobilenet_v3_large", "frozen", "MobileNetV3"),
                             ("mobilenet_v3_large", "partial:2", "MobileNetV3")])
    cells = table_cells(result)
    assert len(cells) == 4 and all(float(c[4].rstrip("x")) > 0 for c in cells)
    assert "resnet18, mobilenet_v3_large" in format_table(result).splitlines()[0]


def test_a_weights_file_the_engine_refuses_fails_its_row_only(monkeypatch, tmp_path):
    """hotdog's random 1000-way file is the bench's own, so a WeightsError (fastft.model.read_weights
    reads ResNet-18 files only so far) is that row's failure, not the user's: the others run."""
    def measure(spec, model, strategy, *args):
        if model == "mobilenet_v3_large" and strategy == "hotdog":
            raise WeightsError("x.pth: only 0 of ResNet-18's 100 backbone tensors match")
        return {"model": model, "strategy": strategy}
    monkeypatch.setattr(bench, "prepare_data", lambda spec: tmp_path)
    monkeypatch.setattr(bench, "random_imagenet_weights", lambda path, model, size: path)
    monkeypatch.setattr(bench, "measure_row", measure)
    spec = BenchSpec(models=("resnet18", "mobilenet_v3_large"), strategies=("hotdog", "frozen"))
    rows = bench.run_bench(spec)["rows"]
    assert [(r["model"], r["strategy"], r.get("error")) for r in rows] == [
        ("resnet18", "hotdog", None), ("resnet18", "frozen", None),
        ("mobilenet_v3_large", "hotdog", "WeightsError: x.pth: only 0 of ResNet-18's 100 backbone tensors match"),
        ("mobilenet_v3_large", "frozen", None)]
    long = {"model": "m", "strategy": "hotdog", "error": "WeightsError: " + "x" * 200}
    (cells,) = bench.table_rows({"rows": [long]})
    assert cells[2] == "failed: WeightsError: " + "x" * 86 + "..."


def test_model_and_models_set_one_tuple_and_cannot_be_combined(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "bench_main", lambda spec, j, p: seen.append(spec.models) or 0)
    assert cli.main(["bench", "--model", "timm:efficientvit_b0"]) == 0
    assert cli.main(["bench", "--models", "resnet18,,convnext_tiny"]) == 0
    assert cli.main(["bench"]) == 0
    assert seen == [("timm:efficientvit_b0",), ("resnet18", "convnext_tiny"), ("resnet18",)]
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--model", "resnet18", "--models", "resnet50"])
    assert info.value.code == 2 and "not allowed with argument --model" in capsys.readouterr().err


def test_an_unknown_model_is_one_line_before_anything_runs(monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("ran before checking the names"))
    with pytest.raises(bench.ConfigError, match="resnet81: not a torchvision classifier") as info:
        bench_main(BenchSpec(models=("resnet18", "resnet81")))
    assert "\n" not in info.value.one_line()
    with pytest.raises(bench.ConfigError, match="--models names none"):
        bench_main(BenchSpec(models=()))


def test_hotdog_weights_are_made_only_where_hotdog_runs_and_per_model(monkeypatch, tmp_path):
    made, measured = [], []
    monkeypatch.setattr(bench, "prepare_data", lambda spec: tmp_path)
    monkeypatch.setattr(bench, "random_imagenet_weights", lambda path, model, size: made.append((model, size)) or path)
    monkeypatch.setattr(bench, "measure_row", lambda spec, model, strategy, data, weights, work:
                        measured.append((model, strategy, weights and weights.name)) or {"model": model})
    bench.run_bench(BenchSpec(models=("resnet18", "timm:efficientvit_b0"), strategies=("frozen",)))
    assert made == [] and [m[2] for m in measured] == [None, None]
    bench.run_bench(BenchSpec(models=("resnet18", "timm:efficientvit_b0"), strategies=("hotdog",), image_size=0))
    assert made == [("resnet18", 0), ("timm:efficientvit_b0", 0)]
    assert measured[2:] == [("resnet18", "hotdog", "random-imagenet-resnet18.pth"),
                            ("timm:efficientvit_b0", "hotdog", "random-imagenet-timm-efficientvit_b0.pth")]
