"""torch.compile paid once: Inductor's cache under fastft's cache folder, reused by a fresh
process, and `--compile auto` weighing the work ahead against the compile's cost."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from fastft import compile_cache
from fastft.cli import main, parser
from fastft.compile_cache import (CACHE_ENV, CompileCost, choose_compile, compile_key, keep_compile_cache, mark_warm,
                                  settle_compile)
from fastft.config import TrainConfig
from fastft.runtime import resolve_runtime

# 1 ms per image at 224 px, twice as fast compiled: 0.5 ms saved per image, 5 ms per step of 10.
TABLE = {"gpu": CompileCost(eager_ms_per_image=1.0, speedup=2.0, cold_s=1.0, warm_s=0.1, source="test table")}


def test_the_cache_goes_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env = {}
    folder = keep_compile_cache(env)
    assert folder == tmp_path / "xdg" / "fastft" / "compile" and folder.is_dir()
    assert env == {CACHE_ENV: str(folder)}


def test_a_cache_folder_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env = {CACHE_ENV: str(tmp_path / "mine")}
    assert keep_compile_cache(env) == tmp_path / "mine"
    assert env == {CACHE_ENV: str(tmp_path / "mine")} and not (tmp_path / "xdg").exists()


def test_torchs_own_default_is_not_a_user_choice(tmp_path, monkeypatch):
    # Importing torch._dynamo writes /tmp/torchinductor_<user> into the variable.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env = {CACHE_ENV: torch_default()}
    assert keep_compile_cache(env) == tmp_path / "xdg" / "fastft" / "compile"
    assert env == {CACHE_ENV: str(tmp_path / "xdg" / "fastft" / "compile")}


# Compiles a tiny model's forward and backward twice in one fresh process, Dynamo reset in
# between, so the second compile can only come from the on-disk caches. No bias: its gradient's
# sum would be a C++ kernel, and compiling that costs ~30 s on 2 cores; two matmuls cost ~5 s.
COMPILE_TWICE = """
import json, torch
from torch._dynamo.utils import counters
from fastft.compile_cache import keep_compile_cache
keep_compile_cache()
def compile_once():
    counters.clear()
    torch._dynamo.reset()
    model = torch.compile(torch.nn.Linear(8, 4, bias=False), dynamic=False)
    model(torch.randn(2, 8)).sum().backward()
    return {"fx_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
            "aot_hit": counters["aot_autograd"]["autograd_cache_hit"]}
