"""torch.compile paid once: Inductor's caches kept with fastft's, and the `auto` choice.

Inductor already caches compiled graphs on disk (its FX graph cache and AOTAutograd's
cache, both on by default: torch/_inductor/config.py `fx_graph_cache`,
torch/_functorch/config.py `enable_autograd_cache`), but in
/tmp/torchinductor_<user>, which a reboot wipes. `keep_compile_cache` points them at
$XDG_CACHE_HOME/fastft/compile instead, through TORCHINDUCTOR_CACHE_DIR, the one
setting torch reads for it (torch/_inductor/runtime/cache_dir_utils.py, read on every
lookup, so setting it before the first compile is enough). Triton's kernels follow it:
Inductor puts them in <that folder>/triton/<device> when TRITON_CACHE_DIR is unset.
A folder the user set in either variable is left alone.

Why not torch.compiler.save_cache_artifacts / load_cache_artifacts (the portable
"mega-cache")? They serialise the same FX graph and AOTAutograd entries into one blob
for moving to another machine; on the same machine the on-disk caches give the same
hits with no save step and nothing to load. Dynamo's tracing is redone either way.

`choose_compile` decides `--compile auto`: compile when the work ahead times the time
compile saves per step beats the compile's cost, cold or warm (a marker file written
after a compiled run of the same configuration says warm).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastft.config import TrainConfig, default_cache_dir
from fastft.runtime import Runtime

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
MARKERS = "fastft-warm"  # sub-folder of the compile cache: one marker per compiled configuration


def _user_cache_dir(env) -> str | None:
    """TORCHINDUCTOR_CACHE_DIR as the user set it. Importing torch._dynamo writes torch's own
    default there (torch/_dynamo/package.py calls cache_dir() at import), so that value
    counts as unset: a user who typed /tmp/torchinductor_<user> gets fastft's folder."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    value = env.get(CACHE_ENV)
    return value if value and os.path.abspath(value) != os.path.abspath(torch_default()) else None


def compile_cache_dir(env=os.environ) -> Path:
    """The folder Inductor caches in for this process: the user's TORCHINDUCTOR_CACHE_DIR,
    else $XDG_CACHE_HOME/fastft/compile (~/.cache/fastft/compile)."""
    user = _user_cache_dir(env)
    return Path(user) if user else default_cache_dir() / "compile"


def keep_compile_cache(env=os.environ) -> Path:
    """Make Inductor cache in compile_cache_dir() and return it; call before the first compile.

    Sets TORCHINDUCTOR_CACHE_DIR in `env` (the process environment: torch reads it there on
    every cache lookup, and compile workers inherit it) unless the user set it.
    """
    folder = compile_cache_dir(env)
    folder.mkdir(parents=True, exist_ok=True)
    env[CACHE_ENV] = str(folder)
    return folder


def compile_key(cfg: TrainConfig, rt: Runtime, torch_version: str = torch.__version__) -> dict:
    """What makes Inductor build different graphs: fixed shapes (dynamic=False), dtypes,
    layout, the frozen split, the mode, the device type and torch itself."""
    return {"strategy": cfg.strategy, "image_size": cfg.image_size,
            "batch_per_process": cfg.batch_size // max(1, rt.world_size), "amp": rt.amp_name,
            "channels_last": rt.channels_last, "fast_frozen": cfg.fast_frozen,
            "compile_mode": cfg.compile_mode, "world_size": rt.world_size,
            "device": rt.device.type, "torch": torch_version}


def _marker(key: dict, env) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return compile_cache_dir(env) / MARKERS / f"{digest}.json"


def is_warm(key: dict, env=os.environ) -> bool:
    """Whether a compiled run of this configuration finished with the cache folder in use."""
    return _marker(key, env).is_file()


def mark_warm(key: dict, env=os.environ) -> None:
    """Record that the cache now holds this configuration's graphs (after a compiled run)."""
    path = _marker(key, env)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(key, sort_keys=True) + "\n")
    except OSError:  # a full or read-only cache: the next run only guesses the compile cold
        pass


@dataclass(frozen=True)
class CompileCost:
    """What compiling ResNet-18 costs and saves on one device type."""
    eager_ms_per_image: float  # ms, one training image's step share at 224 px, eager
    speedup: float             # compiled step rate / eager step rate (steady state)
    cold_s: float              # s, compile time with an empty cache (train and eval graphs)
    warm_s: float              # s, compile time when an earlier run filled the cache
    source: str                # where the figures come from


