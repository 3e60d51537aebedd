"""bar 05's whole job (bench/job_ceiling.py's `fastft train` processes) by thread setting, interleaved.

    fastft data synth /tmp/job --train 400 --test 200
    python bench/threads_jobs.py --data /tmp/job                        # finetune and frozen
    yes > /dev/null & python bench/threads_jobs.py --data /tmp/job; kill %1

Each round runs every job with `--threads 1`, `--threads 2` (torch's own default on a 2-core
machine: what fastft did before it chose) and no flag (fastft's choice), the order rotating
from round to round, and prints process wall and CPU seconds with the thread count and reason
config.json recorded, and /proc/loadavg before each job.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
import tempfile

SETTINGS = {"threads 1": ["--threads", "1"], "threads 2": ["--threads", "2"], "auto": []}


def job_ceiling():
    path = Path(__file__).with_name("job_ceiling.py")
    spec = importlib.util.spec_from_file_location("job_ceiling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--jobs", default="finetune,frozen")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    jc, results = job_ceiling(), []
    with tempfile.TemporaryDirectory(prefix="fastft-threads-jobs-") as tmp:
        for index in range(args.rounds):
            names = list(SETTINGS)[index % 3:] + list(SETTINGS)[:index % 3]
            for strategy in args.jobs.split(","):
                for name in names:
                    load = Path("/proc/loadavg").read_text().split()[:3]
                    out = Path(tmp) / f"{strategy}-{name.replace(' ', '')}-{index}"
                    run = jc.run_job(args, strategy, out, SETTINGS[name])
                    resolved = json.loads((out / "config.json").read_text())["resolved"]
                    run.update(round=index, strategy=strategy, setting=name, loadavg=load,
                               threads=resolved["threads"], threads_reason=resolved["threads_reason"])
                    results.append(run)
                    print(f"round {index + 1} {strategy:8s} {name:9s}: wall {run['wall_s']:6.1f} s, CPU "
                          f"{run['cpu_s']:6.1f} s, threads {run['threads']} (loadavg {' '.join(load)}): "
                          f"{run['threads_reason']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
