"""The command line as a new user meets it (issue 19, items 4 and 9-15): mistakes answered before
torch loads, case-only class folders, batches that do not fit, data check in one pass, predict on
folders and globs, and what the log says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from PIL import Image

from fastft.cli import main, parser
from fastft.config import STRATEGY_NAMES, batch_split_problem, oversized_batch_line
from fastft.data import dali_available
from fastft.data.layout import check_report, scan_dataset
from fastft.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
needs_matplotlib = pytest.mark.skipif(find_spec("matplotlib") is None, reason="needs matplotlib")


def tiny_args(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--weights", str(weights), "--image-size", "32", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--amp", "off", "--epochs", "1", "--out", str(out), *extra]


def write_images(folder: Path, n: int, size: tuple[int, int] = (40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i % 255, 90, 160)).save(folder / f"{i}.jpg")


# --- 9: flag values are checked before torch loads ---------------------------------------------

EARLY = [
    (["train", "--image-size", "17"], "--image-size must be at least 32 px"),
    (["train", "--strategy", "fintune"], "unknown strategy 'fintune'; choose one of finetune, frozen, probe, "
                                         "hotdog, scratch, partial:K (K = 0..4 for resnet18); did you mean finetune?"),
    (["train", "--lr", "-1"], "--lr must be positive, got -1.0"),
    (["train", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["train", "--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["train", "--data", "synthtic"], "did you mean synthetic?"),
    (["train", "--weights", "imagenett"], "imagenett: no such weights file (--weights takes imagenet, none or a PATH); did you mean imagenet?"),
    (["train", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'; did you mean cuda?"),
    (["train", "--strategy", "partial:5"], "K counts the residual stages frozen after the stem, 0..4"),
    (["bench", "--strategies", "finetune,frozn"], "did you mean frozen?"),
    (["eval", "--checkpoint", "run", "--top", "-1"], "--top must be 0 or more, got -1"),
    (["predict", "--checkpoint", "run", "--top-k", "0", "x.jpg"], "--top-k must be at least 1, got 0"),
    (["data", "synth", "out", "--synth-test", "1"], "--synth-train and --synth-test must be at least 2"),
    (["train", "--seed", "99999999999999999999"], "--seed must be from 0 to 4294967295 (2^32 - 1), got "
                                                "99999999999999999999"),  # torch: "Overflow when unpacking long long"
    (["train", "--seed", "-1"], "--seed must be from 0 to 4294967295 (2^32 - 1), got -1"),
    (["data", "synth", "out", "--seed", "4294967296"], "--seed must be from 0 to 4294967295 (2^32 - 1), got 4294967296"),
]

PROBE = """
import contextlib, io, json, sys
from fastft.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    results.append([status, err.getvalue(), "torch" in sys.modules])
print(json.dumps(results))
"""


def test_flag_mistakes_are_answered_before_torch_loads(tmp_path):
    """One fresh interpreter runs every case: none may import torch before it answers."""
    argvs = [argv for argv, _ in EARLY]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, check=True)
    for (argv, expected), (status, err, torch_loaded) in zip(EARLY, json.loads(done.stdout)):
        assert status == 2, argv
        assert err.count("\n") == 1 and err.startswith("fastft: error: ") and expected in err, (argv, err)
        assert not torch_loaded, f"{argv} imported torch before answering"


def test_every_strategy_name_is_known_before_torch_loads():
    from fastft.strategy import REGISTRY
    assert tuple(REGISTRY) == STRATEGY_NAMES


# --- 10: a batch larger than the train split -----------------------------------------------------

def test_oversized_batch_line_numbers():
    assert oversized_batch_line(128, 60) == ("--batch-size 128 is larger than the train split's 60 images: each "
                                             "epoch is one step (one update) over all 60")
    assert oversized_batch_line(60, 60) is None
    assert oversized_batch_line(128, 60, 2).endswith("over all 60, each of the 2 processes taking its share")


LOADERS = ["torch", "cached", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                            reason="needs nvidia.dali"))]


@pytest.mark.parametrize("loader", LOADERS)
def test_a_batch_larger_than_the_train_split_is_said_in_one_line(tiny_data, imagenet_like, tmp_path, capsys,
                                                                 loader):
    assert main(tiny_args(tiny_data, imagenet_like, tmp_path / "r", "--batch-size", "32", "--loader", loader)) == 0
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if "--batch-size 32" in line]
    assert said == ["warning: --batch-size 32 is larger than the train split's 24 images: each epoch is one "
                    "step (one update) over all 24"]
    assert "amp: off, fp32 throughout (--amp off)" in captured.out.splitlines()  # 15: the AMP dtype


# --- 11: a batch that does not divide over torchrun's processes ----------------------------------

def test_batch_split_names_the_nearest_valid_sizes():
    assert batch_split_problem(15, 2).endswith("use --batch-size 14 or 16")
    assert batch_split_problem(3, 4).endswith("use --batch-size 4")
    assert batch_split_problem(130, 4).endswith("use --batch-size 128 or 132")
    assert batch_split_problem(16, 2) is None and batch_split_problem(15, 1) is None


def test_under_torchrun_a_batch_that_does_not_divide_is_one_line_from_rank_0(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastft", "train", "--data", "synthetic", "--device", "cpu", "--batch-size", "15"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.startswith("fastft: error:")]
    assert lines == ["fastft: error: --batch-size 15 does not divide over 2 processes (it is the global batch, "
                     "split evenly); use --batch-size 14 or 16"], output
    # The first process to end exits with the documented status (torchrun may stop the other first).
    assert "exitcode  : 2" in output and "[rank" not in output
    assert not (tmp_path / "runs").exists()  # stopped before any work


# --- 4: class folders that differ only in letter case --------------------------------------------

def case_twins(root: Path) -> Path:
    for split, n in (("train", 2), ("test", 1)):
        for name in ("Dog", "cat", "dog"):
            write_images(root / split / name, n)
    return root


def test_case_only_class_folders_are_named_in_a_warning(tmp_path):
    root = case_twins(tmp_path / "d")
    layout = scan_dataset(root)
    assert layout.classes == ("Dog", "cat", "dog")  # ImageFolder's classes, kept
    expected = [f"{root}/{split}: class folders Dog and dog differ only in letter case; they are 2 separate "
                f"classes here (on macOS and Windows they would be one folder): merge them if they hold one class"
                for split in ("train", "test")]
    assert list(layout.warnings) == expected
    lines, ok = check_report(root)
    assert ok and [f"warning: {line}" for line in expected] == [line for line in lines if "letter case" in line]


def test_a_test_class_that_differs_from_train_only_in_case_names_both(tmp_path):
    root = tmp_path / "d"
    for split, names in (("train", ("cat", "dog")), ("test", ("cat", "Dog"))):
        for name in names:
            write_images(root / split / name, 2)
    with pytest.raises(DataError) as info:
        scan_dataset(root)
    assert str(info.value).endswith(f"(train classes: cat, dog); train has dog, which differs only in letter "
                                    f"case: rename one")


@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_trains_the_case_twins_as_the_scan_lists_them(imagenet_like, tmp_path, capsys, loader):
    root = case_twins(tmp_path / "d")
    run = tmp_path / "run"
    assert main(tiny_args(root, imagenet_like, run, "--loader", loader, "--batch-size", "6")) == 0
    err = capsys.readouterr().err
    assert f"warning: {root}/train: class folders Dog and dog differ only in letter case" in err
    assert json.loads((run / "config.json").read_text())["resolved"]["classes"] == ["Dog", "cat", "dog"]


# --- 12: data check reports every problem in one pass --------------------------------------------

def test_data_check_lists_every_folder_problem_in_one_pass(tmp_path, capsys):
    root = tmp_path / "d"
    write_images(root / "train" / "cat", 2)
    write_images(root / "train" / "dog", 2)
    (root / "train" / "empty").mkdir()
    write_images(root / "test" / "cat", 1)
    write_images(root / "test" / "bird", 1)  # a test class train lacks
    (root / "test" / "cat" / "cut.jpg").write_bytes((root / "test" / "cat" / "0.jpg").read_bytes()[:200])
    assert main(["data", "check", str(root)]) == 3
    out = capsys.readouterr().out.splitlines()
    bad = [line for line in out if line.startswith("BAD ")]
    assert [line.split(": ", 1)[0] for line in bad] == [f"BAD {root}/train/empty", f"BAD {root}/test/bird",
                                                        f"BAD {root}/test/cat/cut.jpg"]
    assert out[-1] == "2 folder problems; 1 bad file out of 7 images"
    with pytest.raises(DataError, match=r"\(and 1 more folder problem; run `fastft data check .*` to list them\)"):
        scan_dataset(root)


def test_data_check_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- 13: consistency --------------------------------------------------------------------------

def test_version():
    done = subprocess.run([sys.executable, "-m", "fastft", "--version"], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    from fastft import __version__
    assert done.stdout == f"fastft {__version__}\n"


def option_help(argv: list[str], option: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    return text[text.index(option, text.index("options:")):][:200]


def test_help_explains_epochs_weight_decay_and_seed_and_synth_shows_defaults(capsys):
    for option in ("--epochs EPOCHS", "--weight-decay WEIGHT_DECAY", "--seed SEED"):
        assert not option_help(["train"], option, capsys).split(" ", 2)[2].startswith("(default"), option
    assert "(default: 2000)" in option_help(["data", "synth"], "--synth-train", capsys)
    assert "(default: 800)" in option_help(["data", "synth"], "--synth-test", capsys)
    assert "(default: 0)" in option_help(["data", "synth"], "--seed", capsys)


@pytest.mark.parametrize("argv, dests", [(["train"], ("synth_train", "synth_test")),
                                         (["bench"], ("train_images", "test_images")),
                                         (["data", "synth", "d"], ("synth_train", "synth_test"))])
def test_synthetic_sizes_have_one_name_and_old_names_still_work(argv, dests, capsys):
    old = {"train": None, "bench": ("--train-images", "--test-images"), "data": ("--train", "--test")}[argv[0]]
    args = vars(parser().parse_args([*argv, "--synth-train", "6", "--synth-test", "4"]))
    assert (args[dests[0]], args[dests[1]]) == (6, 4)
    if old:
        args = vars(parser().parse_args([*argv, old[0], "6", old[1], "4"]))
        assert (args[dests[0]], args[dests[1]]) == (6, 4)
        with pytest.raises(SystemExit):
            main([*argv[:2], "--help"])
        assert old[0] not in capsys.readouterr().out  # hidden


def test_device_defaults_to_auto_everywhere():
    p = parser()
    assert p.parse_args(["eval", "--checkpoint", "r"]).device == "auto"
    assert p.parse_args(["predict", "--checkpoint", "r", "x.jpg"]).device == "auto"
    assert p.parse_args(["bench"]).device == "auto"


# --- 14: predict on folders and globs, with --top-k ----------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tiny_data, imagenet_like, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("inputs") / "run"
    assert main(tiny_args(tiny_data, imagenet_like, run)) == 0
    return run


def test_predict_takes_folders_globs_and_any_file_name(run_dir, tmp_path, capsys):
    shots = tmp_path / "shots"
    write_images(shots, 2)
    odd = ["new\nline.jpg", "a b: c.jpg", "naïve #1.jpg"]
    for name in odd:
        Image.new("RGB", (40, 30), (200, 50, 50)).save(shots / name, "JPEG")
    write_images(shots / "more", 1)
    (shots / "notes.txt").write_text("not an image")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_dir), "--device", "cpu", str(shots)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6  # 2 + 3 odd names + 1 in the subfolder; the .txt passed over
    assert lines[-1].startswith(f"{shots}/more/0.jpg: ")
    assert any(line.startswith(repr(str(shots / "new\nline.jpg")) + ": ") for line in lines)
    assert main(["predict", "--checkpoint", str(run_dir), "--device", "cpu", str(shots / "*.jpg")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert main(["predict", "--checkpoint", str(run_dir), str(shots / "*.png")]) == 2
    assert capsys.readouterr().err == f"fastft: error: {shots}/*.png: no file matches this pattern\n"


def test_predict_top_k_lists_classes_most_probable_first(run_dir, tiny_data, capsys):
    image = sorted((tiny_data / "test" / "hotdog").iterdir())[0]
    assert main(["predict", "--checkpoint", str(run_dir), "--device", "cpu", "--top-k", "5", str(image)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ")
    ranked = [item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", ")]
    assert sorted(label for label, _ in ranked) == ["hotdog", "not-hotdog"]  # k above the class count: all
    probs = [float(p) for _, p in ranked]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 2e-3


# --- 15: what the log says ------------------------------------------------------------------------

def test_precision_line_states_the_amp_dtype_and_why():
    from fastft.report import precision_line
    assert precision_line("auto", "bf16", "cpu") == ("amp: bf16 autocast, weights and optimizer in fp32 "
                                                    "(--amp auto: this CPU has fast bf16)")
    assert precision_line("auto", "off", "cpu").startswith("amp: off, fp32 throughout (--amp auto: this CPU has "
                                                          "no fast bf16")
    assert precision_line("fp16", "fp16", "cuda").endswith("(--amp fp16)")


@pytest.mark.skipif(find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_says_where_it_writes(tmp_path, capsys):
    from fastft.report import Reporter
    Reporter(tmp_path / "runs" / "r", enabled=True, tensorboard=True).close()
    assert capsys.readouterr().out == (f"tensorboard: per-epoch scalars to {tmp_path}/runs/r/tb; view them with "
                                       f"`tensorboard --logdir {tmp_path}/runs`\n")


def test_the_curves_warning_names_the_full_path(tmp_path, monkeypatch, capsys):
    from fastft import report
    from fastft.curves import MatplotlibMissing

    def missing(*args, **kwargs):
        raise MatplotlibMissing("curves need matplotlib (x): pip install matplotlib")
    monkeypatch.setattr(report, "write_run_curves", missing)
    report.Reporter(tmp_path / "runs" / "r", enabled=True).write_curves()
    assert capsys.readouterr().err.startswith(f"warning: no {tmp_path}/runs/r/curves.png: ")


def test_the_safetensors_hint_names_the_extra(monkeypatch):
    from fastft.errors import WeightsError
    from fastft.weights import import_safetensors
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(WeightsError, match=r"pip install safetensors \(or pip install 'fastft\[safetensors\]'\)"):
        import_safetensors("model.safetensors")


def fake_run(folder: Path, accs: list[float]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"strategy": "frozen"}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e + 1, "train_loss": 0.5, "train_acc": a, "test_acc": a}) + "\n"
        for e, a in enumerate(accs)))
    return folder


@needs_matplotlib
def test_plot_says_when_it_replaces_a_file_and_keeps_accuracy_on_0_1(tmp_path, capsys):
    from fastft.curves import overlay_figure, read_metrics
    run, out = fake_run(tmp_path / "r", [0.45, 0.55]), tmp_path / "all.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}: frozen\n"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out} (replaced the file that was there): frozen\n"
    axes = overlay_figure([("frozen", read_metrics(run))]).axes
    assert [ax.get_ylim() for ax in axes[1:]] == [(0, 1.05), (0, 1.05)]  # as a run's curves.png


def test_hotdog_without_a_hotdog_class_suggests_what_to_do():
    from fastft.strategy import hotdog_class_problem
    assert hotdog_class_problem(["cat", "dog"]).endswith(
        "the dataset has ['cat', 'dog']: use --strategy finetune (the same training, its head Xavier-initialised)")
    assert "rename 'Hot_Dog' to 'hotdog', or use --strategy finetune" in hotdog_class_problem(
        ["Hot_Dog", "not-hotdog"])


def test_a_bench_variant_that_failed_exits_3_as_data_check_does(monkeypatch):
    from fastft import bench
    monkeypatch.setattr(bench, "bench_main", lambda spec, json_path, plot_path: 1)  # a row with an error
    assert main(["bench", "--strategies", "frozen"]) == 3


def test_another_torchrun_process_waits_for_rank_0_to_print_before_it_exits(monkeypatch, capsys):
    """torchrun stops every process once one exits: a rank that prints nothing must not end first."""
    from fastft import cli
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--image-size", "17"]) == 2
    assert capsys.readouterr().err == "" and slept == [cli.EARLY_ERROR_GRACE_S]
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "--image-size", "17"]) == 2
    assert capsys.readouterr().err.startswith("fastft: error: --image-size must be") and len(slept) == 1
