"""`fastft export`: a run's model as ONNX, a torch.export program or safetensors weights, checked
before it is kept.

    fastft export --checkpoint RUN_DIR --format onnx          # RUN_DIR/model.onnx (+ .json)
    fastft export --checkpoint RUN_DIR --format pt2 --out m.pt2
    fastft export --checkpoint RUN_DIR --format safetensors   # RUN_DIR/model.safetensors
    fastft predict --model RUN_DIR/model.onnx IMAGE...        # from the exported file alone

--out ends in the format's suffix (predict --model reads the format from it) and never names
one of a run's own files (RUN_FILES), here or in another run's folder; the one exception is
the run's own model.safetensors, which `--format safetensors` writes: a run writes that file
with its last checkpoint only, so a run stopped before its last epoch has none until then.

ONNX goes through `torch.onnx.export(dynamo=True)`, the torch.export-based exporter: it is
torch's default since 2.9, while the TorchScript one (dynamo=False) warns that it is deprecated.
The weights are kept inside the one .onnx file (external_data=False; ResNet-18's 45 MB and
ViT-B/16's 344 MB are under protobuf's 2 GB limit), so the file travels alone. pt2 is
`torch.export.export` + `torch.export.save`. Both take the batch axis as dynamic (any N >= 1)
and the image size as fixed (the run's --image-size). Any --model exports: the model is the
plain torchvision or timm one the run's checkpoint names (predict.trained_model).

The check: the exported file, run as `predict --model` runs it (ONNX Runtime, or the program
torch.export.load gives back), must give the PyTorch model's logits to within TOLERANCE, at
batch sizes 1 and N (the dynamic axis at work). Only then is the file moved into place, next to
its sidecar (PATH.json: the model's name, classes, its preprocessing as Preprocessing.to_dict()
under `preprocessing` and as flat keys, the input layout). safetensors holds the same in its
metadata and needs no sidecar; its check loads the file into a fresh plain library model of
that name, which must give the run's logits exactly (the same weights through the same code on
the same CPU: tolerance 0). The inputs, through the model's own eval transform:
--images if given, else up to CHECK_IMAGES of the run's test split (config.json names the data
folder); where neither is at hand (a run exported on another machine), random inputs, which
the report and the sidecar name as such.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastft.checkpoint import CHECKPOINT_NAME
from fastft.data import SYNTHETIC
from fastft.data.images import load_rgb
from fastft.errors import ConfigError, DataError, FastftError, WriteError, missing_package
from fastft.models.base import Preprocessing
from fastft.predict import (ORT_HINT, check_images, exported_logits, flat_reason, model_transform, sidecar_path,
                            trained_model)
from fastft.report import write_json_atomic
from fastft.rundir import RUN_FILES  # what a run folder holds: export's --out names none of them
from fastft.safe_write import check_writable, failure, remove_quietly, write_bytes_atomic
from fastft.weights import exportable_state, import_safetensors, model_card, model_of, write_model_file

FORMATS = ("onnx", "pt2", "safetensors")  # each file's suffix is .FORMAT
ONNX_HINT = "pip install onnx onnxscript (or pip install 'fastft[onnx]')"
CHECK_IMAGES = 8  # test images the check runs: batches of 1 and of all of them
# Max |logit difference| allowed, relative to max(1, max |logit|). Both sides are fp32 (eps 1.2e-7)
# and differ in summation order only: the exporter folds BatchNorm into the convolutions and ONNX
# Runtime has its own conv, matmul and LayerNorm kernels. Measured on a trained run (synthetic set, all 800 test images
# at 48 px, 200 at 224 px): ONNX within 9.3e-7 of max |logit| (6.2e-6 absolute), pt2 identical.
# Faults measured on the same model: train-mode BatchNorm 2.1, one BN variance 1% off 0.17, the
# head's weights rounded to fp16 0.16. 1e-4 sits ~100x above rounding and ~1000x below a fault.
TOLERANCE = 1e-4
EXACT = ("safetensors",)  # formats whose check allows no difference at all
RANDOM_SEED = 0


class ExportError(FastftError):
    """An export that failed, or whose output does not match the PyTorch model's."""


@dataclass
class Exported:
    path: Path
    sidecar: Path | None  # None: safetensors, whose metadata holds the sidecar's content
    fmt: str
    image_size: int  # px
    model: str  # the --model name
    export_s: float
    checked: dict | None  # inputs, batch_sizes, max_abs_diff, bound, runtime, check_s; None: --no-check

    def lines(self) -> list[str]:
        size = self.image_size
        what = "weights for inputs" if self.fmt == "safetensors" else "input"
        out = [f"exported {self.path} ({self.fmt}, {self.model} {what} N x 3 x {size} x {size}, N dynamic) "
               f"in {self.export_s:.1f} s"]
        c = self.checked
        if c is None:
            out.append("not checked (--no-check): nothing compared its logits with PyTorch's")
        else:
            out.append(f"checked with {c['runtime']} on {c['inputs']}, batches of {c['batch_sizes'][0]} and "
                       f"{c['batch_sizes'][1]}: max abs logit difference {c['max_abs_diff']:.1e} from PyTorch "
                       f"(tolerance {c['bound']:.1e}) in {c['check_s']:.1f} s")
        out.append(f"preprocessing and classes: {self.sidecar or 'in its metadata (no sidecar)'}")
        return out


