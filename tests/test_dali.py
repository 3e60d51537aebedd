"""The DALI backend on DALI's CPU operators: layout, parity with torchvision, shards, errors, resume."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

pytest.importorskip("nvidia.dali")

from fastft.data import build_loaders  # noqa: E402
from fastft.data.dali_cache import plan_cache  # noqa: E402
from fastft.data.dali_loader import DaliLoaders, _as_data_error  # noqa: E402
from fastft.data.images import decode_problem, load_rgb  # noqa: E402
from fastft.data.layout import scan_dataset  # noqa: E402
from fastft.data.synth import write_synthetic  # noqa: E402
from fastft.data.torch_loader import TorchLoaders  # noqa: E402
from fastft.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform  # noqa: E402
from fastft.engine import train  # noqa: E402
from fastft.errors import ConfigError, DataError  # noqa: E402
from fastft.runtime import Runtime  # noqa: E402

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def runtime(amp=None, rank=0, world=1, channels_last=True) -> Runtime:
    return Runtime(device=torch.device("cpu"), amp_dtype=amp, compile=False, channels_last=channels_last,
                   workers=1, rank=rank, world_size=world)


def dali(root, size=32, batch=8, rt=None, seed=0, layout=None) -> DaliLoaders:
    return DaliLoaders(layout or scan_dataset(root), size, batch, rt or runtime(), seed)


def epoch(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


def levels(x: torch.Tensor) -> torch.Tensor:
    """Normalised NCHW values back in 8-bit grey levels."""
    return x.float() * STD * 255 + MEAN * 255


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """10 train, 13 test: neither divides over 4 shards."""
    return write_synthetic(tmp_path_factory.mktemp("odd") / "d", n_train=10, n_test=13, seed=0, progress=False)


# --- 1. shape, dtype, layout, label order -----------------------------------------------------
@pytest.mark.parametrize("amp, channels_last", [(None, True), (torch.bfloat16, True), (torch.float16, False)])
def test_batches_come_in_the_training_shape_dtype_layout_and_label_order(tiny_data, amp, channels_last):
    loaders = dali(tiny_data, rt=runtime(amp, channels_last=channels_last))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    train_batches = epoch(loaders.train_batches(0))
    assert len(train_batches) == loaders.steps_per_epoch() == 3
    test_batches = loaders.test_batches()
    assert len(test_batches) == 2
    for x, y in train_batches + epoch(test_batches):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == (amp or torch.float32) and x.device.type == "cpu"
        assert x.is_contiguous(memory_format=fmt) and y.dtype == torch.int64 and y.shape == x.shape[:1]
    assert all(x.shape[0] == 8 for x, _ in train_batches)
    reference = TorchLoaders(scan_dataset(tiny_data), 32, 8, workers=0, seed=0)
    assert loaders.classes == reference.classes
    dali_labels = torch.cat([y for _, y in loaders.test_batches()])
    assert dali_labels.tolist() == torch.cat([y for _, y in reference.test_batches()]).tolist()


# --- 2. the test pipeline is torchvision's eval transform ----------------------------------------
@pytest.mark.parametrize("size", [32, 224])  # 32: resize 37, an odd margin for the centre crop
def test_test_pipeline_matches_torchvision_eval_transform(tiny_data, size):
    layout = scan_dataset(tiny_data)
    got = torch.cat([x for x, _ in dali(tiny_data, size=size, layout=layout).test_batches()])
    transform = eval_transform(size)
    want = torch.stack([transform(load_rgb(path)) for path, _ in layout.files["test"]])
    diff = (levels(got) - levels(want)).abs()
    # Measured: max 1.00 level, mean 0.06 (32 px) to 0.16 (224 px) levels. Both decoders are
    # libjpeg-turbo; the resamplers (DALI linear+antialias, PIL bilinear) round their uint8
    # output differently now and then, by one level. A one-pixel shift or another filter
    # would move edges by tens of levels.
    assert diff.max() <= 1.01 and diff.mean() <= 0.3


# --- 3. random resized crops follow torchvision's distribution -----------------------------------
def coordinate_dataset(root: Path, n: int, width: int = 240, height: int = 160) -> Path:
    """Lossless images whose red level is the column and green level the row."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    for split, count in (("train", n), ("test", 1)):
        (root / split / "grid").mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rgb).save(root / split / "grid" / f"{i:03d}.png")
    return root


