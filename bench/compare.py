"""The regression gate: same-run ratios compared between two pytest-benchmark saves.

    python bench/compare.py                      # the two latest saves in .benchmarks/
    python bench/compare.py 0001                 # save 0001 against the latest
    python bench/compare.py 0001 0002 --threshold 10
    python bench/compare.py old.json new.json    # explicit files

A save is a file pytest-benchmark writes with --benchmark-autosave (or --benchmark-save=NAME):
`.benchmarks/<machine>/NNNN_*.json`, found by its number NNNN like --benchmark-compare=NNNN, or
given as a path. Each benchmark in tests/benchmarks/ records in `extra_info` ratios measured in
the same run, interleaved with its reference: reference time / measured time, in CPU seconds
(`speedup_vs_reference_cpu`, gated by default) and in wall seconds (`speedup_vs_reference`).
A neighbour's job on a shared machine lands on both sides of a ratio, so the ratio holds where
absolute means swing by 20-60%. The gate fails (exit 1) when a ratio fell by more than
`--threshold` percent; a benchmark on one side only is listed and not gated. Exit 2: a save that
cannot be found or read. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Each benchmark names the ratio to gate in extra_info["gate_key"]: CPU seconds, not wall (on a
# shared machine the wall ratio also carries how the scheduler split the cores, and DALI's threads
# keep decoding while the torch loader is timed), against a reference of the same precision
# (bench/README.md). A save without gate_key is gated on DEFAULT_KEY.
DEFAULT_KEY = "speedup_vs_reference_cpu"
# Percent a ratio may fall before the gate fails. No-change saves on a shared 2-core CPU (load
# 10-13) moved a ratio by up to ~10% against their baseline; a 30% slowdown moves it by -23%.
THRESHOLD = 15.0


class SaveError(Exception):
    """A save that cannot be found or read: one line for the user."""


def find_save(ref: str, storage: Path) -> Path:
    """The save named by `ref`: an existing .json path, or a save number such as 1 or 0001."""
    path = Path(ref)
    if path.suffix == ".json" or not ref.isdigit():
        if not path.is_file():
            raise SaveError(f"{ref}: no such file")
        return path
    matches = sorted(storage.glob(f"*/{int(ref):04d}_*.json"))
    if not matches:
        raise SaveError(f"no save {int(ref):04d} under {storage}/ "
                        "(pytest-benchmark's --benchmark-autosave writes them)")
    if len(matches) > 1:
        raise SaveError(f"save {int(ref):04d} is in several machine folders under {storage}/; give its path")
    return matches[0]


def latest_saves(storage: Path, count: int) -> list[Path]:
    """The `count` newest saves (highest numbers) of the one machine folder under `storage`."""
    folders = sorted(p for p in storage.glob("*") if p.is_dir()) if storage.is_dir() else []
    if len(folders) != 1:
        found = "none" if not folders else ", ".join(p.name for p in folders)
        raise SaveError(f"need one machine folder under {storage}/ to pick saves from (found {found}); "
                        "name the saves")
    saves = sorted(folders[0].glob("[0-9][0-9][0-9][0-9]_*.json"))
    if len(saves) < count:
        raise SaveError(f"{folders[0]}: {len(saves)} save(s), need {count}; "
                        "run the benchmarks with --benchmark-autosave")
    return saves[-count:]


def ratios(path: Path, keys: tuple[str, ...] | None) -> dict[str, dict[str, float]]:
    """{benchmark fullname: {key: ratio}} from one save; benchmarks without a ratio map to {}.

    keys None: each benchmark's own `gate_key` from its extra_info (the same-run ratio it names as
    stable), or DEFAULT_KEY where a save has none (saves written before gate_key existed)."""
    try:
        data = json.loads(path.read_text())
        benchmarks = data["benchmarks"]
        found = {}
        for b in benchmarks:
            info = b.get("extra_info", {})
            wanted = keys or (info.get("gate_key", DEFAULT_KEY),)
            found[b.get("fullname", b["name"])] = {k: float(info[k]) for k in wanted if k in info}
        return found
    except OSError as e:
        raise SaveError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SaveError(f"{path}: not a pytest-benchmark save ({type(e).__name__}: {e})") from None


def compare(old: dict, new: dict, threshold: float) -> tuple[list[tuple], bool]:
    """Rows (benchmark, key, old, new, change %, verdict) and whether any ratio fell past `threshold` %."""
    rows, failed = [], False
    for name in sorted(old.keys() | new.keys()):
        if name not in old or name not in new:
            side = "new" if name in new else "old"
            rows.append((name, "", None, None, None, f"only in {side}: not compared"))
            continue
        keys = sorted(old[name].keys() | new[name].keys()) or [""]
        for key in keys:
            a, b = old[name].get(key), new[name].get(key)
            if a is None or b is None or not (a > 0 and math.isfinite(b)):
                rows.append((name, key, a, b, None, "no ratio on both sides"))
                continue
            change = 100.0 * (b / a - 1.0)
            regressed = change < -threshold
            failed |= regressed
            rows.append((name, key, a, b, change, "REGRESSED" if regressed else "ok"))
    return rows, failed


def table(rows: list[tuple]) -> str:
    """Plain-text table, a row per benchmark and ratio key."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    head = ["benchmark", "ratio", "old", "new", "change", ""]
    body = [[name, key or "-", num(a, ".3f"), num(b, ".3f"), num(c, "+.1f") + ("%" if c is not None else ""), v]
            for name, key, a, b, c, v in rows]
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("saves", nargs="*", metavar="SAVE",
                        help="old and new: a save number (0001) or a .json path; "
                             "one: it vs the latest; none: the two latest")
    parser.add_argument("--storage", default=".benchmarks",
                        help="pytest-benchmark's storage folder (default .benchmarks)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD,
                        help=f"percent a ratio may fall before the gate fails (default {THRESHOLD:g})")
    parser.add_argument("--key", action="append", dest="keys",
                        help="extra_info ratio to compare for every benchmark (repeatable; default: each "
                             f"benchmark's gate_key, else {DEFAULT_KEY})")
    args = parser.parse_args(argv)
    if len(args.saves) > 2:
        parser.error("give at most two saves: old and new")
    keys, storage = tuple(args.keys) if args.keys else None, Path(args.storage)
    try:
        refs = [find_save(s, storage) for s in args.saves]
        if len(refs) < 2:
            latest = latest_saves(storage, 2 - len(refs))
            refs = refs + latest[-1:] if refs else latest
        old_path, new_path = refs
        rows, failed = compare(ratios(old_path, keys), ratios(new_path, keys), args.threshold)
    except SaveError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    print(f"old: {old_path}\nnew: {new_path}")
    print(table(rows))
    gated = [r[4] for r in rows if r[4] is not None]
    worst = f"; largest fall {-min(gated):.1f}%" if gated and min(gated) < 0 else ""
    verdict = "FAIL: a ratio fell" if failed else "pass: no ratio fell"
    print(f"{verdict} by more than {args.threshold:g}% ({len(gated)} compared{worst})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
