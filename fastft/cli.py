"""The `fastft` command line: train, data synth|download|check, predict, eval, export, plot, bench.

    fastft train --data synthetic                       # no download needed
    fastft train --strategy frozen --out runs/frozen    # the chapter's hotdog set
    fastft train --out runs/frozen --resume --epochs 8  # continue a run

Exit status, the same for every command (README, "Exit codes"):
    0    done
    2    an error stated in one line: an option, an input file or folder, a checkpoint, a
         missing package (argparse's own usage errors exit 2 too)
    3    the command ran to its end and its report lists problems: `data check` found bad files
         or folders, `bench` had a variant fail
    130  interrupted (Ctrl-C)
    141  stdout was closed early (`| head`)
    1    an unexpected error, with Python's traceback: a fastft bug, please report it
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fastft import __version__
from fastft.config import TrainConfig
from fastft.errors import FastftError, Interrupted

S = argparse.SUPPRESS  # options the user did not type stay out of the namespace
IMPORTED_AT = time.perf_counter()  # a job's origin where /proc cannot say when the process started
EXIT_ERROR = 2     # one line said what to fix
# s another torchrun process waits before it exits with an error only rank 0 prints: rank 0 finds
# it within a second of its start (no heavy import yet), and a busy machine may start it late.
EARLY_ERROR_GRACE_S = 3.0
EXIT_PROBLEMS = 3  # the report lists problems (data check, bench)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model (ResNet-18 by default)", argument_default=S,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    p.add_argument("--data", help="ImageFolder DIR, 'synthetic', or omit for the hotdog set (default: download)")
    p.add_argument("--synth-train", type=int, help=f"images in the train split of --data synthetic "
                   f"(default: {d.synth_train})")
    p.add_argument("--synth-test", type=int, help=f"images in its test split (default: {d.synth_test})")
    p.add_argument("--strategy", help=f"finetune|frozen|probe|hotdog|scratch|partial:K; probe = frozen without "
                   f"augmentation, the head trained on features kept from epoch 1 (default: {d.strategy})")
    p.add_argument("--epochs", type=int, help=f"passes over the train split; with --resume, the total to "
                   f"reach (default: {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"global batch, all processes (default: {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"step per summed-loss gradient (default: {d.lr})")
    p.add_argument("--head-lr-mult", type=float, help=f"x lr for the new head (default: {d.head_lr_mult})")
    p.add_argument("--weight-decay", type=float, help=f"L2 coefficient added to every gradient, as SGD's "
                   f"weight_decay; not scaled by the batch (default: {d.weight_decay})")
    p.add_argument("--momentum", type=float, help=f"SGD momentum (default: {d.momentum}, as the chapter)")
    p.add_argument("--loss-reduction", choices=["sum", "mean"], help="sum over the batch, as the chapter "
                   "(default), or mean, which needs lr x batch and weight decay / batch for the same step")
    p.add_argument("--weights", help="imagenet|none|PATH (default: imagenet, none for scratch)")
    p.add_argument("--model", help="a torchvision classifier (resnet50, efficientnet_b0, vit_b_16, ...) or "
                   "timm:NAME; `fastft models` lists them (default: resnet18)")
    p.add_argument("--image-size", type=int, help="px (default: the model's own, 224 for resnet18)")
    p.add_argument("--loader", choices=["auto", "dali", "torch", "cached"],
                   help="auto = cached where the decoded set fits --cache-gb, else dali if it imports, "
                   "else torch (default: auto)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"],
                   help="auto = bf16 where the device has fast bf16, else fp32 (default: auto)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile on or off; untyped = auto: on when the job's steps x the time "
                        "compile saves per step beat the compile's cost, cold or cached (default: auto)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="(default: on)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: 0 = auto, from the cores "
                   "this process may use, its CPU quota, the loader's threads and other processes' load)")
    p.add_argument("--device", help="auto|cpu|cuda|cuda:N (default: auto)")
    p.add_argument("--out", help="run folder (default: runs/STRATEGY-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--save-every", type=int, help="epochs between checkpoints, written in the background; "
                   f"the last epoch is always saved (default: {d.save_every})")
    p.add_argument("--seed", type=int, help=f"seeds the head's init, the shuffling and the augmentation "
                   f"(default: {d.seed})")
    p.add_argument("--workers", type=int, help="DataLoader processes, or DALI CPU threads "
                   "(default on CUDA: cores / processes per machine - 1, at most 16; 0 on CPU)")
    p.add_argument("--uint8-batches", action=argparse.BooleanOptionalAction,
                   help="torch loader: ship uint8 pixels and normalise on the device; --no-uint8-batches "
                        "normalises fp32 in the workers, as d2l (default: on)")
    p.add_argument("--skip-bad", action="store_true", help="drop undecodable images at startup and say how many")
    p.add_argument("--decode-cache", choices=["auto", "on", "off"],
                   help="DALI: reuse decoded images after the first epoch (default: auto, when they fit)")
    p.add_argument("--cache-gb", type=float, help="GB of device memory --loader cached may hold "
                   "(default: 0 = 50%% of free device memory, or of available RAM on a CPU)")
    p.add_argument("--cache-max-side", type=int, help="px: --loader cached keeps each train image "
                   "with its longest side at most this, antialiased (default: 0 = full size)")
    p.add_argument("--optimizer", choices=["sgd", "apex-sgd"],
                   help="sgd = torch SGD, fused on CUDA; apex-sgd needs NVIDIA apex (default: sgd)")
    p.add_argument("--compile-mode", choices=["default", "max-autotune", "reduce-overhead"],
                   help="torch.compile mode; reduce-overhead and max-autotune both use CUDA graphs "
                        "(default: default)")
    p.add_argument("--fast-frozen", action=argparse.BooleanOptionalAction,
                   help="run frozen layers BN-folded in inference mode (default: on)")
    p.add_argument("--sync-bn", action="store_true",
                   help="multi-process: sync BatchNorm statistics across ranks (default: per rank)")
    p.add_argument("--dist-timeout", dest="dist_timeout_s", type=float,
                   help="seconds a rank waits on a collective before the job fails (default: 300)")
    p.add_argument("--tensorboard", action="store_true", help="also write per-epoch scalars (loss, "
                   "accuracies, examples/sec, lr) to RUN_DIR/tb; needs pip install tensorboard")


def add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="make, fetch or check a dataset").add_subparsers(
        dest="data_cmd", required=True, metavar="{synth,download,check}")  # named so in a missing-one error
    synth = data.add_parser("synth", help="write the synthetic hotdog-like JPEG dataset",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    synth.add_argument("dir", type=Path, help="folder to write (must not exist, or be empty)")
    d = TrainConfig()
    add_synth_sizes(synth, d.synth_train, d.synth_test, "synth_train", "synth_test", ("--train", "--test"))
    synth.add_argument("--seed", type=int, default=0, help="the same seed and sizes write byte-identical files")
    download = data.add_parser("download", help="fetch the chapter's hotdog.zip (sha1-checked)")
    download.add_argument("dir", type=Path, nargs="?", default=None, help="folder to hold the dataset, "
                          "DIR/train and DIR/test; hotdog.zip is kept beside it (default: ~/.cache/fastft/hotdog)")
    check = data.add_parser("check", help="report every folder problem and bad image in one pass "
                            "(exit status 3 when there are any)")
    check.add_argument("dir", type=Path, help="the dataset: DIR/train/CLASS/*.jpg and DIR/test/CLASS/*.jpg")


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a trained run or an exported model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="RUN_DIR or its checkpoint.pt")
    source.add_argument("--model", type=Path, help="a .onnx (run by ONNX Runtime) or .pt2 file from "
                        "`fastft export`, with its PATH.json sidecar, or a .safetensors file such as a "
                        "run's model.safetensors")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default: auto = cuda where "
                   "available)")
    p.add_argument("--top-k", type=int, default=1, help="the K most probable classes per image, most probable "
                   "first (default: 1)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (their images, sorted) or "
                   "quoted globs such as 'shots/*.jpg'; one output line per image")


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's model as ONNX, a torch.export program or safetensors "
                       "weights, checked", description="Exports with a dynamic batch axis, checks the file's "
                       "logits against PyTorch's at batch sizes 1 and N, and writes PATH.json (classes, "
                       "preprocessing) next to it, so `fastft predict --model PATH` needs nothing else. "
                       "safetensors writes RUN_DIR/model.safetensors (which a run stopped before its last "
                       "epoch lacks) with that in its metadata, checked in a fresh torchvision ResNet-18.")
    p.add_argument("--checkpoint", required=True, type=Path, help="RUN_DIR or its checkpoint.pt")
    p.add_argument("--format", required=True, choices=["onnx", "pt2", "safetensors"], dest="fmt")
    p.add_argument("--out", type=Path, help="file to write, ending in .FORMAT, never one of a run's own "
                   "files (default: RUN_DIR/model.FORMAT)")
    p.add_argument("--images", nargs="+", type=Path, help="images to check on (default: up to 8 of the "
                   "run's test split; random inputs, said so, where its data folder is not here)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the check (e.g. without onnxruntime); an onnx or pt2 sidecar records it as "
                   "unchecked")


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a trained run on a split: per-class table, confusion matrix, "
                       "most confident mistakes", description="Numbers as scikit-learn's classification_report "
                       "(0.0 where a denominator is 0); writes eval.json, confusion.png and mistakes.png "
                       "(the PNGs need matplotlib).")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="RUN_DIR, its checkpoint.pt, or its model.safetensors")
    p.add_argument("--data", help="DIR holding the split (DIR/SPLIT/CLASS/*.jpg; the other split may be "
                   "absent), DIR that is one split's class folders (DIR/CLASS/*.jpg; --split is then not used), "
                   "or 'synthetic' (default: the run's own --data)")
    p.add_argument("--split", choices=["test", "train"], default="test",
                   help="train takes the test transform too, no augmentation (default: test)")
    p.add_argument("--top", type=int, default=16, help="most confident mistakes to list and draw (default: 16)")
    p.add_argument("--loader", choices=["torch", "dali", "cached"], default="torch",
                   help="the backend whose test pipeline reads the split (default: torch)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default: auto = cuda where available)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--out", type=Path, help="folder for eval.json and the PNGs; an earlier eval's files there "
                   "are replaced, other files left alone (default: RUN_DIR/eval-SPLIT)")


def add_bench_parser(sub) -> None:
    from fastft.bench import STRATEGIES, BenchSpec  # no torch import: --help stays fast
    d = BenchSpec()
    p = sub.add_parser("bench", help="examples/sec per model and strategy, fastft against the d2l-style reference")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: %(default)s)")
    which = p.add_mutually_exclusive_group()  # one dest: BenchSpec.models, a tuple of names
    which.add_argument("--model", dest="models", type=lambda name: (name,), default=d.models, metavar="NAME",
                       help="the backbone (`fastft models` lists them; timm's as timm:NAME; default: resnet18)")
    which.add_argument("--models", dest="models", type=lambda names: tuple(n for n in names.split(",") if n),
                       default=d.models, metavar="A,B,C", help="several backbones: one table row per model x "
                       "strategy, each model against its own reference")
    p.add_argument("--data", default=d.data, help="synthetic or an ImageFolder DIR (default: %(default)s)")
    add_synth_sizes(p, d.train_images, d.test_images, "train_images", "test_images",
                    ("--train-images", "--test-images"))
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="px, every model; 0 = each model's own (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="the first is warm-up (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="runs per variant; median and spread (default: 1)")
    p.add_argument("--device", default=d.device, help="auto|cpu|cuda|cuda:N (default: auto)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=d.amp,
                   help="fastft variant (default: auto)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                   help="fastft variant (default: the engine's auto, see train --help)")
    p.add_argument("--compile-mode", choices=["default", "max-autotune", "reduce-overhead"], default=d.compile_mode)
    p.add_argument("--loader", choices=["auto", "dali", "torch", "cached"], default=d.loader,
                   help="fastft variant (default: auto)")
    p.add_argument("--optimizer", choices=["sgd", "apex-sgd"], default=d.optimizer, help="fastft variant")
    p.add_argument("--workers", type=int, default=d.workers, help="both variants (default: the engine's)")
    p.add_argument("--threads", type=int, default=d.threads, help="fastft variant's torch threads (default: "
                   "0 = auto, see train --help); the reference keeps torch's default, as the chapter's code")
    p.add_argument("--json", type=Path, help="write the table as JSON (rewritten after each strategy)")
    p.add_argument("--plot", type=Path, help="write a bar chart, in the format its suffix names (.png, .pdf, "
                   ".svg...), or bench.png in a folder (needs matplotlib)")
    p.add_argument("--verbose", action="store_true", help="show the engine's own lines")


def add_synth_sizes(p, train: int, test: int, train_dest: str, test_dest: str, old: tuple[str, str]) -> None:
    """--synth-train/--synth-test, one name in train, bench and data synth; the command's older
    names (`old`) still work, hidden from --help, so scripts that use them keep running."""
    p.add_argument("--synth-train", dest=train_dest, type=int, default=train, metavar="N",
                   help="images in the synthetic train split (default: %(default)s)")
    p.add_argument("--synth-test", dest=test_dest, type=int, default=test, metavar="N",
                   help="images in the synthetic test split (default: %(default)s)")
    p.add_argument(old[0], dest=train_dest, type=int, default=S, help=S)
    p.add_argument(old[1], dest=test_dest, type=int, default=S, help=S)


def add_plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="overlay runs' train loss, train acc and test acc in one PNG",
                       description="One panel per metric, one line per run, labelled by its strategy. Each "
                                   "run also keeps its own RUN_DIR/curves.png.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders (with metrics.jsonl)")
    p.add_argument("--out", type=Path, default=Path("runs-curves.png"),
                   help="image to write, in the format its suffix names (.png, .pdf, .svg, .jpg...), or a "
                   "folder to write runs-curves.png in (default: runs-curves.png here; needs matplotlib)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastft", description="Fine-tune ResNet-18 fast (d2l.ai 13.2).",
                                epilog="exit status: 0 done, 2 an error in one line, 3 a report that lists "
                                       "problems (data check, bench), 130 interrupted, 141 stdout closed "
                                       "early (| head), 1 a fastft bug")
    p.add_argument("--version", action="version", version=f"fastft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_data_parser(sub)
    add_predict_parser(sub)
    add_export_parser(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)
    add_plot_parser(sub)
    models = sub.add_parser("models", help="the models fastft trains, or one model's stages, head and input")
    models.add_argument("name", nargs="?", help="e.g. resnet50 or timm:convnext_atto")
    return p


class EarlyError(FastftError):
    """A mistake found from the arguments alone, before torch loads: the same in every process
    torchrun started, so only rank 0 prints it."""


def check_early(args: argparse.Namespace) -> None:
    """The command's options that need no heavy import (cli_checks); raises EarlyError."""
    from fastft import cli_checks
    checks = {"train": lambda: cli_checks.check_train(_given(args)), "bench": lambda: cli_checks.check_bench(args),
              "eval": lambda: cli_checks.check_eval(args), "predict": lambda: cli_checks.check_predict(args),
              "data": lambda: cli_checks.check_synth(args) if args.data_cmd == "synth" else None}
    try:
        checks.get(args.command, lambda: None)()
    except FastftError as exc:
        raise EarlyError(exc.one_line()) from exc


