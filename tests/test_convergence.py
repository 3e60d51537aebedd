"""The whole pipeline learns: scratch on `data synth` reaches 0.9 test accuracy in a few CPU minutes,
with every loader (DALI's CPU operators, the torch reference, and the cached loader's decode-once
path with its torch kernel), so they agree within noise.

Measured on a 2-core CPU (48 px, batch 16, the chapter's optimizer, about 20 s an epoch), one
seeded run per loader, test accuracy by epoch:
dali 0.879, 0.918, 0.918, 0.902, 0.941, 0.945; torch 0.773, 0.902, 0.906, 0.922, 0.914, 0.973;
cached 0.770, 0.910, 0.953, 0.938, 0.941, 0.969 (a busy machine: 7 minutes).
"""

from __future__ import annotations

import json

import pytest

from fastft.cli import main
from fastft.data.synth import write_synthetic


@pytest.mark.parametrize("loader", ["torch", "dali", "cached"])
def test_scratch_learns_the_synthetic_hotdogs(tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    data = write_synthetic(tmp_path / "synth", n_train=1024, n_test=256, seed=0, progress=False)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--strategy", "scratch", "--image-size", "48",
            "--batch-size", "16", "--epochs", "6", "--device", "cpu", "--loader", loader, "--out", str(run)]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_examples"] == 256 and summary["loader"] == loader
    assert summary["test_acc"] >= 0.9, summary
