"""What a new user met on the command line after issue 19's first round: an --out that is a dangling
link, `plot --out` given a folder or a .jpg name, help that leaves things out, and an error that
named argparse's internal `data_cmd`. Each is one line (or the right file), never a traceback."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest

from fastft.cli import main
from fastft.config import TrainConfig
from fastft.errors import WriteError
from fastft.rundir import choose_run_dir

needs_matplotlib = pytest.mark.skipif(find_spec("matplotlib") is None, reason="needs matplotlib")


def test_an_out_that_is_a_file_or_a_dangling_link_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(WriteError) as caught:
        choose_run_dir(TrainConfig(out=str(tmp_path / "notes.txt")))
    assert str(caught.value) == (f"--out {tmp_path / 'notes.txt'}: cannot write there: {tmp_path / 'notes.txt'} "
                                 f"is a file, not a folder; choose another folder")
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone")  # mkdir(exist_ok=True) raised FileExistsError here
    for out in (link, link / "frozen"):
        with pytest.raises(WriteError) as caught:
            choose_run_dir(TrainConfig(out=str(out)))
        assert str(caught.value) == (f"--out {out}: cannot write there: {link} is a symbolic link to "
                                     f"{tmp_path / 'gone'}, which does not exist; choose another folder")


def _run(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"strategy": "frozen"}))
    records = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5, "test_acc": 0.6} for e in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@needs_matplotlib
def test_plot_writes_the_format_its_out_names_and_into_a_folder(tmp_path, capsys):
    run = _run(tmp_path / "run")
    folder = tmp_path / "figures"
    folder.mkdir()
    assert main(["plot", str(run), "--out", str(folder)]) == 0  # was IsADirectoryError
    assert (folder / "runs-curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert capsys.readouterr().out == f"wrote {folder / 'runs-curves.png'}: frozen\n"
    for name, signature in (("p.jpg", b"\xff\xd8\xff"), ("p.pdf", b"%PDF"), ("p.PNG", b"\x89PNG")):
        assert main(["plot", str(run), "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes().startswith(signature), name  # p.jpg held PNG bytes
    capsys.readouterr()
    for name, why in (("p.xyz", "matplotlib writes no .xyz images"), ("p", "no suffix to name the image format")):
        assert main(["plot", str(run), "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastft: error: --out {tmp_path / name}: {why}; name a .png file (or ")
        assert err.count("\n") == 1 and ".jpg" in err and not (tmp_path / name).exists()


def test_help_and_usage_errors_say_what_they_mean(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "141 stdout closed early (| head)" in " ".join(capsys.readouterr().out.split())
    for command, words in (("download", "folder to hold the dataset"), ("check", "the dataset: DIR/train")):
        with pytest.raises(SystemExit):
            main(["data", command, "--help"])
        assert words in " ".join(capsys.readouterr().out.split()), command
    with pytest.raises(SystemExit) as caught:
        main(["data"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "data_cmd" not in err
    assert err.endswith("error: the following arguments are required: {synth,download,check}\n")
