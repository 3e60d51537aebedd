"""JPEG streams in codings Pillow cannot write, built byte by byte (ITU-T T.81), for the tests:
lossless (SOF3, predictor 1, every pixel exact) and sequential DCT at any sample precision
(SOF1 12-bit: blocks of one flat level each, so a decoder that takes them must return exactly
those levels, and the stream is valid, not corrupt).

Differences are coded with 5-bit codes for their categories (bit lengths): 17 of them, 0..16, in
the lossless table, 16 in a DCT's DC table (libjpeg refuses a DC symbol over 15); no code is all
ones, as T.81 C requires.
"""

from __future__ import annotations

import struct

import numpy as np

_LOSSLESS_CATEGORIES = 17  # differences of up to 16 bits
_DC_CATEGORIES = 16        # DC differences of up to 15 bits


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def _dht(table_class: int, ident: int, counts: dict[int, int], symbols: bytes) -> bytes:
    bits = bytes(counts.get(n, 0) for n in range(1, 17))
    return _segment(0xFFC4, bytes([table_class << 4 | ident]) + bits + symbols)


class _Bits:
    """Entropy-coded bytes: MSB first, 0xFF stuffed with 0x00, the last byte padded with ones."""

    def __init__(self):
        self.out, self.acc, self.n = bytearray(), 0, 0

    def put(self, value: int, length: int) -> None:
        for shift in range(length - 1, -1, -1):
            self.acc, self.n = self.acc << 1 | (value >> shift) & 1, self.n + 1
            if self.n == 8:
                self.out += b"\xff\x00" if self.acc == 0xFF else bytes([self.acc])
                self.acc, self.n = 0, 0

    def difference(self, diff: int) -> None:
        """A DC or lossless difference: its category's 5-bit code, then its extra bits."""
        category = abs(diff).bit_length()
        self.put(category, 5)
        if category:
            self.put(diff if diff >= 0 else diff + (1 << category) - 1, category)

    def flush(self) -> bytes:
        if self.n:
            self.put((1 << (8 - self.n)) - 1, 8 - self.n)
        return bytes(self.out)


def _frame(marker: int, precision: int, height: int, width: int, components: int) -> bytes:
    spec = b"".join(bytes([c + 1, 0x11, 0]) for c in range(components))
    return _segment(marker, struct.pack(">BHHB", precision, height, width, components) + spec)


def _scan(components: int, ss: int, se: int) -> bytes:
    spec = b"".join(bytes([c + 1, 0x00]) for c in range(components))
    return _segment(0xFFDA, bytes([components]) + spec + bytes([ss, se, 0]))


def lossless_jpeg(pixels: np.ndarray) -> bytes:
    """SOF3 lossless JPEG, 8-bit, predictor 1 (left), of uint8 (H, W) or (H, W, 3) `pixels`."""
    a = pixels.reshape(*pixels.shape[:2], -1).astype(np.int32)
    height, width, components = a.shape
    bits = _Bits()
    for y in range(height):
        for x in range(width):
            for c in range(components):
                if x:
                    predicted = a[y, x - 1, c]
                else:
                    predicted = a[y - 1, 0, c] if y else 128  # 2^(P - 1) starts the scan
                bits.difference(int(a[y, x, c] - predicted))
    return (b"\xff\xd8" + _dht(0, 0, {5: _LOSSLESS_CATEGORIES}, bytes(range(_LOSSLESS_CATEGORIES)))
            + _frame(0xFFC3, 8, height, width, components) + _scan(components, 1, 0)
            + bits.flush() + b"\xff\xd9")


def flat_block_jpeg(levels: np.ndarray, precision: int) -> bytes:
    """Sequential DCT grayscale JPEG whose 8x8 block (i, j) is the flat level levels[i, j]
    (0 .. 2^precision - 1): SOF0 at 8 bits, SOF1 (extended) at 12. A flat block is its DC
    coefficient alone, 8 (level - 2^(P-1)); quantised by 8, the level minus the offset."""
    rows, cols = levels.shape
    offset = 1 << (precision - 1)
    quant = bytes([0]) + bytes([8] + [1] * 63)  # table 0, 8-bit entries
    bits, previous = _Bits(), 0
    for level in levels.astype(np.int64).ravel().tolist():
        bits.difference(level - offset - previous)
        previous = level - offset
        bits.put(0, 1)  # AC: end of block at once (symbol 0x00, code 0)
    marker = 0xFFC0 if precision == 8 else 0xFFC1
    return (b"\xff\xd8" + _segment(0xFFDB, quant)
            + _dht(0, 0, {5: _DC_CATEGORIES}, bytes(range(_DC_CATEGORIES))) + _dht(1, 0, {1: 1}, b"\x00")
            + _frame(marker, precision, 8 * rows, 8 * cols, 1) + _scan(1, 0, 63)
            + bits.flush() + b"\xff\xd9")
