"""bench/job_ceiling.py's arithmetic, its process timer, --model and its timm equivalents; one tiny
job runs end to end (marked slow: four processes)."""

from __future__ import annotations

import json
import re
import sys

import pytest


@pytest.fixture(scope="module")
def jc(bench_script):
    return bench_script("job_ceiling")


CEILING = {"step_img_s": 10.0, "forward_img_s": 40.0, "step_img_cpu": 5.0, "forward_img_cpu": 20.0}


def test_ideal_follows_the_module_doc_in_wall_and_cpu_seconds(jc):
    # finetune: import + epochs x train / step + epochs x test / forward
    assert jc.ideal_seconds("finetune", CEILING, 3.0, 400, 200, 2) == 3.0 + 800 / 10 + 400 / 40
    # frozen: every train image at the forward rate, the test set once (its features are kept)
    assert jc.ideal_seconds("frozen", CEILING, 3.0, 400, 200, 2) == 3.0 + 800 / 40 + 200 / 40
    assert jc.ideal_seconds("frozen", CEILING, 2.0, 400, 200, 2, "cpu") == 2.0 + 800 / 20 + 200 / 20


def test_timed_process_counts_the_child_cpu_and_not_a_sleep(jc):
    # The busy child spins until its own CPU clock has run 0.3 s, whatever the CPU's speed.
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    busy, busy_cpu = jc.timed_process([sys.executable, "-c", spin])
    idle, idle_cpu = jc.timed_process([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert idle >= 0.5 and idle_cpu < idle - 0.3   # a sleeping child costs wall time, little CPU
    assert busy >= 0.3 and busy_cpu >= 0.3          # a busy one costs both


@pytest.mark.slow
def test_model_option_runs_the_job_its_reference_and_its_own_ceiling(jc, tmp_path, capsys):
    """The test mode: a tiny job end to end (2 processes of `fastft train`, 2 imports) with --model."""
    from fastft import cli
    data = tmp_path / "data"
    assert cli.main(["data", "synth", str(data), "--train", "8", "--test", "4"]) == 0
    out = tmp_path / "job.json"
    assert jc.main(["--data", str(data), "--model", "mobilenet_v3_large", "--jobs", "frozen", "--reference",
                    "--repeats", "1", "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--steps", "1",
                    "--amp", "off", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    (repeat,) = saved["repeats"]
    assert saved["model"] == repeat["model"] == "mobilenet_v3_large" and saved["image_size"] == 32
    job = repeat["jobs"]["frozen"]
    assert "--model mobilenet_v3_large" in job["cmd"] and job["efficiency"] > 0 and job["vs_d2l"] > 0
    forward = repeat["forward_img_s"]  # frozen: 8 train images once (1 epoch), the 4 test images once
    assert job["ideal_s"] == pytest.approx(repeat["import_s"] + 8 / forward + 4 / forward)
    assert "ceiling step (mobilenet_v3_large, fp32" in capsys.readouterr().out


def test_ceiling_threads_sets_the_ceilings_torch_threads(jc, monkeypatch):
    import torch

    import fastft.threads
    before = torch.get_num_threads()
    monkeypatch.setattr(fastft.threads, "decide", lambda: fastft.threads.ThreadChoice(1, "busy neighbour"))
    try:
        assert jc.ceiling_rates(2, 32, "off", 1, "resnet18", threads=-1)["ceiling_threads"] == 1
        assert jc.ceiling_rates(2, 32, "off", 1, "resnet18", threads=0)["ceiling_threads"] == 1  # left as it is
    finally:
        torch.set_num_threads(before)


def test_model_defaults_to_its_own_input_size_and_reference_jobs_narrow_the_reference(jc):
    args = jc.parse_args(["--data", "d", "--model", "timm:mobilenetv4_conv_small", "--reference-jobs", "frozen"])
    assert (args.model, args.image_size, args.reference_jobs) == ("timm:mobilenetv4_conv_small", 224, "frozen")
    assert jc.parse_args(["--data", "d"]).image_size == 224 and jc.parse_args(["--data", "d"]).model == "resnet18"


def test_timm_runs_the_timm_equivalent_or_says_why_not(jc, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(jc, "timed_process", lambda cmd, **kw: seen.append(cmd) or (20.0, 30.0))
    for model, timm_name in (("mobilenet_v3_large", "mobilenetv3_large_100"),
                             ("timm:efficientvit_b0", "efficientvit_b0")):
        args = jc.parse_args(["--data", "d", "--model", model, "--timm", "train.py", "--image-size", "64"])
        run = {"wall_s": 10.0, "cpu_s": 10.0}
        jc.add_timm_run(args, run, tmp_path)
        assert seen[-1][seen[-1].index("--model") + 1] == timm_name and run["timm_model"] == timm_name
        assert (run["vs_timm"], run["vs_timm_cpu"]) == (2.0, 3.0) and "timm_note" not in run
    run = {"wall_s": 10.0, "cpu_s": 10.0}
    jc.add_timm_run(jc.parse_args(["--data", "d", "--model", "alexnet", "--timm", "t.py"]), run, tmp_path)
    assert len(seen) == 2 and run == {"wall_s": 10.0, "cpu_s": 10.0,
                                      "timm_note": "n/a: timm has no equivalent of alexnet "
                                                   "(bench/job_ceiling.py TIMM_RENAMED)"}


def test_timm_equivalents_name_real_models_on_both_sides(jc):
    timm = pytest.importorskip("timm", reason="timm is optional (pip install 'fastft[timm]')")
    from fastft.models.registry import torchvision_classifiers
    assert set(jc.TIMM_RENAMED) <= set(torchvision_classifiers())
    assert [name for name in jc.TIMM_RENAMED.values() if not timm.is_model(name)] == []
    assert jc.TIMM_RENAMED["regnet_y_1_6gf"] == "regnety_016"
    assert [jc.timm_model_name(n) for n in ("resnet50", "convnext_tiny", "timm:efficientvit_b0", "googlenet")] == [
        "resnet50", "convnext_tiny", "efficientvit_b0", None]


def test_timm_gets_a_fixed_size_models_size_and_a_failed_train_py_is_a_note(jc, monkeypatch, tmp_path):
    pytest.importorskip("timm", reason="timm is optional (pip install 'fastft[timm]')")
    assert jc.timm_size_kwargs("vit_b_16", 64) == ["--model-kwargs", "img_size=64"]
    assert jc.timm_size_kwargs("vit_b_16", 224) == [] and jc.timm_size_kwargs("resnet18", 64) == []

    def fail(cmd, **kw):
        raise jc.subprocess.CalledProcessError(2, cmd)
    monkeypatch.setattr(jc, "timed_process", fail)
    run = {"wall_s": 10.0, "cpu_s": 10.0}
    jc.add_timm_run(jc.parse_args(["--data", "d", "--model", "vit_b_16", "--timm", "t.py"]), run, tmp_path)
    assert run["timm_note"] == "failed: timm's train.py exited 2 (its stderr is not kept)" and "vs_timm" not in run


def test_crop_ahead_runs_the_cli_with_the_crops_one_batch_ahead(jc, tiny_data, tmp_path):
    """--crop-ahead's launcher: the same job as `python -m fastft train`, but the cached loader says
    (and does) its CPU crops one batch ahead; the plain CLI crops in the loop."""
    import subprocess
    args = ["train", "--data", str(tiny_data), "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--epochs", "1", "--device", "cpu", "--amp", "off", "--no-compile", "--loader", "cached"]
    ahead = subprocess.run([sys.executable, *jc.CROP_AHEAD, *args, "--out", str(tmp_path / "ahead")],
                           capture_output=True, text=True, check=True)
    inline = subprocess.run([sys.executable, "-m", "fastft", *args, "--out", str(tmp_path / "inline")],
                            capture_output=True, text=True, check=True)
    crop_line = [line for line in ahead.stdout.splitlines() if line.startswith("cached train:")]
    assert len(crop_line) == 1 and crop_line[0].endswith("cropped during the step before, on a worker thread")
    inline_line = [line for line in inline.stdout.splitlines() if line.startswith("cached train:")]
    assert len(inline_line) == 1 and "worker thread" not in inline_line[0]
    # The CLI forks data.decode_ahead's child before torch loads; the loader took its images.
    decoded = re.search(r"; (\d+) decoded before, by a child process while torch imported", inline.stdout)
    assert decoded and 1 <= int(decoded.group(1)) <= 36, inline.stdout
    assert (tmp_path / "inline" / "summary.json").is_file() and (tmp_path / "ahead" / "summary.json").is_file()
