"""A full disk and read-only places: one line naming the file and the cause, nothing saved lost.

Two ways to fill a disk or forbid a folder, and each test says which it uses:
- real: a small tmpfs, or a read-only bind mount, where this process may mount (root with
  CAP_SYS_ADMIN); skipped with the reason where it may not;
- imitated: `fastft.safe_write`'s `open` replaced by one whose files raise OSError(ENOSPC) after
  N bytes (torch.save then raises its own RuntimeError, as on a real full disk), or os.access and
  os.statvfs answering as a read-only file system does. These run everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastft import safe_write
from fastft.checkpoint import CheckpointWriter, load_checkpoint, save_atomic
from fastft.cli import main
from fastft.errors import WriteError
from fastft.report import append_line, write_json_atomic

ONE_LINE = re.compile(r"fastft: error: [^\n]+\n")


# --- the two ways -------------------------------------------------------------------------
def _run(*cmd: str) -> bool:
    if shutil.which(cmd[0]) is None:
        return False
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture
def mounts():
    """Mount points to unmount after the test, in reverse order."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def small_disk(folder: Path, mb: int, mounts: list) -> Path:
    """Real: a tmpfs of `mb` MB at `folder`; skips where mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    if not _run("mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(folder)):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the imitated tests cover this")
    mounts.append(folder)
    return folder


def grow_disk(folder: Path, mb: int) -> None:
    """Real: free space, by giving the tmpfs more room."""
    assert _run("mount", "-o", f"remount,size={mb}m", str(folder))


class FillingFile:
    """A file that takes `room` bytes and then raises ENOSPC, as a write to a full disk does."""

    def __init__(self, handle, room: int, partial: int = 0):
        self.handle, self.room, self.partial = handle, room, partial  # partial: bytes of the failing write kept

    def write(self, data) -> int:
        if len(data) > self.room:
            self.handle.write(data[:self.partial])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def imitate_full_disk(monkeypatch, room: int, names: tuple[str, ...] = ()) -> None:
    """Imitated: files that safe_write opens (those whose name contains one of `names`, or all)
    take `room` bytes, then ENOSPC."""
    def opener(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        if "w" in mode and (not names or any(name in str(path) for name in names)):
            return FillingFile(handle, room)
        return handle
    monkeypatch.setattr(safe_write, "open", opener, raising=False)


def read_only(folder: Path, monkeypatch, mounts: list, real: bool) -> str:
    """Make `folder` (which exists, with what it holds) read-only: real, a read-only bind mount
    over itself (skipped where not permitted); imitated, access(2) and statvfs answering as a
    read-only file system does for it and everything under it."""
    if real:
        if not _run("mount", "--bind", str(folder), str(folder)):
            pytest.skip("cannot bind-mount here (needs root with CAP_SYS_ADMIN); the imitated case covers this")
        mounts.append(folder)
        assert _run("mount", "-o", "remount,bind,ro", str(folder))
        return "real"
    inside = lambda path: Path(os.path.abspath(path)).is_relative_to(folder)
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if inside(path) and mode & os.W_OK
                        else real_access(path, mode, **kw))
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY) if inside(path)
                        else real_statvfs(path))
    return "imitated"


# --- item 5: a full disk ------------------------------------------------------------------
STATE = {"model": {"w": torch.arange(300_000, dtype=torch.float32)}, "epoch": 2, "config": {}, "classes": ["a"]}


def test_state_bytes_counts_each_storage_once():
    from fastft.checkpoint import state_bytes
    w = torch.zeros(1000)
    assert state_bytes({"a": w, "view": w[:10], "list": [torch.zeros(10, dtype=torch.int64)]}) == 4000 + 80 + (64 << 10)


def test_torch_save_on_an_imitated_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic({**STATE, "epoch": 1}, path)
    imitate_full_disk(monkeypatch, room=100_000)
    with pytest.raises(WriteError) as caught:
        save_atomic(STATE, path)
    # torch's own error is what the user used to see; it is kept as the cause.
    assert isinstance(caught.value.__cause__, RuntimeError) and "inline_container" in str(caught.value.__cause__)
    message = str(caught.value)
    assert "\n" not in message
    assert re.fullmatch(rf"{re.escape(str(path))}: disk full: the file needs about 1\.2 MB and "
                        rf"{re.escape(str(tmp_path))} has [\d.]+ (KB|MB|GB) free; free space there", message)
    assert caught.value.needed == 1_200_000 + (64 << 10)
    assert load_checkpoint(path)["epoch"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_torch_save_on_a_real_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, mounts):
    disk = small_disk(tmp_path / "disk", 2, mounts)
    path = disk / "checkpoint.pt"
    save_atomic({**STATE, "epoch": 1}, path)  # 1.2 MB of 2: a second copy beside it does not fit
    with pytest.raises(WriteError, match=rf"^{re.escape(str(path))}: disk full: the file needs about 1\.2 MB "
                                         rf"and {re.escape(str(disk))} has [\d.]+ KB free; free space there$"):
        save_atomic(STATE, path)
    assert load_checkpoint(path)["epoch"] == 1 and [p.name for p in disk.iterdir()] == ["checkpoint.pt"]


def test_the_background_writer_hands_over_the_one_line_and_keeps_its_last_epoch(tmp_path, monkeypatch):
    writer, path = CheckpointWriter(), tmp_path / "checkpoint.pt"
    writer.save({**STATE, "epoch": 1}, path)
    writer.wait()
    imitate_full_disk(monkeypatch, room=1000)
    writer.save(STATE, path)
    with pytest.raises(WriteError, match="disk full: the file needs about 1.2 MB"):
        writer.wait()
    assert writer.saved_epoch == 1 and load_checkpoint(path)["epoch"] == 1


def test_a_metrics_line_that_does_not_fit_is_cut_off_whole(tmp_path, monkeypatch):
    """Imitated: the disk fills five bytes into the line."""
    from fastft import report
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"epoch": 1}))

    def opener(target, mode="r", *a, **kw):
        return FillingFile(open(target, mode, *a, **kw), 0, partial=5)
    monkeypatch.setattr(report, "open", opener, raising=False)
    with pytest.raises(WriteError, match=rf"^{re.escape(str(path))}: disk full: the file needs about 13 bytes"):
        append_line(path, json.dumps({"epoch": 2}))
    assert path.read_text() == '{"epoch": 1}\n'


@pytest.mark.parametrize("writer", ["json", "safetensors", "curves"])
def test_every_file_writer_on_an_imitated_full_disk_is_one_line_and_keeps_the_old_file(writer, tmp_path,
                                                                                       monkeypatch):
    """config.json / summary.json / eval.json / sidecars, model.safetensors, curves.png and eval's
    PNGs all go through safe_write; the old file stays, no .tmp is left."""
    if writer == "json":
        path = tmp_path / "summary.json"
        write = lambda: write_json_atomic(path, {"a": "x" * 5000})
    elif writer == "safetensors":
        pytest.importorskip("safetensors")
        from fastft.weights import write_model_file
        path = tmp_path / "model.safetensors"
        write = lambda: write_model_file(path, {"w": torch.zeros(10_000)}, {"classes": ["a"]})
    else:
        pytest.importorskip("matplotlib")
        from matplotlib.figure import Figure

        from fastft.curves import new_figure, save_png
        path, figure = tmp_path / "curves.png", new_figure((2, 2))
        write = lambda: save_png(figure, path)
        real_savefig = Figure.savefig

        def filling_savefig(self, target, **kwargs):  # matplotlib opens its own file
            with open(target, "wb") as handle:
                real_savefig(self, FillingFile(handle, 100), **kwargs)
        monkeypatch.setattr(Figure, "savefig", filling_savefig)
    path.write_bytes(b"the old file")
    imitate_full_disk(monkeypatch, room=100)
    with pytest.raises(WriteError, match=rf"^{re.escape(str(path))}: disk full: .* free; free space there$"):
        write()
    assert path.read_bytes() == b"the old file" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_an_export_whose_disk_fills_is_one_line_and_leaves_no_file(small_run, tmp_path, monkeypatch, capsys):
    """Imitated: the program's bytes meet a full disk after 1 MB, with 1 MB free; the message says
    how much the program needs (the model's weights, ~43 MB)."""
    imitate_full_disk(monkeypatch, 1 << 20)
    monkeypatch.setattr(safe_write.shutil, "disk_usage", lambda path: SimpleNamespace(free=1 << 20))
    out = tmp_path / "m.pt2"
    assert main(["export", "--checkpoint", str(small_run), "--format", "pt2", "--out", str(out), "--no-check"]) == 2
    assert capsys.readouterr().err == (f"fastft: error: {out}: disk full: the file needs about 42.7 MB and "
                                       f"{tmp_path} has 1.0 MB free; free space there\n")
    assert not any(tmp_path.glob("m*"))


def test_a_dali_copy_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """Imitated: DALI's converted copies (the decode cache on disk) meet ENOSPC."""
    from fastft.data import layout as layout_module
    from fastft.data.layout import DatasetLayout
    image = tmp_path / "a.png"
    image.write_bytes(b"")

    def full(path, cache_dir):
        raise OSError(errno.ENOSPC, "No space left on device", str(cache_dir / "converted" / "x.png"))
    monkeypatch.setattr(layout_module, "rgb_copy", full)
    layout = DatasetLayout(tmp_path, ("a",), {"train": ((image, 0),)}, dali_copies=frozenset({image}))
    with pytest.raises(WriteError, match=rf"^{re.escape(str(tmp_path / 'c' / 'converted' / 'x.png'))}: disk full: "):
        layout.dali_files("train", tmp_path / "c")


def _train_args(tiny_data, imagenet_like, run: Path, epochs: int) -> list[str]:
    return ["train", "--data", str(tiny_data), "--weights", str(imagenet_like), "--image-size", "32",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--amp", "off", "--no-compile",
            "--loader", "torch", "--out", str(run), "--epochs", str(epochs)]


def _resume_args(line: str) -> list[str]:
    """The command the error line names, as main() takes it (without the program name)."""
    command = line.split("resume with: ", 1)[1].strip()
    words = shlex.split(command)
    assert words[:2] == ["fastft", "train"]
    return words[1:]


def _fails_at_epoch_2_then_resumes(run: Path, args: list, capsys, free_space) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ONE_LINE.fullmatch(err.splitlines()[-1] + "\n") and "Traceback" not in err
    last = err.splitlines()[-1]
    assert f"{run}/checkpoint.pt: disk full: the file needs about " in last
    assert f"; free space there; {run} holds the checkpoint of epoch 1; resume with: " in last
    assert load_checkpoint(run)["epoch"] == 1
    free_space()
    assert main(_resume_args(last)) == 0  # the exact command it named
    assert load_checkpoint(run)["epoch"] == 2
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_run_whose_disk_fills_stops_in_one_line_and_resumes_after_space_is_freed_imitated(
        tiny_data, imagenet_like, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    writes = []

    def opener(path, mode="r", *a, **kw):  # the second checkpoint finds the disk full
        handle = open(path, mode, *a, **kw)
        if "checkpoint.pt" in str(path) and "w" in mode:
            writes.append(path)
            return FillingFile(handle, 10_000) if len(writes) == 2 else handle
        return handle
    monkeypatch.setattr(safe_write, "open", opener, raising=False)
    _fails_at_epoch_2_then_resumes(run, _train_args(tiny_data, imagenet_like, run, 2), capsys,
                                   lambda: monkeypatch.delattr(safe_write, "open"))


def test_a_run_whose_disk_fills_stops_in_one_line_and_resumes_after_space_is_freed_real(
        tiny_data, imagenet_like, tmp_path, mounts, capsys):
    """A 70 MB tmpfs holds one 2-class ResNet-18 checkpoint (~45 MB), not a second beside it."""
    disk = small_disk(tmp_path / "disk", 70, mounts)
    run = disk / "run"
    _fails_at_epoch_2_then_resumes(run, _train_args(tiny_data, imagenet_like, run, 2), capsys,
                                   lambda: grow_disk(disk, 400))


# --- item 6: read-only places -------------------------------------------------------------
@pytest.fixture(params=["imitated", "real"])
def how(request):
    return request.param


def test_train_into_a_read_only_folder_stops_before_any_work(tiny_data, imagenet_like, tmp_path, monkeypatch,
                                                             mounts, capsys, how):
    place = tmp_path / "ro"
    place.mkdir()
    read_only(place, monkeypatch, mounts, real=how == "real")
    run = place / "run"
    assert main(_train_args(tiny_data, imagenet_like, run, 1)) == 2
    out, err = capsys.readouterr()
    assert err == f"fastft: error: --out {run}: cannot write there: {place} is on a read-only file system; " \
                  f"choose another folder\n"
    assert "epoch" not in out and not run.exists()


def test_resume_in_a_read_only_run_folder_stops_before_any_work(tiny_data, imagenet_like, tmp_path, monkeypatch,
                                                                mounts, capsys, how):
    run = tmp_path / "run"
    assert main(_train_args(tiny_data, imagenet_like, run, 1)) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    read_only(run, monkeypatch, mounts, real=how == "real")
    assert main([*_train_args(tiny_data, imagenet_like, run, 2), "--resume"]) == 2
    out, err = capsys.readouterr()
    assert err == f"fastft: error: --out {run}: cannot write there: {run} is on a read-only file system; " \
                  f"choose another folder\n"
    assert "epoch" not in out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_data):
    from test_export import make_run
    return make_run(tmp_path_factory.mktemp("ro") / "run", tiny_data)


@pytest.mark.parametrize("command", ["export-safetensors", "export-pt2", "plot", "eval"])
def test_export_plot_and_eval_into_a_read_only_folder_are_one_line(small_run, tmp_path, monkeypatch, mounts,
                                                                   capsys, how, command):
    place = tmp_path / "ro"
    place.mkdir()
    read_only(place, monkeypatch, mounts, real=how == "real")
    if command.startswith("export"):
        fmt = command.split("-")[1]
        if fmt == "safetensors":
            pytest.importorskip("safetensors")
        out = place / f"model.{fmt}"
        args = ["export", "--checkpoint", str(small_run), "--format", fmt, "--out", str(out), "--no-check"]
    elif command == "plot":
        (small_run / "metrics.jsonl").write_text(json.dumps(
            {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5}) + "\n")
        out = place / "runs-curves.png"
        args = ["plot", str(small_run), "--out", str(out)]
    else:
        out = place / "eval"
        args = ["eval", "--checkpoint", str(small_run), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"fastft: error: --out {out}: cannot write there: {place} is on a read-only file system; " \
                  f"choose another folder\n"
    assert not any(place.iterdir())


def _dali_imports() -> bool:
    from fastft.data import dali_available
    return dali_available()


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not _dali_imports(), reason="nvidia.dali does not import here"))])
def test_a_read_only_cache_falls_back_to_a_temporary_one_with_one_warning(tiny_data, imagenet_like, tmp_path,
                                                                         monkeypatch, mounts, capsys, how, loader):
    """DALI's converted copies, the synthetic set and the compile cache live in the cache folder."""
    import tempfile
    cache = tmp_path / "xdg"
    cache.mkdir()
    read_only(cache, monkeypatch, mounts, real=how == "real")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    run = tmp_path / "run"
    args = _train_args(tiny_data, imagenet_like, run, 1)
    args[args.index("--data") + 1] = "synthetic"
    args[args.index("--loader") + 1] = loader
    assert main([*args, "--synth-train", "16", "--synth-test", "8"]) == 0
    err = capsys.readouterr().err
    fallback = tmp_path / "tmp" / f"fastft-cache-{os.getuid()}"
    assert err.count("warning: cache folder") == 1
    assert (f"warning: cache folder {cache}/fastft cannot be written ({cache} is on a read-only file system); "
            f"this run caches in {fallback} instead; set XDG_CACHE_HOME to a writable folder to keep the cache"
            in err.splitlines())
    assert (fallback / "synthetic-s0-16-8").is_dir() and load_checkpoint(run)["epoch"] == 1


