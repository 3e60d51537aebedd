"""bench/models_table.py: job_ceiling's job per model, its medians, the Markdown table and the JSON
(job_ceiling's runs are faked here; tests/test_job_ceiling.py runs a real one)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def mt(bench_script):
    return bench_script("models_table")


def fake_repeat(model: str, wall: float, timm: bool = True) -> dict:
    fine = {"wall_s": wall, "efficiency": 0.5, "efficiency_cpu": 0.6}
    if timm and model != "alexnet":
        fine.update(timm_wall_s=3 * wall, vs_timm=3.0, timm_model="t_" + model)
    elif timm:
        fine["timm_note"] = "n/a: timm has no equivalent of alexnet"
    frozen = {"wall_s": wall / 2, "efficiency": 0.4, "efficiency_cpu": 0.5, "reference_wall_s": wall,
              "vs_d2l": 2.0, "vs_d2l_cpu": 2.5}
    return {"model": model, "jobs": {"finetune": fine, "frozen": frozen}}


def test_row_is_the_median_of_the_repeats(mt):
    row = mt.model_row("resnet50", [fake_repeat("resnet50", w) for w in (10.0, 30.0, 20.0)])
    assert (row["finetune_s"], row["frozen_s"], row["reference_frozen_s"], row["timm_s"]) == (20.0, 10.0, 20.0, 60.0)
    assert (row["finetune_efficiency"], row["vs_d2l"], row["vs_timm"]) == (0.5, 2.0, 3.0)
    assert row["ceiling_threads"] == [None, None, None]  # fake repeats carry none
    assert row["timm_model"] == "t_resnet50" and row["timm_note"] is None


def test_quick_sets_the_smoke_sizes_and_the_job_asks_the_reference_for_frozen_only(mt, tmp_path):
    args = mt.parse_args(["--quick", "--timm", "train.py"])
    assert (args.train, args.test, args.image_size, args.batch_size, args.repeats) == (16, 8, 64, 8, 1)
    argv = mt.job_argv(mt.parse_args(["--models", "vit_b_16", "--ceiling-threads", "-1"]), "vit_b_16", tmp_path)
    assert argv[argv.index("--ceiling-threads") + 1] == "-1"
    assert argv[argv.index("--reference-jobs") + 1] == "frozen" and argv[argv.index("--image-size") + 1] == "0"
    assert "--timm" not in argv and mt.parse_args([]).models.split(",") == list(mt.MODELS)
    assert mt.job_argv(args, "resnet18", tmp_path)[-2:] == ["--timm", "train.py"]


def test_main_runs_every_model_and_writes_the_table_and_json(mt, bench_script, monkeypatch, tmp_path, capsys):
    jc = bench_script("job_ceiling")
    ran = []

    def one_repeat(args, repeat, jobs, work, train, test):
        ran.append((args.model, args.image_size, args.reference_jobs, jobs, train, test))
        if args.model == "convnext_tiny":
            raise RuntimeError("fastft train failed\ntrace")
        return fake_repeat(args.model, 10.0)
    monkeypatch.setattr(jc, "one_repeat", one_repeat)
    monkeypatch.setattr(mt, "job_ceiling", lambda: jc)
    data = tmp_path / "data"
    for split, count in (("train", 3), ("test", 2)):
        (data / split / "a").mkdir(parents=True)
        for i in range(count):
            (data / split / "a" / f"{i}.jpg").write_bytes(b"")
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    argv = ["--data", str(data), "--models", "resnet18,alexnet,convnext_tiny,timm:mobilenetv4_conv_small",
            "--timm", "train.py", "--json", str(out), "--markdown", str(md)]
    assert mt.main(argv) == 1  # a model failed
    assert [r[:3] for r in ran] == [("resnet18", 224, "frozen"), ("alexnet", 224, "frozen"),
                                    ("convnext_tiny", 224, "frozen"), ("timm:mobilenetv4_conv_small", 224, "frozen")]
    assert all(r[3:] == (["finetune", "frozen"], 3, 2) for r in ran)
    result = json.loads(out.read_text())
    assert result["complete"] and [r["model"] for r in result["rows"]] == [r[0] for r in ran]
    text = md.read_text()
    assert capsys.readouterr().out.endswith(text)
    lines = text.splitlines()
    assert lines[0].startswith("# fastft's whole job per model (20") and "UTC)" in lines[0]
    assert f"`python bench/models_table.py {' '.join(argv)}`" in text and "flags " in text and "loadavg" in text
    assert "the ceiling on torch's default thread(s)" in text
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| ")][2:]
    assert rows[0] == ["resnet18", "224", "10.0 (0.50)", "5.0 (2.00x)", "10.0", "30.0 (3.00x) as t_resnet18"]
    assert rows[1][5] == "n/a: timm has no equivalent of alexnet"
    assert rows[2][:3] == ["convnext_tiny", "224", "failed: RuntimeError: fastft train failed"]
    assert len(rows) == 4 and rows[3][0] == "timm:mobilenetv4_conv_small"


def test_without_timm_the_column_says_why(mt):
    row = mt.model_row("resnet18", [fake_repeat("resnet18", 10.0, timm=False)])
    assert mt.table_cells({**row, "image_size": 224}, timm_given=False)[5] == "n/a: no --timm TRAIN_PY given"
