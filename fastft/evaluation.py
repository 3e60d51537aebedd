"""`fastft eval`: how a trained run does on a split, and which images it gets most wrong.

    fastft eval --checkpoint runs/frozen                       # the run's data, test split, CPU
    fastft eval --checkpoint runs/frozen --data DIR --split train --loader dali --top 32
    fastft eval --checkpoint runs/frozen/model.safetensors --data photos/   # photos/CLASS/*.jpg

The numbers are scikit-learn's (sklearn.metrics.classification_report and confusion_matrix):
- confusion[i, j]: images of true class i predicted as class j (rows true, columns predicted);
- precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN) (the
  harmonic mean of the two), support = images of the class; where a denominator is 0 the value
  is 0.0, as sklearn's zero_division=0;
- accuracy = correct / images; macro averages are unweighted means over the classes that occur
  among the true or the predicted labels, as classification_report averages when not given
  `labels` (a run class with no image in the data and never predicted stays out of them).

The model is a run folder, its checkpoint.pt, or its model.safetensors (whose metadata holds
the classes, image size and epoch; the data comes from config.json beside it, or --data); see
fastft.eval_inputs for both. Only the split being scored is read: DIR/SPLIT, or DIR itself
where it is one split's class folders (it holds neither train/ nor test/ and names at least one
run class; --split is then not used). Classes are the run's (from the model source): the
split's class folders are matched to them by name, so the split may lack a run class (a
warning) but not bring one the run never learnt (a DataError).

The model is the plain torchvision or timm model the run names (`model` in its checkpoint's
config, `arch` in model.safetensors' metadata; ResNet-18 for a run from before --model), and
pixels take that model's eval transform (its Preprocessing: resize and interpolation, crop,
mean and std, as the run recorded them) through the backend `--loader` names (torch, dali,
cached): the backends' own test pipelines, so the numbers are those the run's evaluation computed. Each backend reads the split in the scan's file order in a single process
(torch: a strided shard of one; DALI: an unshuffled reader, one shard; cached: files[0::1]),
which is how every probability is paired with its file; the labels the backend returns are
checked against that order.

A new eval into a folder replaces all of an earlier eval's files there (EVAL_FILES; one not
written this time is removed, so no earlier mistakes.png stays beside new numbers), says so,
and touches no other file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastft.data.images import shown_path
from fastft.data.layout import DatasetLayout
from fastft.errors import ConfigError
from fastft.eval_inputs import dataset_folder, load_source, split_layout
from fastft.run_faults import out_of_memory_is_one_line
from fastft.safe_write import check_writable, failure, replacing
from fastft.weights import model_of

EVAL_LOADERS = ("torch", "dali", "cached")
SPLITS = ("test", "train")
EVAL_FILES = ("eval.json", "confusion.png", "mistakes.png")  # eval's own files in --out; no other is touched
PLOT_HINT = "confusion.png and mistakes.png need matplotlib: pip install matplotlib (or pip install 'fastft[plot]')"
DPI = 100                  # pixels per inch of both figures (curves.new_figure's too)
CONFUSION_IN = (2.5, 0.8)  # inches: margin for labels, then per class (the figure is square)
SHEET_COLUMNS = 4          # images per row of mistakes.png
SHEET_CELL_IN = (2.0, 2.5)  # inches per image: width, height (image, file name, true / predicted)


@dataclass(frozen=True)
class EvalOptions:
    checkpoint: Path            # a run folder, its checkpoint.pt or its model.safetensors
    data: str | None = None     # DIR or "synthetic"; None = the run's own --data
    split: str = "test"         # test | train (both through the eval transform); unused where DIR is a split
    top: int = 16               # most confident mistakes to list and draw
    loader: str = "torch"       # torch | dali | cached
    device: str = "cpu"
    batch_size: int = 64        # images per forward pass
    out: Path | None = None     # folder for eval.json and the PNGs; None = RUN_DIR/eval-SPLIT
    progress: bool = True       # a progress bar on a terminal (tqdm's disable=None)


@dataclass(frozen=True)
class Scores:
    """Per-class numbers in the run's class order; see the module docstring for definitions."""
    confusion: list[list[int]]  # K x K counts, rows true, columns predicted
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    accuracy: float
    correct: int
    macro: dict[str, float]     # precision, recall, f1
    macro_classes: list[int]    # the class indices the macro average is over


