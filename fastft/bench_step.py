"""One step of the engine, timed on a fixed batch already on the device (the data path taken out).

`fastft bench` times whole runs; bench/strategies.py and tests/benchmarks time the step alone
with these, so both read the step exactly as the engine runs it.
"""

from __future__ import annotations

import statistics


def ready_step(trainer):
    """The engine's own `train_step`, with the model in the mode `train_epoch` sets."""
    trainer.strategy.set_train_mode(trainer.model, trainer.structure)
    return trainer.train_step


def fixed_batch(trainer, seed: int = 0):
    """A random (x, y) as the loader feeds the step: the data path taken out of the step.

    x takes the shape, dtype, strides and device of the loader's first train batch (one is drawn:
    bf16 under --amp bf16 from the cached and DALI loaders and the torch loader's uint8 batches,
    fp32 from its fp32 ones; channels_last where used), y its shape and device. A compiled step
    guards on all of these, so an fp32 batch where the loader feeds bf16 compiles a second, cold
    graph and times it. The loader handles a pass left unfinished (DALI drains it).
    """
    import torch
    x_real, y_real = trainer.data.to_device(*next(iter(trainer.data.train_batches(0))))
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty_strided(x_real.shape, x_real.stride(), dtype=x_real.dtype, device=x_real.device)
    x.copy_(torch.randn(x_real.shape, generator=gen))
    y = torch.randint(0, len(trainer.data.classes), y_real.shape, generator=gen)
    return x, y.to(y_real.device)


def seconds_per_step(step, x, y, steps: int, warmup: int = 1) -> float:
    """Seconds per call after `warmup` calls (compile, allocator, cuDNN autotune).

    CPU: the median of single steps (robust to a neighbour's burst). CUDA: the steps run back to
    back between two syncs, as in training (a sync per step would add a launch gap), and the mean.
    """
    import time

    import torch
    for _ in range(warmup):
        step(x, y)
    if x.is_cuda:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