def export_run(checkpoint: Path, fmt: str, out: Path | None = None, images: list[Path] | None = None,
               check: bool = True) -> Exported:
    """Export the run at `checkpoint` (RUN_DIR or its checkpoint.pt) to `out` (default
    RUN_DIR/model.FMT), check it, then write its sidecar (none for safetensors).

    Raises ConfigError (a package missing: onnx/onnxscript to export ONNX, onnxruntime to check
    it; an --out that output_path refuses, before anything is written), WeightsError
    (safetensors missing), WriteError (the folder cannot be written, or fills), CheckpointError,
    DataError (a bad --images file) and ExportError (the export failed, or its logits differ from
    PyTorch's by more than the tolerance: then no file is left at `out`).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    _check_packages(fmt, check)
    model, state = trained_model(checkpoint)
    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    path = output_path(run_dir, fmt, out)  # a folder that cannot be written: said before any export
    name, prep = model_of(state)
    image_size = prep.image_size
    card = model_card(list(state["classes"]), state["epoch"], name, prep)
    x, inputs = check_inputs(run_dir, state, prep, images)
    tmp = path.with_name(f"{path.stem}.tmp.{fmt}")  # torch.export.save warns about any other suffix
    started = time.perf_counter()
    try:
        _export(model, x[:2], tmp, fmt, card)
        export_s = time.perf_counter() - started
        checked = parity(model, x, tmp, fmt, inputs) if check else None
        os.replace(tmp, path)
    except Exception as exc:  # a full disk or read-only folder: one line naming `path`, not the .tmp
        written = failure(path, exc.__cause__ if isinstance(exc, WriteError) else exc,
                          sum(t.nbytes for t in model.state_dict().values()))
        if written is None:
            raise
        raise written from exc
    finally:
        remove_quietly(tmp)
    if fmt == "safetensors":
        return Exported(path, None, fmt, image_size, name, export_s, checked)
    sidecar = sidecar_path(path)
    write_json_atomic(sidecar, {"format": fmt, "file": path.name, "model": name, **card,
                                "preprocessing": prep.to_dict(), "input_name": "x",
                                "output": "logits (N, num_classes) float32; softmax gives probabilities",
                                "batch": "dynamic, N >= 1", "checked": checked,
                                "exported_with": f"torch {torch.__version__}"})
    return Exported(path, sidecar, fmt, image_size, name, export_s, checked)


def _check_packages(fmt: str, check: bool) -> None:
    """Missing packages stop the command before any work, each with its install line."""
    if fmt == "safetensors":
        import_safetensors("--format safetensors")
    if fmt != "onnx":
        return
    try:
        import onnx  # noqa: F401  torch.onnx.export writes through both
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--format onnx needs {missing_package(exc, 'the onnx and onnxscript packages')}: "
                          f"{ONNX_HINT}") from exc
    if check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"checking the ONNX export needs ONNX Runtime: {ORT_HINT}; "
                              f"or pass --no-check to export without the check") from exc


def output_path(run_dir: Path, fmt: str, out: Path | None) -> Path:
    """The file to write: --out (a folder: FOLDER/model.FMT), else RUN_DIR/model.FMT.

    A one-line ConfigError, before anything is written, when it does not end in .FMT (predict
    --model takes the format from the suffix), its folder is missing, or it names one of
    RUN_FILES in a run's folder (the exported run's, or any holding a checkpoint or metrics):
    the run's own model.safetensors, --format safetensors' default, is the one file allowed.
    A one-line WriteError where the folder cannot be written (read-only, not permitted).
    """
    default = run_dir / f"model.{fmt}"
    path = Path(out) if out is not None else default
    if path.is_dir():
        path = path / default.name
    if path.suffix.lower() != f".{fmt}":
        raise ConfigError(f"--out {path}: --format {fmt} writes a .{fmt} file, so --out must end in .{fmt}")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: folder {path.parent} does not exist")
    check_writable(path.parent, f"--out {path}")
    in_a_run = path.parent.resolve() == run_dir.resolve() or any(
        (path.parent / name).is_file() for name in (CHECKPOINT_NAME, "metrics.jsonl"))
    if path.name in RUN_FILES and in_a_run and path.resolve() != default.resolve():
        raise ConfigError(f"--out {path}: would overwrite the {path.name} of the run in {path.parent}; "
                          f"choose another name")
    return path


def check_inputs(run_dir: Path, state: dict, prep: Preprocessing, images: list[Path] | None
                 ) -> tuple[torch.Tensor, str]:
    """(x, what x is): (N, 3, S, S) fp32 through the model's eval transform (predict's
    model_transform of `prep`; S = prep.image_size), N >= 2.

    --images first (every one, a bad file is a DataError), else up to CHECK_IMAGES of the
    run's test split spread over its classes, else CHECK_IMAGES random N(0, 1) inputs."""
    if images:
        check_images(images)
        paths, inputs = list(images), f"{len(images)} image{'s' if len(images) > 1 else ''} given with --images"
    else:
        paths, inputs = run_test_images(run_dir, state)
    if not paths:
        generator = torch.Generator().manual_seed(RANDOM_SEED)
        x = torch.randn(CHECK_IMAGES, 3, prep.image_size, prep.image_size, generator=generator)
        return x, f"{CHECK_IMAGES} random inputs, not images ({inputs}; pass --images to check on real ones)"
    transform = model_transform(prep)
    x = torch.stack([transform(load_rgb(p)) for p in paths])
    return (x.repeat(2, 1, 1, 1) if len(x) == 1 else x), inputs


