"""The hidden-size job (bench/job_ceiling.py) for a list of backbones: one Markdown table, one JSON.

    python bench/models_table.py --quick                          # smoke: 16/8 images, 64 px (minutes)
    python bench/models_table.py --json models.json --markdown models.md \\
        --timm /tmp/timm-train.py                                 # the real table: 400/200 images

For each model in turn (job_ceiling's one_repeat, --repeats times): the model's own ceiling (its
bare train step and forward, fastft.models' build), `fastft train --model NAME` as a process for
finetune and frozen, the frozen job again with the d2l-style REFERENCE settings, and, with
--timm TRAIN_PY, the finetune job through timm's train.py on the model's timm equivalent
(job_ceiling.TIMM_EQUIVALENTS; none: the cell says n/a). Each model at its own input size
(224 px for every default) unless --image-size says otherwise.

Columns: finetune job s (efficiency: ideal s / job s, job_ceiling's module doc), frozen job s
(vs d2l: the reference's wall over fastft's, > 1 is faster), the reference's s, timm train.py s
(vs timm). With several repeats every cell is the median. The header names the command, the
machine (CPU model, its AMX and AVX512-BF16 flags, usable cores), the date and /proc/loadavg
before and after: on a shared machine the wall figures move with the neighbours.
Without --data the job's photographs are synthetic (`fastft data synth`, --train/--test).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

MODELS = ("resnet18", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny", "vit_b_16",
          "timm:mobilenetv4_conv_small")
JOBS = ("finetune", "frozen")
QUICK = {"train": 16, "test": 8, "image_size": 64, "batch_size": 8, "steps": 2, "repeats": 1}
CEILING_THREADS = {0: "torch's default", -1: "fastft's own choice of"}
COLUMNS = ("model", "px", "finetune job s (efficiency)", "frozen job s (vs d2l)", "d2l frozen s",
           "timm train.py s (vs timm)")


def job_ceiling():
    """bench/job_ceiling.py as a module (the bench scripts are run by path, not installed)."""
    spec = importlib.util.spec_from_file_location("job_ceiling", Path(__file__).with_name("job_ceiling.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    p.add_argument("--data", type=Path, help="ImageFolder DIR with train/ and test/ (default: synthetic)")
    p.add_argument("--train", type=int, default=400, help="synthetic train images (default: 400)")
    p.add_argument("--test", type=int, default=200, help="synthetic test images (default: 200)")
    p.add_argument("--image-size", type=int, default=0, help="px; 0 = each model's own (default)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="timed steps (and forwards) per ceiling")
    p.add_argument("--ceiling-threads", type=int, default=0, help="job_ceiling's --ceiling-threads (default: 0, "
                   "torch's default; -1 on a busy machine: fastft's own choice, as the job makes it)")
    p.add_argument("--timm", type=Path, metavar="TRAIN_PY", help="timm's train.py (see job_ceiling's doc)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    p.add_argument("--json", type=Path, default=Path("models_table.json"), help="(default: %(default)s)")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def job_argv(args, model: str, data: Path) -> list[str]:
    """job_ceiling's command line for one model: finetune and frozen, the reference for frozen only
    (the d2l-style finetune is the slowest run of all and the table does not show it)."""
    argv = ["--data", str(data), "--model", model, "--jobs", ",".join(JOBS), "--reference", "--reference-jobs",
            "frozen", "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs",
            str(args.epochs), "--amp", args.amp, "--repeats", str(args.repeats), "--steps", str(args.steps),
            "--ceiling-threads", str(args.ceiling_threads)]
    return argv + (["--timm", str(args.timm)] if args.timm else [])


def machine() -> dict:
    """CPU model, the flags that decide bf16 speed on a CPU (AMX, AVX512-BF16), usable cores, torch."""
    import torch

    from fastft.threads import usable_cpus
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    wanted = sorted(f for f in flags if f.startswith("amx") or f == "avx512_bf16")
    return {"cpu": model, "flags": wanted, "usable_cores": len(usable_cpus()), "torch": torch.__version__}


def loadavg() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "?"


def model_row(model: str, repeats: list[dict]) -> dict:
    """The medians the table shows, from job_ceiling's repeats of one model."""
    def med(job: str, key: str):
        values = [r["jobs"][job][key] for r in repeats if key in r["jobs"][job]]
        return statistics.median(values) if values else None
    fine = repeats[0]["jobs"]["finetune"]
    return {"model": model, "finetune_s": med("finetune", "wall_s"),
            "finetune_efficiency": med("finetune", "efficiency"), "finetune_efficiency_cpu": med("finetune", "efficiency_cpu"), "frozen_s": med("frozen", "wall_s"),
            "frozen_efficiency": med("frozen", "efficiency"), "reference_frozen_s": med("frozen", "reference_wall_s"),
            "vs_d2l": med("frozen", "vs_d2l"), "vs_d2l_cpu": med("frozen", "vs_d2l_cpu"),
            "timm_s": med("finetune", "timm_wall_s"), "vs_timm": med("finetune", "vs_timm"),
            "timm_model": fine.get("timm_model"), "timm_note": fine.get("timm_note"),
            "ceiling_threads": [r.get("ceiling_threads") for r in repeats]}