def _given(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "command"}


def run_train(args: argparse.Namespace) -> int:
    from fastft.phases import process_start
    from fastft.threads import CpuSample
    job_start = process_start(fallback=IMPORTED_AT)  # summary.json's job_s counts from here
    cpu_since = CpuSample.take()  # start-up is the window that reads other processes' load: free
    given = _given(args)
    cfg = TrainConfig(**given)
    from fastft.data import start_decode_ahead
    ahead = start_decode_ahead(cfg)  # forks now, while no thread exists: torch is not imported yet
    from fastft.engine import train

    train(cfg, typed=frozenset(given), job_start=job_start, cpu_since=cpu_since, ahead=ahead)
    return 0


def run_data(args: argparse.Namespace) -> int:
    if args.data_cmd == "synth":
        from fastft.data.synth import write_synthetic
        root = write_synthetic(args.dir, n_train=args.synth_train, n_test=args.synth_test, seed=args.seed)
        print(f"wrote {args.synth_train} train and {args.synth_test} test images to {root}")
        return 0
    if args.data_cmd == "download":
        from fastft.config import default_cache_dir
        from fastft.data.download import download_hotdog
        print(f"hotdog dataset ready at {download_hotdog(args.dir or default_cache_dir() / 'hotdog')}")
        return 0
    from fastft.data.layout import check_report
    lines, ok = check_report(args.dir)
    print("\n".join(lines))
    return 0 if ok else EXIT_PROBLEMS