@dataclass(frozen=True)
class Mistake:
    path: Path
    true: int           # class index (run order)
    predicted: int
    probability: float  # softmax probability of the predicted class


@dataclass(frozen=True)
class Evaluation:
    classes: list[str]
    paths: list[Path]       # every image of the split, in the order evaluated
    labels: torch.Tensor    # int64 (N,), true class indices
    probs: torch.Tensor     # float32 (N, K), softmax over the run's classes
    scores: Scores
    mistakes: list[Mistake]  # the `top` most confident, most confident first
    header: str             # what was evaluated: run, epoch, data, split, loader, device
    warnings: list[str]
    meta: dict              # the same as eval.json's plain keys: checkpoint, epoch, data, split, ...


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, k: int) -> torch.Tensor:
    """int64 (k, k): [i, j] counts images of true class i predicted j (sklearn's convention)."""
    return torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0  # sklearn's zero_division=0


def scores(confusion: torch.Tensor) -> Scores:
    """Accuracy, per-class precision, recall, F1 and support, and their macro averages, from a
    (K, K) confusion matrix; definitions and the zero-division rule in the module docstring."""
    cm = confusion.tolist()
    k = len(cm)
    tp = [cm[i][i] for i in range(k)]
    true = [sum(row) for row in cm]                          # TP + FN: the support
    pred = [sum(cm[i][j] for i in range(k)) for j in range(k)]  # TP + FP
    precision = [_ratio(tp[c], pred[c]) for c in range(k)]
    recall = [_ratio(tp[c], true[c]) for c in range(k)]
    f1 = [_ratio(2 * tp[c], true[c] + pred[c]) for c in range(k)]  # 2TP + FP + FN = true + pred
    present = [c for c in range(k) if true[c] or pred[c]]
    macro = {name: _ratio(sum(values[c] for c in present), len(present))
             for name, values in (("precision", precision), ("recall", recall), ("f1", f1))}
    total = sum(true)
    return Scores(cm, precision, recall, f1, true, _ratio(sum(tp), total), sum(tp), macro, present)


def top_mistakes(paths: list[Path], labels: torch.Tensor, probs: torch.Tensor, top: int) -> list[Mistake]:
    """The `top` wrong answers with the highest predicted probability; ties keep file order."""
    best, predicted = probs.max(dim=1)
    wrong = (predicted != labels).nonzero().flatten().tolist()
    wrong.sort(key=lambda i: -float(best[i]))  # stable: equal probabilities stay in file order
    return [Mistake(paths[i], int(labels[i]), int(predicted[i]), float(best[i])) for i in wrong[:top]]