print(json.dumps([compile_once(), compile_once()]))
"""


def test_a_second_compile_comes_from_the_cache_under_xdg(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (CACHE_ENV, "TRITON_CACHE_DIR")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), TORCHINDUCTOR_COMPILE_THREADS="1")  # no worker pool
    done = subprocess.run([sys.executable, "-c", COMPILE_TWICE], env=env, check=True, capture_output=True, text=True)
    cold, warm = json.loads(done.stdout.splitlines()[-1])
    assert cold["fx_hit"] == 0 and cold["aot_hit"] == 0 and cold["fx_miss"] == 2  # forward and backward
    assert warm["fx_miss"] == 0 and warm["aot_hit"] == 1
    assert len(list((tmp_path / "xdg" / "fastft" / "compile" / "fxgraph").rglob("*"))) > 0


def test_a_long_cuda_job_compiles_and_a_short_cpu_job_does_not():
    # ImageNet-sized: 90 epochs of 1.28 M images at batch 256, on the shipped figures.
    on, reason = choose_compile("cuda", 224, 256, 90, 1_281_167, 50_000, warm=False)
    assert on and reason.startswith("compile: on (auto): 450450 steps + 17640 eval batches") and "cold" in reason
    # The hotdog chapter's job on a CPU.
    on, reason = choose_compile("cpu", 224, 128, 5, 2000, 800, warm=False)
    assert not on and reason.startswith("compile: off (auto): 80 steps + 35 eval batches") and "on cpu" in reason


def test_a_warm_cache_flips_a_borderline_job():
    # 10 epochs x 10 steps of 10 images: 100 steps x 5 ms = 0.5 s saved, against 1 s cold, 0.1 s warm.
    cold = choose_compile("gpu", 224, 10, 10, 100, 0, warm=False, costs=TABLE)
    warm = choose_compile("gpu", 224, 10, 10, 100, 0, warm=True, costs=TABLE)
    assert cold == (False, "compile: off (auto): 100 steps + 0 eval batches x ~5.0 ms saved per step "
                           "= ~0.5 s <= ~1.0 s cold compile on gpu (test table)")
    assert warm == (True, "compile: on (auto): 100 steps + 0 eval batches x ~5.0 ms saved per step "
                          "= ~0.5 s > ~0.1 s warm compile on gpu (test table)")


def test_the_saving_scales_with_pixels_and_counts_eval_batches_at_a_third():
    # 112 px: a quarter of the pixels, 1.25 ms per step; 30 eval batches count as 10 steps.
    on, reason = choose_compile("gpu", 112, 10, 1, 100, 300, warm=False, costs=TABLE)
    assert not on and "10 steps + 30 eval batches x ~1.2 ms saved per step = ~0.0 s" in reason
    assert choose_compile("tpu", 224, 10, 10, 100, 0, warm=True, costs=TABLE) == (
        False, "compile: off (auto): no compile figures for tpu")


def cpu_runtime(**overrides):
    cfg = TrainConfig(device="cpu", amp="off", workers=0, image_size=224, batch_size=10, epochs=10, **overrides)
    return cfg, resolve_runtime(cfg)


def test_the_engine_choice_follows_flags_then_the_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setitem(compile_cache.COMPILE_COSTS, "cpu", TABLE["gpu"])
    cfg, rt = cpu_runtime()
    settled, reason = settle_compile(cfg, rt, 100, 0)
    assert not settled.compile and "cold compile" in reason and CACHE_ENV not in os.environ
    mark_warm(compile_key(cfg, rt))  # as a finished compiled run of this configuration leaves it
    assert (tmp_path / "xdg" / "fastft" / "compile" / "fastft-warm").is_dir()
    settled, reason = settle_compile(cfg, rt, 100, 0)
    assert settled.compile and "warm compile" in reason and os.environ[CACHE_ENV] in reason
    other, _ = settle_compile(TrainConfig(**{**cfg.to_dict(), "image_size": 112}), rt, 100, 0)
    assert not other.compile  # another image size is another graph: cold
    ddp, _ = settle_compile(cfg, dataclasses.replace(rt, distributed=True), 100, 0)
    assert not ddp.compile  # under torchrun every process takes the cache as cold
    for typed, expected in [(True, "compile: on (--compile)"), (False, "compile: off (--no-compile)")]:
        settled, reason = settle_compile(cpu_runtime(compile=typed)[0], rt, 100, 0)
        assert settled.compile is typed and reason.startswith(expected)
    settled, reason = settle_compile(cpu_runtime(compile_mode="max-autotune")[0], rt, 1, 0)
    assert settled.compile and reason.startswith("compile: on (auto): --compile-mode max-autotune asks for it")


def test_the_compile_flags_reach_the_config():
    assert TrainConfig().compile is None  # auto
    assert parser().parse_args(["train", "--compile"]).compile is True
    assert parser().parse_args(["train", "--no-compile"]).compile is False
    assert "compile" not in vars(parser().parse_args(["train"]))  # untyped: the config's auto


def test_the_default_run_says_why_in_its_log_and_config(tiny_data, imagenet_like, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--weights", str(imagenet_like), "--image-size", "32",
                 "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--amp", "off", "--out", str(out)]) == 0
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    # 24 train and 12 test images at batch 8; the CPU row of the shipped table saves nothing.
    reason = "compile: off (auto): 3 steps + 2 eval batches x ~0.0 ms saved per step"
    assert resolved["compile"] is False and resolved["compile_reason"].startswith(reason)
    assert resolved["compile_reason"] in capsys.readouterr().out.splitlines()
