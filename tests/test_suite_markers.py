"""The `slow` marker (tests/conftest.py SLOW): every entry still names a collected test, so a
renamed test cannot drop out of the slow set (and into `-m "not slow"`) unseen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_slow_entry_names_a_test_marked_slow(slow_prefixes):
    files = sorted({"tests/" + prefix.split("::")[0] for prefix in slow_prefixes})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "slow", *files], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    slow = [line.removeprefix("tests/") for line in out.splitlines() if "::" in line]
    assert all(node.startswith(slow_prefixes) for node in slow)
    for prefix in slow_prefixes:
        assert any(node.startswith(prefix) for node in slow), f"{prefix} names no test"