def crop_box(x: torch.Tensor) -> tuple[float, float, bool]:
    """Crop width and height in source pixels, and whether it was flipped, from one output
    image: interpolation keeps a linear ramp linear, so the slope of the red (green) level
    across the inner half of the output is crop width (height) / output size."""
    size = x.shape[-1]
    inner = slice(size // 4, 3 * size // 4)
    steps = np.arange(size)[inner]
    dx = np.polyfit(steps, x[0, inner, inner].mean(0).numpy(), 1)[0]
    dy = np.polyfit(steps, x[1, inner, inner].mean(1).numpy(), 1)[0]
    return abs(dx) * size, dy * size, dx < 0


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda s: np.searchsorted(np.sort(s), grid, side="right") / len(s)
    return float(np.abs(cdf(a) - cdf(b)).max())


def test_train_crops_match_random_resized_crop_statistics(tmp_path):
    width, height, size = 240, 160, 48
    loaders = dali(coordinate_dataset(tmp_path / "grid", 64), size=size, batch=32, seed=1)
    images = torch.cat([levels(x) for e in range(8) for x, _ in loaders.train_batches(e)])
    boxes = [crop_box(image) for image in images]
    w, h, flipped = map(np.array, zip(*boxes))
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    ref = np.array([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])[2:]
                    for _ in range(4000)], dtype=float)
    area, ref_area = w * h / (width * height), ref[:, 0] * ref[:, 1] / (width * height)
    aspect, ref_aspect = np.log(w / h), np.log(ref[:, 1] / ref[:, 0])
    # 512 DALI draws vs 4000: a KS distance of 0.09 has p = 0.001 under equal distributions;
    # the slope estimate adds well under 1% of error. Measured: 0.027 (area), 0.026 (aspect);
    # means 0.396 vs 0.392 and 0.034 vs 0.031. Fixed seeds make the test repeatable.
    assert ks(area, ref_area) < 0.1 and ks(aspect, ref_aspect) < 0.1
    assert abs(area.mean() - ref_area.mean()) < 0.03 and abs(aspect.mean() - ref_aspect.mean()) < 0.03
    assert 0.4 < flipped.mean() < 0.6  # p = 0.5: 512 draws have sd 0.022


# --- 4. shards ------------------------------------------------------------------------------
def test_sharded_evaluation_sees_every_test_image_exactly_once(odd_data):
    single = torch.cat([x for x, _ in dali(odd_data, batch=2).test_batches()])
    assert len(single) == 13
    for world in (1, 2, 4):
        seen = []
        for rank in range(world):
            batches = dali(odd_data, batch=2, rt=runtime(rank=rank, world=world)).test_batches()
            xs = [x for x, _ in batches]
            assert len(xs) == len(batches)
            seen += list(torch.cat(xs))
        matches = sorted(i for x in seen for i in range(13) if torch.equal(x, single[i]))
        assert matches == list(range(13)), f"{world} shards"


def test_train_shards_take_the_same_fixed_shape_steps(odd_data):
    steps = set()
    for rank in range(4):  # 10 images pad to 12: 3 per shard, one step of 2, one image dropped
        loaders = dali(odd_data, batch=2, rt=runtime(rank=rank, world=4))
        batches = epoch(loaders.train_batches(0))
        steps.add(len(batches))
        assert len(batches) == loaders.steps_per_epoch() and all(len(y) == 2 for _, y in batches)
    assert steps == {1}
    # 3 images per process, less than a batch of 4: one step of the whole shard, every rank.
    for rank in range(4):
        batches = epoch(dali(odd_data, batch=4, rt=runtime(rank=rank, world=4)).train_batches(0))
        assert [len(y) for _, y in batches] == [3]