def run_predict(args: argparse.Namespace) -> int:
    from fastft.data.inputs import image_files
    from fastft.data.images import shown_path

    images = image_files(args.images)  # folders and globs listed before torch loads
    from fastft.predict import predict_top_k
    results = predict_top_k(images, args.top_k, args.device, checkpoint=args.checkpoint, model=args.model)
    for path, ranked in results:  # one line per image, whatever its name (shown_path: no newline)
        print(f"{shown_path(path)}: " + ", ".join(f"{shown_path(label)} {prob:.3f}" for label, prob in ranked))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from fastft.export import export_run

    print("\n".join(export_run(args.checkpoint, args.fmt, args.out, args.images, args.check).lines()))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from fastft.evaluation import EvalOptions, run

    values = {k: v for k, v in vars(args).items() if k != "command"}
    run(EvalOptions(**values), warn=lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))
    return 0


def _rank_prefix() -> str:
    """Under torchrun, which process failed."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK')}] " if world.isdigit() and int(world) > 1 else ""


def run_bench(args: argparse.Namespace) -> int:
    from fastft.bench import BenchSpec, bench_main

    values = {k: v for k, v in vars(args).items() if k not in ("command", "json", "plot", "verbose")}
    values["strategies"] = tuple(s for s in values["strategies"].split(",") if s)
    failed = bench_main(BenchSpec(**values, quiet=not args.verbose), args.json, args.plot)
    return EXIT_PROBLEMS if failed else 0


def run_models(args: argparse.Namespace) -> int:
    from fastft.models.listing import detail_lines, list_lines
    print("\n".join(detail_lines(args.name) if args.name else list_lines()))
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from fastft.curves import image_file, plot_runs, run_labels

    replaced = image_file(args.out).exists()  # the file, or a folder's runs-curves.png
    path = plot_runs(args.runs, args.out)
    print(f"wrote {path}{' (replaced the file that was there)' if replaced else ''}: "
          f"{', '.join(run_labels(args.runs))}")
    return 0


def exit_without_teardown(status: int) -> None:
    """End a finished `fastft train` process now: non-daemon threads joined, atexit handlers run and
    output flushed, as a normal exit does, but no teardown of the interpreter's modules, which with
    torch and torchvision loaded costs ~1 s of CPU and 3-5 s of wall on a busy 2-core machine after
    the summary is written (bench/job_ceiling.py). The run has closed its own files by then."""
    import atexit
    import threading
    # What the interpreter does first at exit: tell thread pools to stop (concurrent.futures
    # registers that hook; Inductor's compile pool is one), then join every non-daemon thread.
    # Joining a pool's idle workers before that hook runs would wait forever.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    commands = {"train": run_train, "data": run_data, "predict": run_predict, "bench": run_bench,
                "plot": run_plot, "eval": run_eval, "export": run_export, "models": run_models}
    try:
        check_early(args)
    except EarlyError as exc:
        from fastft.cli_checks import print_on_this_rank
        if print_on_this_rank():  # every torchrun process found the same: one line, from rank 0
            print(f"fastft: error: {exc.one_line()}", file=sys.stderr)
        else:  # torchrun stops every process when one exits: let rank 0 print its line first
            time.sleep(EARLY_ERROR_GRACE_S)
        return EXIT_ERROR
    try:
        status = commands[args.command](args)
        sys.stdout.flush()  # a reader that went away (`| head`) is met here, not in the exit's flush
        if argv is None and args.command == "train":  # the program itself, not a caller's main([...])
            exit_without_teardown(status)
        return status
    except BrokenPipeError:
        # stdout's reader closed it. As the Python docs' "Note on SIGPIPE" (library/signal.html)
        # advises: point stdout at devnull so the interpreter's final flush of what is still
        # buffered does not raise again, and end quietly. 141 = 128 + SIGPIPE, the status a shell
        # shows for a program the signal ended (`yes | head`), which `set -o pipefail` sees.
        try:
            fd = sys.stdout.fileno()
        except (OSError, ValueError, AttributeError):  # no file behind sys.stdout (a caller's capture)
            return 141
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        return 141
    except FastftError as exc:
        print(f"fastft: error: {_rank_prefix()}{exc.one_line()}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:  # a run says what it saved (fastft.run_faults); others saved nothing
        print(f"fastft: {exc if isinstance(exc, Interrupted) else 'interrupted'}", file=sys.stderr)
        return 130
