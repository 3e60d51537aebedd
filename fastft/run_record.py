"""What a run records about itself: config.json's `resolved` settings and summary.json's figures,
read from a set-up engine.Trainer, so the engine keeps to running the job (report.py writes them).
"""

from __future__ import annotations

from fastft import __version__, distributed
from fastft.forward import compile_fallbacks
from fastft.resources import compiled_graphs, peak_memory
from fastft.timing import steady_rates


def resolved_settings(trainer) -> dict:
    """config.json's `resolved`: what `auto` and the machine made of the options (device, AMP,
    compile and why, loader, threads and why, per-group lr, the model's preprocessing, ...)."""
    t = trainer
    return {"device": str(t.rt.device), "amp": t.rt.amp_name, "compile": t.rt.compile,
            "compile_reason": t.compile_reason, "workers": t.rt.workers, "world_size": t.rt.world_size,
            "data_dir": str(t.data_dir), "loader": t.data.name,
            "classes": list(t.data.classes), "cudnn_benchmark": t.cudnn_benchmark,
            "threads": t.threads.choice.threads, "threads_reason": t.threads.choice.reason,
            "lr_per_group": [group["lr"] for group in t.optimizer.param_groups],  # --tensorboard's lr
            "model": t.spec.name, "preprocessing": t.preprocessing.to_dict(),  # what predict/eval apply
            "fastft_version": __version__}


def run_summary(trainer, last: dict, wall_s: float) -> dict:
    """summary.json's figures (job_s and phases_s are added by the engine): `last` is the final
    epoch's metrics record, `wall_s` the fit's wall time in seconds. Every process must call it
    (replicas_identical gathers from all)."""
    t = trainer
    graphs, fallbacks = compiled_graphs(), compile_fallbacks() - t.fallbacks_before
    return {
        "model": t.spec.name, "preprocessing": t.preprocessing.to_dict(),
        "strategy": t.cfg.strategy, "epochs": last["epoch"],
        "train_loss": last["train_loss"], "train_acc": last["train_acc"],
        "test_acc": last["test_acc"], "test_examples": last["test_examples"],
        **steady_rates(t.timings, t.rt.compile),
        # A frame Dynamo declined (the recompile limit) runs eagerly and adds no graph: it counts
        # as a recompile, and on its own as an eager fallback.
        "compiled_graphs": graphs - t.graphs_before,
        "recompiles": graphs - t.graphs_after_warmup + fallbacks, "eager_fallbacks": fallbacks,
        **peak_memory(t.rt.device, t.data.name, t.peak_reset),  # peak_mem_mb, what it covers
        "world_size": t.rt.world_size, "replicas_identical": _replicas_identical(t),
        "device": str(t.rt.device), "loader": t.data.name,
        "amp": t.rt.amp_name, "compile": t.rt.compile, "channels_last": t.rt.channels_last,
        "batch_size": t.cfg.batch_size, "image_size": t.cfg.image_size, "wall_s": wall_s,
        **getattr(t.data, "cache_stats", dict)(),  # --loader cached: cache_mb, cache_decode_s
    }


def _replicas_identical(trainer) -> bool:
    """DDP keeps replicas equal; a silent divergence would make rank 0's checkpoint a lie."""
    if not trainer.rt.distributed:
        return True
    prints = distributed.gather_to_all(distributed.replica_fingerprint(trainer.model.parameters()))
    return all(p == prints[0] for p in prints)
