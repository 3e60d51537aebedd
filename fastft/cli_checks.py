"""What the command line can check before it imports torch: flag values, paths, the batch split.

`--help` answers in a fraction of a second, while importing torch and torchvision takes 10-30 s
on a busy laptop. A typo (`--strategy fintune`, `--image-size 17`, `--lr -1`) is found from the
arguments alone, so it is answered before that import, with the nearest valid value where one
is near. Nothing here imports torch; tests/test_cli_inputs.py checks that in a fresh process.

Under torchrun every process parses the same arguments and sees the same WORLD_SIZE, so these
checks fail alike everywhere: only rank 0 prints the line (`print_on_this_rank`).
"""

from __future__ import annotations

import argparse
import os

from fastft.config import TrainConfig, batch_split_problem, device_problem, paths_problem, seed_problem, validate
from fastft.errors import ConfigError


def world_size(env: dict | None = None) -> int:
    """Processes torchrun started (WORLD_SIZE), 1 without torchrun or with a malformed value
    (distributed.launch_from_env reports that one later)."""
    value = (os.environ if env is None else env).get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def print_on_this_rank(env: dict | None = None) -> bool:
    """True for rank 0, and for a process torchrun did not start."""
    return (os.environ if env is None else env).get("RANK", "0") in ("0", "")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_train(given: dict) -> None:
    """The typed train options (`given`, as TrainConfig's fields) on their own and against the
    processes torchrun started. Raises ConfigError (one line)."""
    cfg = TrainConfig(**given)
    validate(cfg)
    problem = paths_problem(cfg) or batch_split_problem(cfg.batch_size, world_size())
    _require(problem is None, problem or "")


def check_bench(args: argparse.Namespace) -> None:
    """Each strategy and the shared settings as a train run would take them."""
    _require(bool(args.strategies.strip(",")), "--strategies names none; e.g. --strategies finetune,frozen")
    _require(args.repeats >= 1, f"--repeats must be at least 1, got {args.repeats}")
    for strategy in (s for s in args.strategies.split(",") if s):
        validate(TrainConfig(data=args.data, synth_train=args.train_images, synth_test=args.test_images,
                             image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
                             device=args.device, amp=args.amp, loader=args.loader, optimizer=args.optimizer,
                             compile_mode=args.compile_mode, workers=args.workers, strategy=strategy))


def check_eval(args: argparse.Namespace) -> None:
    _require(args.top >= 0, f"--top must be 0 or more, got {args.top}")
    _require(args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}")
    problem = device_problem(args.device)
    _require(problem is None, problem or "")


def check_predict(args: argparse.Namespace) -> None:
    """--top-k and --device; the images themselves are listed by layout.image_files."""
    _require(args.top_k >= 1, f"--top-k must be at least 1, got {args.top_k}")
    problem = device_problem(args.device)
    _require(problem is None, problem or "")


def check_synth(args: argparse.Namespace) -> None:
    _require(min(args.synth_train, args.synth_test) >= 2, f"--synth-train and --synth-test must be at "
             f"least 2 (a class needs an image), got {args.synth_train}/{args.synth_test}")
    problem = seed_problem(args.seed)
    _require(problem is None, problem or "")