# --- 5. corrupt files -----------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def scramble(path: Path) -> None:
    """Header and end marker intact, entropy-coded data replaced by noise."""
    body = bytearray(path.read_bytes())
    body[600:-2] = np.random.default_rng(0).integers(0, 256, len(body) - 602, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(body))


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "copy"))


@pytest.mark.parametrize("spoil", [truncate, scramble])
def test_a_file_dali_cannot_decode_is_named_in_one_line(data_copy, spoil):
    layout = scan_dataset(data_copy)  # sound when scanned; spoiled before DALI reads it
    bad = sorted((data_copy / "test" / "hotdog").iterdir())[2]
    spoil(bad)
    with pytest.raises(DataError) as caught:
        epoch(dali(data_copy, layout=layout).test_batches())
    assert str(caught.value) == f"{bad}: {decode_problem(bad)}"  # the reason data check gives


def test_skip_bad_drops_and_counts_bad_files(data_copy):
    bad = sorted((data_copy / "train" / "not-hotdog").iterdir())[0]
    truncate(bad)
    with pytest.raises(DataError, match=str(bad)):
        scan_dataset(data_copy)
    layout = scan_dataset(data_copy, skip_bad=True)
    assert [path for path, _ in layout.dropped] == [bad] and len(layout.files["train"]) == 23
    loaders = dali(data_copy, layout=layout)
    assert loaders.train_size == 23 and sum(len(y) for _, y in loaders.train_batches(0)) == 16