def _s(value: float | None, ratio: float | None = None, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" + (f" ({ratio:.2f}{suffix})" if ratio is not None else "")


def table_cells(row: dict, timm_given: bool) -> list[str]:
    if "error" in row:
        error = row["error"] if len(row["error"]) <= 100 else row["error"][:100] + "..."  # the JSON has it whole
        return [row["model"], str(row.get("image_size", "")), f"failed: {error}", "", "", ""]
    if row["timm_s"] is not None:
        timm = f"{_s(row['timm_s'], row['vs_timm'], 'x')} as {row['timm_model']}"
    else:
        timm = row["timm_note"] or ("n/a: no --timm TRAIN_PY given" if not timm_given else "n/a")
    return [row["model"], str(row["image_size"]), _s(row["finetune_s"], row["finetune_efficiency"]),
            _s(row["frozen_s"], row["vs_d2l"], "x"), _s(row["reference_frozen_s"]), timm]


def markdown(result: dict) -> str:
    h = result["header"]
    m = h["machine"]
    lines = [f"# fastft's whole job per model ({h['date']})", "",
             f"- command: `{h['command']}`",
             f"- machine: {m['cpu']}, flags {' '.join(m['flags']) or 'none of amx*/avx512_bf16'}, "
             f"{m['usable_cores']} usable cores, torch {m['torch']}; loadavg {h['loadavg_start']} at the start, "
             f"{h.get('loadavg_end', '?')} at the end",
             f"- job: {h['data']}, batch {h['batch_size']}, {h['epochs']} epochs, amp {h['amp']}, {h['repeats']} "
             f"repeat(s) (medians); each model at its own input size (px) unless the command says otherwise; "
             f"the ceiling on {CEILING_THREADS.get(h['ceiling_threads'], str(h['ceiling_threads']))} thread(s)",
             "- efficiency: the ideal job (import + the model's bare step/forward rates) over the job's wall time; "
             "vs d2l / vs timm: their wall time over fastft's (> 1: fastft faster)", ""]
    body = [list(COLUMNS)] + [table_cells(row, h["timm"] is not None) for row in result["rows"]]
    lines.append("| " + " | ".join(body[0]) + " |")
    lines.append("|" + "|".join(" --- " for _ in COLUMNS) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in body[1:]]
    return "\n".join(lines)


def header(args, data: Path, argv) -> dict:
    command = "python bench/models_table.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    source = f"{data}" if args.data else f"synthetic {args.train}/{args.test} images"
    return {"command": command.strip(), "machine": machine(), "loadavg_start": loadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "data": source, "batch_size": args.batch_size, "epochs": args.epochs, "amp": args.amp,
            "repeats": args.repeats, "quick": args.quick, "timm": str(args.timm) if args.timm else None,
            "ceiling_threads": args.ceiling_threads}


def synth_data(folder: Path, train: int, test: int) -> Path:
    from fastft.cli import main as fastft_main
    if fastft_main(["data", "synth", str(folder), "--train", str(train), "--test", str(test)]) != 0:
        raise SystemExit(f"fastft data synth {folder} failed")
    return folder


def run_model(jc, args, model: str, data: Path, work: Path) -> dict:
    """job_ceiling's repeats for one model, and its row; a job that fails is the row's error."""
    job_args = jc.parse_args(job_argv(args, model, data))
    train, test = jc.count_images(data / "train"), jc.count_images(data / "test")
    print(f"== {model}: {train}/{test} images, {job_args.image_size} px (loadavg {loadavg()})", flush=True)
    try:
        repeats = [jc.one_repeat(job_args, r, list(JOBS), work, train, test) for r in range(args.repeats)]
    except Exception as exc:  # a failed `fastft train` (CalledProcessError) must not hide the other models
        first = (str(exc).splitlines() or [""])[0]
        return {"model": model, "image_size": job_args.image_size, "error": f"{type(exc).__name__}: {first}"}
    return {**model_row(model, repeats), "image_size": job_args.image_size, "repeats": repeats}


def main(argv=None) -> int:
    args = parse_args(argv)
    jc = job_ceiling()
    models = [m for m in args.models.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="fastft-models-table-") as tmp:
        data = args.data or synth_data(Path(tmp) / "data", args.train, args.test)
        result = {"header": header(args, data, argv), "rows": [], "complete": False}
        for model in models:
            work = Path(tmp) / model.replace(":", "-")
            work.mkdir()
            result["rows"].append(run_model(jc, args, model, data, work))
            args.json.write_text(json.dumps(result, indent=2) + "\n")  # a cut run keeps what finished
    result["header"]["loadavg_end"], result["complete"] = loadavg(), True
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    print(text)
    return 1 if any("error" in row for row in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