def run_test_images(run_dir: Path, state: dict) -> tuple[list[Path], str]:
    """Up to CHECK_IMAGES test images of the run's data folder, evenly spaced over the split
    (classes are listed in order, so both ends are covered), and where they came from; or
    ([], why there are none). The folder is read from RUN_DIR/config.json (`resolved.data_dir`,
    which names the synthetic set's folder too), else the checkpoint's --data."""
    from fastft.data.layout import scan_dataset
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    folder = (config.get("resolved") or {}).get("data_dir") or ""
    typed = state["config"].get("data") or ""
    folder = folder or (typed if typed != SYNTHETIC else "")  # --data DIR, where config.json is gone
    if not folder:
        return [], "the run records no data folder"
    if not (Path(folder) / "test").is_dir():
        return [], f"the run's data folder {folder} is not here"
    try:
        files = scan_dataset(Path(folder), skip_bad=True).files["test"]
    except DataError as exc:
        return [], f"the run's data folder cannot be read: {exc.one_line()}"
    if not files:
        return [], f"{folder}/test holds no readable image"
    step = max(1, len(files) // CHECK_IMAGES)
    picked = [path for path, _ in files[::step][:CHECK_IMAGES]]
    return picked, f"{len(picked)} test image{'s' if len(picked) > 1 else ''} of {folder}"


def _export(model: torch.nn.Module, sample: torch.Tensor, path: Path, fmt: str, card: dict) -> None:
    """Write `model` (fp32, CPU, eval) to `path`, traced on `sample` with the batch axis dynamic;
    safetensors: its state_dict, `card` as the metadata. A write that fails (a full disk, a read-only
    folder) is raised as it came, for export_run to name the file in one line; any other failure of
    the exporter is an ExportError."""
    if fmt == "safetensors":
        write_model_file(path, exportable_state(model), card)
        return
    # By position: forward's first argument is `x` in torchvision, not in every timm model.
    batch = ({0: torch.export.Dim("batch", min=1)},)
    try:
        with torch.no_grad():
            if fmt == "onnx":
                torch.onnx.export(model, (sample,), str(path), dynamo=True, dynamic_shapes=batch,
                                  input_names=["x"], output_names=["logits"], external_data=False, verbose=False)
            else:
                # Saved to memory, then written by us: torch's zip writer aborts the whole process
                # (a C++ exception in its destructor) when the disk fills under it.
                buffer = io.BytesIO()
                torch.export.save(torch.export.export(model, (sample,), dynamic_shapes=batch), buffer)
                write_bytes_atomic(path, buffer.getvalue())
    except Exception as exc:  # the exporters raise their own types; a model they cannot trace gets here
        if failure(path, exc) is not None:  # a full disk, a read-only folder: said by export_run
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{fmt} export failed ({type(exc).__name__}: {reason})") from exc


def parity(model: torch.nn.Module, x: torch.Tensor, path: Path, fmt: str, inputs: str) -> dict:
    """Run the exported file on x[:1] and on all of x, as `predict --model` would, against the
    PyTorch model. Returns the figures; raises ExportError beyond TOLERANCE."""
    started = time.perf_counter()
    run, runtime = exported_logits(path, fmt)
    tolerance = 0.0 if fmt in EXACT else TOLERANCE
    worst, bound = 0.0, 0.0
    for batch in (x[:1], x):
        with torch.no_grad():
            want = model(batch).float()
        try:
            got = run(batch)
        except Exception as exc:  # the runtime's own error types
            raise ExportError(f"{fmt} export fails on a batch of {len(batch)} ({flat_reason(exc)}); "
                              f"the file was not kept") from exc
        if got.shape != want.shape:
            raise ExportError(f"{fmt} export gives logits of shape {tuple(got.shape)} for a batch of "
                              f"{len(batch)}, PyTorch {tuple(want.shape)}")
        worst = max(worst, float((got - want).abs().max()))
        bound = max(bound, tolerance * max(1.0, float(want.abs().max())))
    if worst > bound:
        raise ExportError(f"{fmt} export differs from PyTorch by up to {worst:.2e} in the logits on {inputs} "
                          f"(tolerance {bound:.1e}); the file was not kept")
    return {"runtime": runtime, "inputs": inputs, "batch_sizes": [1, len(x)], "max_abs_diff": worst,
            "bound": bound, "tolerance": f"{tolerance:g} x max(1, max |logit|)",
            "check_s": time.perf_counter() - started}
