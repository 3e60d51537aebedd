"""`fastft bench`'s result as people read it: the table, the JSON file and the bar chart.

One row per model x strategy; each speedup is that model's fastft run against its own
reference in the same rounds (fastft.bench.measure_row).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastft.errors import ConfigError
from fastft.safe_write import replacing, write_text_atomic


def _cell(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "n/a"
    text = f"{stat['median']:.{digits}f}"
    return text if stat["min"] == stat["max"] else f"{text} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


ERROR_CHARS = 100  # of a failed row's error shown in the table (the JSON keeps it whole): a column stays on screen
COLUMNS = ("model", "strategy", "e2e img/s", "ref e2e img/s", "speedup e2e", "compute img/s", "ref compute img/s",
           "speedup compute", "speedup CPU s", "threads", "compile s", "peak MB", "recompiles", "job s", "ref job s")


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for row in result["rows"]:
        if "error" in row:
            error = row["error"] if len(row["error"]) <= ERROR_CHARS else row["error"][:ERROR_CHARS] + "..."
            rows.append([_model(row), row["strategy"], f"failed: {error}"] + [""] * (len(COLUMNS) - 3))
            continue
        fast, ref = row["fastft"], row["reference"]
        rows.append([_model(row), row["strategy"], _cell(fast["examples_per_sec"]), _cell(ref["examples_per_sec"]),
                     _ratio(row, "speedup_e2e"), _cell(fast["examples_per_sec_compute"]),
                     _cell(ref["examples_per_sec_compute"]), _ratio(row, "speedup_compute"),
                     _ratio(row, "speedup_cpu"), _threads_cell(row), _cell(fast["compile_s"]), _cell(fast["peak_mem_mb"], 0), _recompiles_cell(fast),
                     _cell(fast["job_s"]), _cell(ref["job_s"])])
    return rows


def _model(row: dict) -> str:
    return row.get("model", "resnet18")  # a JSON from before --model: ResNet-18 only


def _ratio(row: dict, label: str) -> str:
    """The median of the per-round ratios, and their range where there are several rounds."""
    rounds = [r for r in row.get(f"{label}_rounds") or [] if r is not None]
    if row.get(label) is None:
        return "n/a"
    text = f"{row[label]:.2f}x"
    return text if len(set(rounds)) < 2 else f"{text} ({min(rounds):.2f}-{max(rounds):.2f})"


def _threads_cell(row: dict) -> str:
    """fastft's / the reference's torch threads (each round's, where they differ)."""
    def counts(variant: str) -> str:
        seen = sorted({r.get("threads") for r in row[variant]["runs"] if r.get("threads")})
        return ",".join(map(str, seen)) or "?"
    return f"{counts('fastft')}/{counts('reference')}"


def _recompiles_cell(variant: dict) -> str:
    """Recompiles, and how many of them Dynamo refused (the recompile limit: those frames ran eagerly)."""
    text, eager = _cell(variant["recompiles"], 0), variant.get("eager_fallbacks")
    return text if not eager or not eager["max"] else f"{text} ({_cell(eager, 0)} ran eager)"


def format_table(result: dict) -> str:
    h = result["header"]
    models = ", ".join(h.get("models", ["resnet18"]))
    lines = [f"fastft bench of {models} on {h['device']}, torch {h['torch']}: {_size(h)}, batch {h['batch_size']}, "
             f"{h['epochs']} epochs (rates exclude warm-up), {h['repeats']} repeat(s) as interleaved rounds, "
             f"median (min-max); speedups: the median of each round's ratio",
             f"data {h['data']}; weights {h['weights']}",
             f"fastft: {_settings(h['fastft'])}; reference: {_settings(h['reference'])}",
             "job s: each run's Trainer start to its summary (runs share this process: no start-up in it); "
             "speedup CPU s: the reference's process CPU seconds over fastft's; threads: fastft/reference", ""]
    body = [list(COLUMNS)] + table_rows(result)
    widths = [max(len(r[i]) for r in body) for i in range(len(COLUMNS))]
    for i, r in enumerate(body):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _size(h: dict) -> str:
    return f"{h['image_size']} px" if h["image_size"] else "each model's own size"


def _settings(settings: dict) -> str:
    return ", ".join(f"{k} {'auto' if v is None else v}" for k, v in settings.items())


def write_json(result: dict, path: Path) -> None:
    """Via PATH.tmp renamed over `path`; a full disk or read-only folder is one WriteError line."""
    write_text_atomic(Path(path), json.dumps(result, indent=2) + "\n")


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib (or pip install 'fastft[plot]')") from exc
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot(result: dict, path: Path, fmt: str = "png") -> None:
    """Grouped bars, fastft against the reference, end-to-end and compute-only, min-max as error bars."""
    plt = require_matplotlib()
    rows = [r for r in result["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(max(11, 1.4 * len(rows)), 4), sharey=False)
    for ax, key, title in zip(axes, ("examples_per_sec", "examples_per_sec_compute"), ("end-to-end", "compute")):
        for offset, variant in ((-0.2, "reference"), (0.2, "fastft")):
            stats = [r[variant][key] for r in rows]
            medians = [s["median"] for s in stats]
            errors = [[m - s["min"] for m, s in zip(medians, stats)], [s["max"] - m for m, s in zip(medians, stats)]]
            ax.bar([i + offset for i in range(len(rows))], medians, 0.4, yerr=errors, label=variant, capsize=3)
        labels = [r["strategy"] for r in rows] if len({_model(r) for r in rows}) < 2 else \
            [f"{_model(r)}\n{r['strategy']}" for r in rows]
        ax.set_xticks(range(len(rows)), labels)
        ax.set_title(f"{title} examples/sec")
        ax.legend()
    h = result["header"]
    fig.suptitle(f"{h['device']}: {_size(h)}, batch {h['batch_size']}, {h['repeats']} repeat(s)")
    fig.tight_layout()
    try:
        with replacing(path) as tmp:  # a failed write keeps no half PNG and is one line
            fig.savefig(tmp, dpi=100, format=fmt)
    finally:
        plt.close(fig)