def _check_options(opts: EvalOptions) -> None:
    checks = [(opts.top >= 0, f"--top must be 0 or more, got {opts.top}"),
              (opts.batch_size >= 1, f"--batch-size must be at least 1, got {opts.batch_size}"),
              (opts.split in SPLITS, f"--split must be one of {SPLITS}, got {opts.split!r}"),
              (opts.loader in EVAL_LOADERS, f"--loader must be one of {EVAL_LOADERS}, got {opts.loader!r}")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _runtime(device: str):
    from fastft.runtime import Runtime, default_workers, pick_device
    target = pick_device(device)
    # fp32 and NCHW: the honest numbers, whatever precision the run trained in.
    return Runtime(device=target, amp_dtype=None, compile=False, channels_last=False,
                   workers=default_workers(target))


def make_loaders(kind: str, layout: DatasetLayout, prep, batch: int, rt, progress: bool):
    """The `kind` backend over `layout` (from run_layout) on rt's device, its eval transform the
    model's Preprocessing `prep` at prep.image_size; only its test_batches() is read. Raises
    ConfigError where DALI does not import or the cached set does not fit."""
    image_size = prep.image_size
    if kind == "dali":
        from fastft.data import dali_available
        if not dali_available():
            raise ConfigError("--loader dali: nvidia.dali does not import here; "
                              "pip install nvidia-dali-cuda120, or use --loader torch")
        from fastft.data.dali_loader import DaliLoaders
        return DaliLoaders(layout, image_size, batch, rt, seed=0, decode_cache="off", preprocessing=prep)
    if kind == "cached":
        from fastft.data.cached_loader import CachedLoaders, plan_cache
        plan = plan_cache(layout, image_size, rt)
        return CachedLoaders(layout, image_size, batch, rt, 0, plan=plan, progress=progress, preprocessing=prep)
    from fastft.data.torch_loader import TorchLoaders
    # fp32 batches normalised in the loader, as the chapter: on a CPU the cached loader's exactly.
    return TorchLoaders(layout, image_size, batch, rt.workers, 0, rt=rt,
                        pin_memory=rt.device.type == "cuda", uint8=False, preprocessing=prep)


def load_model(state: dict, device: torch.device) -> torch.nn.Module:
    """The run's model (weights.model_of: the one its config or card names) in eval mode on
    `device` (the state is already on the CPU); a CheckpointError (one line) where the weights
    are not that model's of len(classes) classes."""
    from fastft.predict import load_plain
    return load_plain(state, state["source"]).to(device)


@torch.no_grad()
def probabilities(model: torch.nn.Module, loaders, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 (N, K) softmax, int64 (N,) labels) on the CPU, over loaders.test_batches()."""
    batches = loaders.test_batches()
    probs, labels = [], []
    for x, y in tqdm(batches, total=len(batches), desc="eval", unit="batch", leave=False,
                     disable=None if progress else True, dynamic_ncols=True):
        x, y = loaders.to_device(x, y)
        # NCHW whatever the backend's layout (cached keeps channels_last): the same conv kernels,
        # so equal pixels give equal probabilities.
        x = x.contiguous()
        probs.append(torch.softmax(model(x).float(), dim=1).cpu())
        labels.append(y.cpu())
    return torch.cat(probs), torch.cat(labels)


def evaluate(opts: EvalOptions) -> Evaluation:
    """Run the model over a split and score it. Raises CheckpointError, WeightsError, DataError
    and ConfigError (one line each) for a missing model, a bad data folder or bad options, and
    ResourceError for a --batch-size that does not fit in memory."""
    _check_options(opts)
    source = Path(opts.checkpoint)
    state = {**load_source(source, opts.data is not None), "source": source}
    classes, config = list(state["classes"]), state["config"]
    name, prep = model_of(state)  # an unknown model name fails here, before any data work
    folder = dataset_folder(opts.data, config)
    layout, warnings, split = split_layout(folder, opts.split, classes)
    rt = _runtime(opts.device)
    size = prep.image_size
    loaders = make_loaders(opts.loader, layout, prep, opts.batch_size, rt, opts.progress)
    with out_of_memory_is_one_line(opts.batch_size, size, rt.device):  # names the --batch-size that fits
        probs, labels = probabilities(load_model(state, rt.device), loaders, opts.progress)
    paths = [path for path, _ in layout.files["test"]]
    expected = torch.tensor([label for _, label in layout.files["test"]], dtype=torch.int64)
    if not torch.equal(labels, expected):  # the order every prediction is paired with its file by
        raise RuntimeError(f"the {opts.loader} loader returned the split in another order than its file list")
    cm = confusion_matrix(labels, probs.argmax(dim=1), len(classes))
    meta = {"checkpoint": os.fspath(source), "epoch": state["epoch"], "data": os.fspath(folder),
            "split": split, "loader": opts.loader, "device": str(rt.device), "image_size": size,
            "model": name, "preprocessing": prep.to_dict()}
    where = f"{shown_path(folder)} {split}" if split else f"{shown_path(folder)} (its class folders)"
    header = (f"eval {shown_path(source)} ({name}, epoch {state['epoch']}, {config.get('strategy')}, {size} px) "
              f"on {where}: {len(paths)} images, loader {opts.loader}, {rt.device}")
    return Evaluation(classes, paths, labels, probs, scores(cm), top_mistakes(paths, labels, probs, opts.top),
                      header, warnings, meta)


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    """Rows as aligned text columns; columns in `right` align right."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                      for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def report_lines(ev: Evaluation) -> list[str]:
    """The printed report: header, accuracy, per-class table, confusion matrix, top mistakes."""
    s, names = ev.scores, ev.classes
    lines = [ev.header, f"accuracy {s.accuracy:.3f} ({s.correct} of {sum(s.support)})", ""]
    rows = [["class", "precision", "recall", "f1", "support"]]
    rows += [[n, f"{s.precision[c]:.3f}", f"{s.recall[c]:.3f}", f"{s.f1[c]:.3f}", str(s.support[c])]
             for c, n in enumerate(names)]
    m = s.macro
    rows.append(["macro avg", f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
                 str(sum(s.support[c] for c in s.macro_classes))])
    lines += _table(rows, {1, 2, 3, 4})
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    lines += _table([["", *names]] + [[n, *map(str, s.confusion[c])] for c, n in enumerate(names)],
                    set(range(1, len(names) + 1)))
    if ev.mistakes:
        lines += ["", f"{len(ev.mistakes)} most confident mistakes"]
        lines += _table([["prob", "true", "predicted", "path"]] +
                        [[f"{m.probability:.3f}", names[m.true], names[m.predicted], shown_path(m.path)]
                         for m in ev.mistakes], {0})
    return lines


def as_json(ev: Evaluation) -> dict:
    """Everything eval.json holds: what was evaluated (Evaluation.meta, as plain keys), the
    report's numbers and every image's prediction."""
    s, names = ev.scores, ev.classes
    best, predicted = ev.probs.max(dim=1)
    return {
        **ev.meta, "header": ev.header, "classes": names, "images": len(ev.paths), "accuracy": s.accuracy,
        "correct": s.correct, "confusion": s.confusion, "confusion_axes": "rows true, columns predicted",
        "per_class": [{"class": n, "precision": s.precision[c], "recall": s.recall[c], "f1": s.f1[c],
                       "support": s.support[c]} for c, n in enumerate(names)],
        "macro": {**s.macro, "classes": [names[c] for c in s.macro_classes]},
        "mistakes": [{"path": os.fspath(m.path), "true": names[m.true], "predicted": names[m.predicted],
                      "probability": m.probability} for m in ev.mistakes],
        "predictions": [{"path": os.fspath(p), "true": names[t], "predicted": names[q], "probability": b}
                        for p, t, q, b in zip(ev.paths, ev.labels.tolist(), predicted.tolist(), best.tolist())],
        "warnings": ev.warnings,
    }


def _figure_maker():
    """curves.new_figure (a matplotlib Figure on the file-only Agg canvas, no pyplot: a caller's
    backend and figures stay as they are), or None where matplotlib is missing."""
    from fastft.curves import MatplotlibMissing, new_figure
    try:
        import matplotlib  # noqa: F401  (the package itself, not only submodules a run imported)
        new_figure((1.0, 1.0))
    except (ImportError, MatplotlibMissing):
        return None
    return new_figure


def plot_confusion(new_figure, ev: Evaluation, path: Path) -> None:
    """confusion.png: counts in the cells, class names on the axes, rows true (as sklearn's
    ConfusionMatrixDisplay); (margin + per class x K) inches square at DPI."""
    cm, names, k = ev.scores.confusion, ev.classes, len(ev.classes)
    side = CONFUSION_IN[0] + CONFUSION_IN[1] * k
    fig = new_figure((side, side))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues", vmin=0)
    top = max(max(row) for row in cm)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i][j]), ha="center", va="center",
                    color="white" if cm[i][j] > top / 2 else "black")
    ax.set_xticks(range(k), names, rotation=30, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    s = ev.scores
    ax.set_title(f"accuracy {s.accuracy:.3f} ({s.correct} of {sum(s.support)})")
    fig.tight_layout()
    with replacing(path) as tmp:  # a failed write keeps no half PNG
        fig.savefig(tmp, dpi=DPI, format="png")


def plot_mistakes(new_figure, ev: Evaluation, path: Path) -> None:
    """mistakes.png: each mistake's image (aspect kept), its file name above, true and predicted
    class with the probability below; SHEET_COLUMNS per row, SHEET_CELL_IN inches each at DPI."""
    from fastft.data.images import load_rgb
    n = len(ev.mistakes)
    cols = min(n, SHEET_COLUMNS)
    rows = math.ceil(n / cols)
    fig = new_figure((SHEET_CELL_IN[0] * cols, SHEET_CELL_IN[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, m in zip(axes.flat, ev.mistakes):
        image = load_rgb(m.path)
        image.thumbnail((256, 256))  # enough for a 2-inch cell at DPI; keeps memory small
        ax.set_axis_on()
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(m.path.name[-24:], fontsize=8)
        ax.set_xlabel(f"true: {ev.classes[m.true]}\npred: {ev.classes[m.predicted]} {m.probability:.3f}",
                      fontsize=9)
    fig.tight_layout()
    with replacing(path) as tmp:  # a failed write keeps no half PNG
        fig.savefig(tmp, dpi=DPI, format="png")


def default_out(checkpoint: Path, split: str) -> Path:
    """RUN_DIR/eval-SPLIT, RUN_DIR being the checkpoint's folder when a file is given."""
    run_dir = checkpoint.parent if checkpoint.is_file() else checkpoint
    return run_dir / f"eval-{split}"


def check_out(out: Path) -> None:
    """Raise a one-line ConfigError, before any work, where `out` cannot be eval's folder: it or
    the nearest folder above it that exists is a file, or one of EVAL_FILES in it is not a file;
    a one-line WriteError where it cannot be written (a read-only file system, no permission)."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == out else f"is inside the file {shown_path(folder)}"
                raise ConfigError(f"--out {shown_path(out)} {what}; eval writes {', '.join(EVAL_FILES)} into a folder")
            break
    for name in EVAL_FILES:
        if (out / name).exists() and not (out / name).is_file():
            raise ConfigError(f"--out {shown_path(out)}: {name} there is not a file, so eval cannot replace it")
    check_writable(out, f"--out {shown_path(out)}")  # a read-only folder: said before the model loads


def _remove_earlier(out: Path) -> tuple[list[str], str]:
    """Remove an earlier eval's files from `out`: their names, and the header of its eval.json
    (what it scored; "" where that does not say)."""
    found = [name for name in EVAL_FILES if (out / name).is_file()]
    try:
        header = json.loads((out / "eval.json").read_text()).get("header", "")
    except (OSError, ValueError, AttributeError):  # absent, cut short, not an object
        header = ""
    for name in found:
        (out / name).unlink()
    return found, " ".join(str(header).split())  # one line whatever the file held


def save(ev: Evaluation, out: Path) -> list[str]:
    """Write eval.json, confusion.png and (with mistakes) mistakes.png into `out`, replacing
    every file of an earlier eval there (EVAL_FILES) and no other; eval.json last, so PNGs
    beside an eval.json are its own. Returns the lines saying what was replaced and written,
    or how to get the PNGs where matplotlib is missing. Raises WriteError (one line) where
    the folder cannot be written or the disk fills."""
    from fastft.report import write_json_atomic
    new_figure = _figure_maker()
    written = ["eval.json"]
    try:
        out.mkdir(parents=True, exist_ok=True)
        earlier, header = _remove_earlier(out)
        if new_figure is not None:
            plot_confusion(new_figure, ev, out / "confusion.png")
            written.append("confusion.png")
            if ev.mistakes:
                plot_mistakes(new_figure, ev, out / "mistakes.png")
                written.append("mistakes.png")
        write_json_atomic(out / "eval.json", as_json(ev))
    except OSError as exc:  # a full disk, a folder that turned read-only: one line, as every writer
        raise failure(Path(exc.filename or out), exc) from exc
    lines = [f"wrote {', '.join(written)} to {shown_path(out)}"]
    if earlier:
        gone = [name for name in earlier if name not in written]
        what = f" ({header})" if header else ""
        lines.insert(0, f"replaced the earlier results in {shown_path(out)}{what}: {', '.join(earlier)}"
                        + (f"; {', '.join(gone)} removed, not written this time" if gone else ""))
    return lines if new_figure is not None else [*lines, PLOT_HINT]


def run(opts: EvalOptions, say=print, warn=print) -> Evaluation:
    """`fastft eval`: check the folder for the files (opts.out, default_out when None), evaluate,
    write the files, and hand each warning line to `warn`, then each report line to `say`."""
    out = opts.out or default_out(Path(opts.checkpoint), opts.split)
    check_out(out)
    ev = evaluate(opts)
    for line in ev.warnings:
        warn(line)
    for line in [*report_lines(ev), "", *save(ev, out)]:
        say(line)
    return ev