# Per device type; replace a row by measuring two `fastft train --compile` runs with one cache
# folder (cold, then warm) and a --no-compile run, and reading summary.json.
# cpu: 2-core AMD EPYC (AVX512-BF16, bf16), finetune, batch 16, shared with other jobs (load ~10):
#   steady compiled/eager img/s in adjacent runs 1.56/1.54 at 224 px, 3.22/4.41 and 2.02/2.58 at
#   64 px: no gain (speedup taken as 1.0); compile_s cold 238 s / warm 4.3 s at 224 px, cold 220 s /
#   warm 6.0-9.7 s at 64 px, plus ~50 s cold for the eval graph. The eager step share is the unloaded bare-step ceiling, 7.2 img/s at 224 px.
# cuda: guesses for ResNet-18 on an H100, not measurements (no GPU has been lent yet): 0.25 ms a
#   224-px training image eager (4,000 img/s, a round figure), 1.3x from compiling, 40 s cold and 5 s
#   warm (the CPU row's cold/warm ratio with Triton's parallel kernel builds). For the chapter's job
#   (5 epochs of 2,000 images at batch 128) they give "~0.7 s saved <= ~40 s cold", so auto stays
#   eager there. To replace them: bench/gpu_check.sh runs that job compiled cold, compiled warm and
#   eager (job_cold, job_warm, job_eager), and bench/gpu_report.py prints the measured row as
#   "choose_compile's cuda row from these: CompileCost(eager_ms_per_image=..., speedup=..., cold_s=...,
#   warm_s=...)", beside the cold and warm compile s and the eager and compiled ms per step.
COMPILE_COSTS = {
    "cpu": CompileCost(eager_ms_per_image=140.0, speedup=1.0, cold_s=270.0, warm_s=10.0,
                       source="measured, no gain on a CPU"),
    "cuda": CompileCost(eager_ms_per_image=0.25, speedup=1.3, cold_s=40.0, warm_s=5.0,
                        source="an estimate, not yet measured on a GPU"),
}
FORWARD_SHARE = 1 / 3  # an eval image costs a forward, about a third of a training step's forward+backward


def choose_compile(device_type: str, image_size: int, batch_size: int, epochs: int,
                   train_images: int, test_images: int, warm: bool,
                   costs: dict = COMPILE_COSTS) -> tuple[bool, str]:
    """(compile?, one-line reason) for `--compile auto`.

    Expected saving = (train steps + eval batches x FORWARD_SHARE) x saving per step, where a
    step's saving is batch_size x eager_ms_per_image x (image_size / 224)^2 x (1 - 1/speedup):
    step cost taken as proportional to pixels. Compile when that beats the cold compile, or the
    warm one when `warm`. Batch and image counts are per process. An unknown device type does
    not compile.
    """
    cost = costs.get(device_type)
    if cost is None:
        return False, f"compile: off (auto): no compile figures for {device_type}"
    train_steps = epochs * math.ceil(train_images / batch_size)
    eval_steps = epochs * math.ceil(test_images / batch_size)
    per_image_ms = cost.eager_ms_per_image * (image_size / 224) ** 2 * (1 - 1 / cost.speedup)
    step_ms = batch_size * per_image_ms
    saved_s = (train_steps + eval_steps * FORWARD_SHARE) * step_ms / 1000
    compile_s = cost.warm_s if warm else cost.cold_s
    on = saved_s > compile_s
    return on, (f"compile: {'on' if on else 'off'} (auto): {train_steps} steps + {eval_steps} eval batches "
                f"x ~{step_ms:.1f} ms saved per step = ~{saved_s:.1f} s {'>' if on else '<='} "
                f"~{compile_s:.1f} s {'warm' if warm else 'cold'} compile on {device_type} ({cost.source})")


def settle_compile(cfg: TrainConfig, rt: Runtime, train_images: int, test_images: int) -> tuple[Runtime, str]:
    """`rt` with compile decided, and the log line that says why; Inductor's cache is kept
    (keep_compile_cache) when compiling. Call once the data is scanned, before the loaders
    are built: they drop the ragged batch when compiling. Image counts are the whole splits.

    `--compile`/`--no-compile` decide alone; a typed --compile-mode other than default asks
    for compile. Under torchrun the cache's state is not consulted (taken as cold), since
    another machine's cache may differ and every process must make the same choice.
    """
    if cfg.compile is not None:
        on, reason = cfg.compile, f"compile: {'on (--compile)' if cfg.compile else 'off (--no-compile)'}"
    elif cfg.compile_mode != "default":
        on, reason = True, f"compile: on (auto): --compile-mode {cfg.compile_mode} asks for it"
    else:
        world = max(1, rt.world_size)
        warm = not rt.distributed and is_warm(compile_key(cfg, rt))
        on, reason = choose_compile(rt.device.type, cfg.image_size, max(1, cfg.batch_size // world),
                                    cfg.epochs, math.ceil(train_images / world), math.ceil(test_images / world),
                                    warm)
    if on:
        reason += f"; Inductor caches in {keep_compile_cache()}"
    return dataclasses.replace(rt, compile=on), reason