# --- resume, buffers, cache plan, backend choice ----------------------------------------------
def test_a_restored_loader_reproduces_the_next_epoch(tiny_data):
    straight = dali(tiny_data, seed=3)
    first, second = epoch(straight.train_batches(0)), epoch(straight.train_batches(1))
    stopped = dali(tiny_data, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, epoch(stopped.train_batches(0))))
    epoch(stopped.test_batches())
    resumed = dali(tiny_data, seed=3)
    resumed.load_state_dict(stopped.state_dict())
    again = epoch(resumed.train_batches(1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(second, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, second)), "epochs must differ"
    with pytest.warns(UserWarning, match="uninterrupted"):
        dali(tiny_data, seed=3).train_batches(1)


def test_batches_kept_past_a_step_stay_intact(tiny_data):
    loaders = dali(tiny_data)
    kept = [(x, x.clone()) for e in range(2) for x, _ in loaders.train_batches(e)]
    assert all(torch.equal(x, copy) for x, copy in kept)


def test_decode_cache_plan(tiny_data):
    files = [path for path, _ in scan_dataset(tiny_data).files["train"]]
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object; CUDA is never touched
    assert plan_cache("on", cpu, files, files).mb == 0
    assert "CPU decoder has no cache" in plan_cache("auto", cpu, files, files).reason
    assert plan_cache("off", gpu, files, files, free_mb=1e6).decoder_args() == {}
    assert plan_cache("auto", gpu, files, files, free_mb=0.1).mb == 0
    fits = plan_cache("auto", gpu, files, files, free_mb=1e6)
    assert fits.mb > 0 and fits.reason.startswith("on")
    # auto: the size depends on the files alone, so loaders planned later in a process agree.
    assert plan_cache("auto", gpu, files, files, free_mb=1e5) == plan_cache("auto", gpu, files, files, free_mb=1e6)
    capped = plan_cache("on", gpu, files, files, free_mb=0.1)
    assert "capped" in capped.reason and capped.mb == 1  # half of 0.1 MB, rounded up


def test_train_and_test_decoders_get_identical_cache_arguments(tiny_data):
    """DALI keeps one decoder cache per device and process and refuses a second pipeline that asks
    for other cache arguments, so the train and test decoders must ask for the same one."""
    layout = scan_dataset(tiny_data)
    gpu = torch.device("cuda", 0)  # only named: building the arguments touches no CUDA
    plan = plan_cache("auto", gpu, [p for p, _ in layout.files["train"]], [p for p, _ in layout.files["test"]],
                      free_mb=1e6)
    rt = Runtime(device=gpu, amp_dtype=torch.bfloat16, compile=False, channels_last=True, workers=1)
    loaders = DaliLoaders(layout, 32, 8, rt, seed=0, cache=plan)
    train, test = loaders._common("train")["decoder"], loaders._common("test")["decoder"]
    assert train == test and train["device"] == "mixed"
    assert train["cache_size"] == plan.mb > 0 and train["cache_type"] == "threshold"


CACHE_ERROR = """Critical error in pipeline:
Error in MIXED operator `nvidia.dali.fn.decoders.image`,
which was used in the pipeline definition with the following traceback:
encountered:

Assert on "instance.params == params" failed: Cache for device 0 was already initialized with other parameters"""


def test_only_decode_failures_become_file_errors(tiny_data):
    paths = [str(p) for p, _ in scan_dataset(tiny_data).files["test"]]
    assert _as_data_error(RuntimeError(CACHE_ERROR), paths) is None  # re-raised as DALI wrote it
    assert _as_data_error(RuntimeError("CUDA error: out of memory"), paths) is None
    named = _as_data_error(RuntimeError(CACHE_ERROR.split("Assert")[0] +
                                        f"Failed to decode sample #3 : {paths[0]}"), paths)
    assert isinstance(named, DataError) and str(named) == f"{paths[0]}: cannot decode image (DALI decoder failed)"
    unnamed = _as_data_error(RuntimeError(CACHE_ERROR.split("Assert")[0] + "nvImageCodec failure: '#3'"),
                             paths)  # every file decodes with PIL: DALI alone cannot
    assert isinstance(unnamed, DataError) and "PIL decodes" in str(unnamed)


def test_build_loaders_picks_dali_when_it_imports(make_cfg, tiny_data):
    layout = scan_dataset(tiny_data)
    # auto prefers the cached loader where the decoded set fits; a 1 KB budget leaves DALI.
    assert build_loaders(make_cfg(loader="auto", cache_gb=1e-6), layout, runtime()).name == "dali"
    assert build_loaders(make_cfg(loader="torch"), layout, runtime()).name == "torch"
    with pytest.raises(ConfigError, match="does not divide"):
        build_loaders(make_cfg(loader="dali", batch_size=9), layout, runtime(world=2))


# --- 6. end to end --------------------------------------------------------------------------
def test_train_end_to_end_with_the_dali_loader(make_cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. the loader's out-of-order epoch warning
        summary = train(make_cfg(loader="dali", epochs=2))
    assert summary["loader"] == "dali" and summary["test_examples"] == 12
    assert math.isfinite(summary["train_loss"])


def test_names_that_are_not_utf8_reach_dali_through_links_with_the_same_pixels(tiny_data, tmp_path):
    """A POSIX name is any bytes; DALI's reader takes UTF-8 names only. Such a file (a JPEG as it is,
    and a lossless JPEG that also needs a copy) is read through the cache folder, pixels unchanged."""
    import os
    from jpeg_codings import lossless_jpeg
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    train_hotdog = root / "train" / "hotdog"
    first = sorted(train_hotdog.iterdir())[0]
    latin1 = Path(os.fsdecode(os.fsencode(train_hotdog) + b"/latin1-\xe9.jpg"))
    first.rename(latin1)
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    lossless = Path(os.fsdecode(os.fsencode(train_hotdog) + b"/lossless-\xff.jpg"))
    lossless.write_bytes(lossless_jpeg(grey))
    layout = scan_dataset(root)
    cache = tmp_path / "cache"
    files = dict(layout.dali_files("train", cache))
    by_original = dict(zip((p for p, _ in layout.files["train"]), (p for p, _ in layout.dali_files("train", cache))))
    assert os.path.realpath(by_original[latin1]) == os.path.realpath(latin1)  # a link: the file's own bytes
    assert by_original[lossless].suffix == ".png"                             # a copy, named by its key
    assert all(os.fspath(p).encode("utf-8") for p in files)
    got = torch.cat([x for x, _ in dali(root, layout=layout).train_eval_batches()])
    transform = eval_transform(32)
    want = torch.stack([transform(load_rgb(path)) for path, _ in layout.files["train"]])
    assert (levels(got) - levels(want)).abs().max() <= 1.01  # as the eval pipeline's test above
