"""The Triton kernel behind resized_crop_normalize_triton; imported only when it runs.

One program makes one TILE_Y x TILE_X tile of one sample's output: grid (B, tiles down, tiles
across), so one launch covers the batch whatever the mix of image sizes. Per output pixel it
computes torch's antialiased bilinear taps (bicubic or nearest: the FILTER constexpr) for its row
and its column (see resized_crop.py), loops over them in while loops with runtime bounds (any
downscale works: the loop count is the tile's widest filter, not a compiled-in cap), reads uint8
RGB straight from the packed buffer, and writes the flipped, normalised value NHWC in the output's
dtype.

The kernels use only triton.language builtins, never the jit functions of its standard library
(tl.max, tl.zeros, ...): those are decorated when triton is imported, so in a process that imported
triton before setting TRITON_INTERPRET=1 (a test process: torchvision imports triton) they stay
compiled and cannot run under the interpreter. Our own @triton.jit functions are decorated when
this module is imported, so the tests (re)import it with TRITON_INTERPRET=1 set.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError("the Triton kernel needs triton: pip install triton "
                      "(CPU installs use resized_crop_normalize_reference instead)") from err


@triton.jit
def _axis(start, length, out_pos, size, FILTER: tl.constexpr):
    """Taps of one axis for output positions out_pos (int32 vector): torch's aa rule.

    FILTER: 0 bilinear (half-width 1), 1 bicubic (half-width 2), 2 nearest (one tap, floor(centre)).
    Returns (lo, centre, first, stop, n, invscale): taps are crop pixels j in [first, stop),
    source pixel lo + j, weight filter((j - centre + 0.5) * invscale).
    """
    lo = tl.floor(start)
    n = (tl.ceil(start + length) - lo).to(tl.int32)  # crop pixels the filter may read
    scale = length / size
    stretch = tl.maximum(scale, 1.0)  # the filter widens when shrinking (antialiasing)
    invscale = 1.0 / stretch
    centre = (start - lo) + scale * (out_pos.to(tl.float32) + 0.5)
    if FILTER == 2:
        # One tap; its triangle weight is >= 0.5, so normalising makes it 1.
        first = tl.minimum(tl.floor(centre).to(tl.int32), n - 1)
        stop = first + 1
    else:
        support = stretch * (2.0 if FILTER == 1 else 1.0)
        first = tl.maximum(tl.floor(centre - support + 0.5), 0.0).to(tl.int32)
        stop = tl.minimum(tl.floor(centre + support + 0.5).to(tl.int32), n)
    return lo.to(tl.int32), centre, first, stop, n, invscale


@triton.jit
def _larger(a, b):
    """Combine function of a max-reduction (tl.reduce)."""
    return tl.maximum(a, b)


@triton.jit
def _resized_crop_kernel(data_ptr, offsets_ptr, heights_ptr, widths_ptr, index_ptr, boxes_ptr,
                         flip_ptr, out_ptr, size, scale0, scale1, scale2, shift0, shift1, shift2,
                         TILE_Y: tl.constexpr, TILE_X: tl.constexpr, FILTER: tl.constexpr):
    b = tl.program_id(0)
    image = tl.load(index_ptr + b)
    base = tl.load(offsets_ptr + image)  # int64 byte offset of the image
    height = tl.load(heights_ptr + image)
    width = tl.load(widths_ptr + image)
    top = tl.load(boxes_ptr + b * 4 + 0)
    left = tl.load(boxes_ptr + b * 4 + 1)
    crop_h = tl.load(boxes_ptr + b * 4 + 2)
    crop_w = tl.load(boxes_ptr + b * 4 + 3)
    mirror = tl.load(flip_ptr + b) != 0

    oy = tl.program_id(1) * TILE_Y + tl.arange(0, TILE_Y)
    ox = tl.program_id(2) * TILE_X + tl.arange(0, TILE_X)
    ry = tl.minimum(oy, size - 1)  # rows/columns past the edge compute a copy, never stored
    rx = tl.minimum(ox, size - 1)
    rx = tl.where(mirror, size - 1 - rx, rx)  # a flipped output column reads the mirrored one
    lo_y, cy, fy, sy, ny, iy = _axis(top, crop_h, ry, size, FILTER)
    lo_x, cx, fx, sx, nx, ix = _axis(left, crop_w, rx, size, FILTER)
    taps_y = tl.reduce(sy - fy, 0, _larger)  # the tile's widest filter: the loops' runtime bound
    taps_x = tl.reduce(sx - fx, 0, _larger)
    # while, not `for k in range(taps)`: the interpreter of triton <= 3.7 turns a tensor bound into
    # an int with int(one-element array), which numpy >= 2.5 refuses; `k < taps` is a comparison it
    # evaluates with bool(), which numpy allows. Compiled, both give the same PTX for sm_90 (triton
    # 3.6 and 3.8: the same instructions, one mov reordered) and the same 64 registers.

    # Weights w(j) = filter(t), t = |j - centre + 0.5| * invscale, for j < stop, else 0: the
    # triangle max(1 - t, 0) (bilinear; nearest's one tap) or Keys' cubic with a = -0.5 (bicubic,
    # torch's and PIL's). Inlined: a nested jit call costs milliseconds under the interpreter.
    # Columns' sum once, rows' sum in the row loop; the product of both normalises at the end.
    wsum_x = tl.full([TILE_X], 0.0, tl.float32)
    kx = 0
    while kx < taps_x:
        jx = fx + kx
        t = tl.abs((jx.to(tl.float32) - cx + 0.5) * ix)
        wx = tl.maximum(1.0 - t, 0.0)
        if FILTER == 1:
            wx = tl.where(t < 1.0, (1.5 * t - 2.5) * t * t + 1.0,
                          tl.where(t < 2.0, ((2.5 - 0.5 * t) * t - 4.0) * t + 2.0, 0.0))
        wsum_x += tl.where(jx < sx, wx, 0.0)
        kx += 1
    wsum_y = tl.full([TILE_Y], 0.0, tl.float32)
    acc_r = tl.full([TILE_Y, TILE_X], 0.0, tl.float32)
    acc_g = tl.full([TILE_Y, TILE_X], 0.0, tl.float32)
    acc_b = tl.full([TILE_Y, TILE_X], 0.0, tl.float32)
    ky = 0
    while ky < taps_y:
        jy = fy + ky
        t = tl.abs((jy.to(tl.float32) - cy + 0.5) * iy)
        wy = tl.maximum(1.0 - t, 0.0)
        if FILTER == 1:
            wy = tl.where(t < 1.0, (1.5 * t - 2.5) * t * t + 1.0,
                          tl.where(t < 2.0, ((2.5 - 0.5 * t) * t - 4.0) * t + 2.0, 0.0))
        wy = tl.where(jy < sy, wy, 0.0)
        wsum_y += wy
        # Clamped into the crop and the image: unused taps (weight 0) still read a valid byte.
        row = tl.minimum(tl.maximum(lo_y + tl.minimum(jy, ny - 1), 0), height - 1)
        row_base = base + row.to(tl.int64) * width * 3
        if FILTER == 1:  # bicubic: this row's horizontal pass first, normalised and clamped (PIL's)
            h_r = tl.full([TILE_Y, TILE_X], 0.0, tl.float32)
            h_g = tl.full([TILE_Y, TILE_X], 0.0, tl.float32)
            h_b = tl.full([TILE_Y, TILE_X], 0.0, tl.float32)
        kx = 0
        while kx < taps_x:
            jx = fx + kx
            t = tl.abs((jx.to(tl.float32) - cx + 0.5) * ix)
            wx = tl.maximum(1.0 - t, 0.0)
            if FILTER == 1:
                wx = tl.where(t < 1.0, (1.5 * t - 2.5) * t * t + 1.0,
                              tl.where(t < 2.0, ((2.5 - 0.5 * t) * t - 4.0) * t + 2.0, 0.0))
            wx = tl.where(jx < sx, wx, 0.0)
            col = tl.minimum(tl.maximum(lo_x + tl.minimum(jx, nx - 1), 0), width - 1)
            ptr = data_ptr + row_base[:, None] + (col * 3)[None, :]
            if FILTER == 1:
                h_r += wx[None, :] * tl.load(ptr + 0).to(tl.float32)
                h_g += wx[None, :] * tl.load(ptr + 1).to(tl.float32)
                h_b += wx[None, :] * tl.load(ptr + 2).to(tl.float32)
            else:
                w = wy[:, None] * wx[None, :]
                acc_r += w * tl.load(ptr + 0).to(tl.float32)
                acc_g += w * tl.load(ptr + 1).to(tl.float32)
                acc_b += w * tl.load(ptr + 2).to(tl.float32)
            kx += 1
        if FILTER == 1:
            inv_x = (1.0 / wsum_x)[None, :]
            acc_r += wy[:, None] * tl.minimum(tl.maximum(h_r * inv_x, 0.0), 255.0)
            acc_g += wy[:, None] * tl.minimum(tl.maximum(h_g * inv_x, 0.0), 255.0)
            acc_b += wy[:, None] * tl.minimum(tl.maximum(h_b * inv_x, 0.0), 255.0)
        ky += 1

    if FILTER == 1:  # the columns' weights were normalised per row already
        norm = 1.0 / wsum_y[:, None]
    else:
        norm = 1.0 / (wsum_y[:, None] * wsum_x[None, :])
    acc_r *= norm
    acc_g *= norm
    acc_b *= norm
    if FILTER == 1:  # negative lobes can leave 0-255: clamp, as PIL and torchvision's uint8 do
        acc_r = tl.minimum(tl.maximum(acc_r, 0.0), 255.0)
        acc_g = tl.minimum(tl.maximum(acc_g, 0.0), 255.0)
        acc_b = tl.minimum(tl.maximum(acc_b, 0.0), 255.0)
    out = out_ptr + ((b * size + oy[:, None]).to(tl.int64) * size + ox[None, :]) * 3
    mask = (oy[:, None] < size) & (ox[None, :] < size)
    dtype = out_ptr.dtype.element_ty
    tl.store(out + 0, (acc_r * scale0 + shift0).to(dtype), mask=mask)
    tl.store(out + 1, (acc_g * scale1 + shift1).to(dtype), mask=mask)
    tl.store(out + 2, (acc_b * scale2 + shift2).to(dtype), mask=mask)


_FILTERS = {"bilinear": 0, "bicubic": 1, "nearest": 2}  # the kernel's FILTER constexpr


def _tiles(size: int, on_gpu: bool) -> tuple[int, int]:
    """(TILE_Y, TILE_X). GPU: 8 x 32 = 256 pixels a program, 32 along a row for coalesced stores.
    CPU (the interpreter, tests only): one program a sample, since each program costs Python time."""
    if on_gpu:
        return 8, 32
    side = triton.next_power_of_2(min(size, 64))
    return side, side


def launch(images, index: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
           mean, std, out: torch.Tensor, interpolation: str = "bilinear") -> None:
    """Fill out (B, 3, S, S), NHWC-contiguous, in one launch. All tensors on one device.
    interpolation: "bilinear", "bicubic" or "nearest" (checked by the caller)."""
    tensors = (images.data, images.offsets, images.heights, images.widths, index, boxes, flip, out)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    batch = index.shape[0]
    if batch == 0:
        return
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    tile_y, tile_x = _tiles(size, out.is_cuda)
    grid = (batch, triton.cdiv(size, tile_y), triton.cdiv(size, tile_x))
    # The kernel indexes every 1-D input as contiguous; slices of a bigger table are copied here.
    _resized_crop_kernel[grid](images.data, images.offsets.contiguous(), images.heights.contiguous(),
                               images.widths.contiguous(),
                               index.contiguous(), boxes.contiguous(), flip.contiguous().view(torch.uint8),
                               out, size,
                               *scale, *shift, TILE_Y=tile_y, TILE_X=tile_x,
                               FILTER=_FILTERS[interpolation])