def test_tensorboard_in_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    """Imitated: the event writer's folder cannot be made (EROFS), as in a run folder that turned
    read-only after the preflight."""
    from fastft.tensorboard_log import TensorBoardLog
    pytest.importorskip("tensorboard")
    log = TensorBoardLog(tmp_path / "tb")

    def read_only_writer(log_dir, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", log_dir)
    log.writer_class = read_only_writer
    with pytest.raises(WriteError, match=rf"^{re.escape(str(tmp_path / 'tb'))}: cannot write: "
                                         rf"{re.escape(str(tmp_path))} is on a read-only file system$"):
        log.add_epoch({"epoch": 1, "train_loss": 0.5}, [0.1])


def test_a_full_disk_at_the_last_model_file_keeps_the_epochs_results(make_cfg, monkeypatch, capsys):
    """model.safetensors is a copy of the checkpoint's weights: its failed write is a warning, and
    the epoch's metrics line, summary and checkpoint are all on disk."""
    from fastft import engine

    def full(run_dir, *args):
        raise WriteError(f"{run_dir}/model.safetensors: write failed (No space left on device)")

    monkeypatch.setattr(engine, "save_run_weights", full)
    cfg = make_cfg(epochs=1)
    summary = engine.train(cfg)
    run = Path(cfg.out)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    assert json.loads((run / "summary.json").read_text())["test_acc"] == summary["test_acc"]
    assert load_checkpoint(run)["epoch"] == 1 and not (run / "model.safetensors").exists()
    assert "--format safetensors` writes the file once there is room" in capsys.readouterr().err


def test_a_pt2_export_onto_a_real_full_disk_is_one_line_not_an_abort(small_run, tmp_path, mounts):
    """Real: a 2 MB tmpfs. torch's zip writer, writing there itself, aborted the process (exit 134,
    a C++ exception in its destructor); the program is saved to memory and written by fastft."""
    disk = small_disk(tmp_path / "small", 2, mounts)
    out = disk / "m.pt2"
    cmd = ["-m", "fastft", "export", "--checkpoint", str(small_run), "--format", "pt2", "--out", str(out),
           "--no-check"]
    result = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert ONE_LINE.fullmatch(result.stderr) and "disk full" in result.stderr
    assert list(disk.iterdir()) == []
