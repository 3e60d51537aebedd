"""The cached loader's crop boxes follow torchvision's RandomResizedCrop.get_params and are
a pure function of (seed, epoch, image index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from fastft.data.crops import RATIO, SCALE, draw_boxes, uniforms

N = 4000  # draws per distribution; two-sample KS critical value at alpha = 0.001 is 0.044


def torchvision_boxes(height: int, width: int, n: int) -> np.ndarray:
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    return np.array([T.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(n)])


def our_boxes(height: int, width: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return draw_boxes(seed, 3, np.arange(n), np.full(n, height), np.full(n, width))


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
    return float(np.abs(cdf(a) - cdf(b)).max())


def features(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T.astype(np.float64)
    return {"scale": h * w / (height * width), "log_aspect": np.log(w / h),
            "top": (top + 0.5) / (height - h + 1), "left": (left + 0.5) / (width - w + 1)}


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (64, 48)])
def test_box_distribution_matches_get_params(height, width):
    ours, flips = our_boxes(height, width, N)
    theirs = torchvision_boxes(height, width, N)
    mine, ref = features(ours, height, width), features(theirs, height, width)
    gaps = {name: ks(mine[name], ref[name]) for name in mine}
    assert max(gaps.values()) < 0.05, gaps
    assert abs(flips.mean() - 0.5) < 0.03
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()


@pytest.mark.parametrize("height,width,centre", [(100, 400, [0, 133, 100, 133]), (400, 100, [133, 0, 133, 100])])
def test_fallback_frequency_matches_for_elongated_images(height, width, centre):
    """A 4:1 image fits a try about 1 time in 5, so about 1 box in 10 is the centre fallback
    (the full short side, the long side at aspect 4/3, centred)."""
    rate = lambda boxes: float((boxes == centre).all(axis=1).mean())
    ours, theirs = rate(our_boxes(height, width, N)[0]), rate(torchvision_boxes(height, width, N))
    assert 0.05 < theirs < 0.2
    assert abs(ours - theirs) < 0.03, (ours, theirs)


@pytest.mark.parametrize("height,width", [(10, 1000), (1000, 10), (3, 200), (1, 1)])
def test_when_no_try_can_fit_the_box_is_exactly_get_params_fallback(height, width):
    boxes, _ = our_boxes(height, width, 50)
    if (height, width) == (1, 1):  # every try that fits is the whole pixel, as is the fallback
        assert (boxes == [0, 0, 1, 1]).all()
        return
    expected = T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(SCALE), list(RATIO))
    assert (boxes == list(expected)).all(), (boxes[:3], expected)


def test_boxes_are_a_function_of_seed_epoch_and_index_only():
    heights, widths = np.arange(40, 104, 2), np.arange(90, 26, -2)
    boxes, flips = draw_boxes(7, 2, np.arange(32), heights, widths)
    again, again_flips = draw_boxes(7, 2, np.arange(32), heights, widths)
    assert (boxes == again).all() and (flips == again_flips).all()
    picked = np.array([30, 3, 17, 3, 0])  # another batch, another order, a repeat
    sub, sub_flips = draw_boxes(7, 2, picked, heights[picked], widths[picked])
    assert (sub == boxes[picked]).all() and (sub_flips == flips[picked]).all()
    assert not (draw_boxes(7, 3, np.arange(32), heights, widths)[0] == boxes).all(axis=1).any()
    assert not (draw_boxes(8, 2, np.arange(32), heights, widths)[0] == boxes).all(axis=1).any()


def test_uniform_streams_are_uniform_and_uncorrelated_across_neighbouring_images():
    u = uniforms(0, 0, np.arange(20000), 2)
    assert ks(u[:, 0], np.linspace(0, 1, 20000, endpoint=False)) < 0.02
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03  # image i against image i + 1
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03      # two draws of one image
    assert ((u >= 0) & (u < 1)).all()
