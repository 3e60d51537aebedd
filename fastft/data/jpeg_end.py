"""JPEGs that lack only their end marker (EOI): every pixel is in the file, the last two bytes are
not (a copy or download stopped just short, an encoder that never wrote them).

libjpeg has decoded every block of such a file before it looks for the marker, yet Pillow stops
with "image file is truncated", torchvision with "Image is incomplete or truncated" and DALI with
"Premature end of JPEG data". Given the bytes with EOI appended, each reads the pixels the
complete file has. A file cut short inside its scan data reads too with EOI appended (libjpeg
fills what is missing with grey), so appending is right only where nothing else is missing, and
neither libjpeg nor Pillow says which. `completed` decides it from the file:

1. Its markers: the scans present cover every colour component, and in a progressive JPEG every
   coefficient of every component down to full precision (ITU-T T.81 G.1.1: a scan codes
   coefficients Ss..Se of its components at successive-approximation bit Al; the one with Al = 0
   is the last for those coefficients). Otherwise a scan is missing after the last one present.
2. The last scan's data: the file decodes to the same pixels whatever bytes stand between its
   end and the appended EOI (_FILLERS). Where the data is whole the decoder never reads them
   (libjpeg skips bytes before a marker); where any is missing it decodes them as the missing
   data, and different fillers give different pixels.

Checked on every cut position of baseline 4:2:0, 4:4:4, grey, black and progressive files
(tests/test_missing_eoi.py): only the file without its last two bytes is taken.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

from PIL import Image

EOI = b"\xff\xd9"
_SOI = b"\xff\xd8"
# Markers without a length field (T.81 B.1.1.3): TEM and RST0-7.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
# Start-of-frame markers (T.81 table B.1), less DHT (C4), JPG (C8) and DAC (CC).
_FRAMES = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_SOS = 0xDA
# Put between the file's end and EOI: none holds 0xFF, so none forms a marker, and their bit
# patterns differ (all zeros, alternating, all ones but one bit, a fixed pseudo-random run of
# 0x00-0xFE), so missing data decoded from each differs.
_FILLERS = (b"\x00" * 96, b"\x55" * 96, b"\xaa" * 96, b"\x7f" * 96, b"\xfe" * 96,
            bytes((i * 167 + 13) % 255 for i in range(256)))


@dataclass(frozen=True)
class _Scan:
    """One SOS header: the components it codes and its coefficient band and precision."""
    components: tuple[int, ...]
    start: int  # Ss: first coefficient (0 = DC); a lossless scan's predictor
    end: int    # Se: last coefficient
    low: int    # Al: the bit this scan codes down to; 0 = full precision


def completed(path: str | os.PathLike[str]) -> bytes | None:
    """The bytes of the JPEG at `path` with EOI appended, when it lacks only its end marker;
    None for any other file (one that has EOI, one cut short anywhere else, not a JPEG, one that
    cannot be read: the checks say why). Reads the whole file and decodes it len(_FILLERS) + 1
    times, so callers ask only of a JPEG that failed to decode or has no EOI at its end."""
    try:
        with open(path, "rb") as f:
            data = f.read(2)
            if data != _SOI:
                return None
            data += f.read()
    except OSError:
        return None
    if data.endswith(EOI):
        return None
    if data.endswith(b"\xff"):  # the first half of EOI: no scan data ends in a lone 0xFF
        data = data[:-1]
    walked = _walk(data)
    if walked is None or not _covered(*walked):
        return None
    whole = data + EOI
    try:
        reference = _pixels(whole)
        if any(_pixels(data + filler + EOI) != reference for filler in _FILLERS):
            return None
    except Exception:  # a header or table cut short: Pillow raises many types
        return None
    return whole


def _pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.tobytes()


def _walk(data: bytes) -> tuple[tuple[int, ...], int, list[_Scan]] | None:
    """(the frame's component ids, its SOF marker, its scans) from the marker segments of `data`,
    which has no EOI; None where its markers break or an EOI comes before its end."""
    components, frame, scans, at = (), 0, [], 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        kind = data[at + 1]
        if kind in (0xFF, *_STANDALONE):  # a fill byte (T.81 B.1.1.2), or a marker with no length
            at += 1 if kind == 0xFF else 2
            continue
        if kind in (0xD8, 0xD9):
            return None
        length = int.from_bytes(data[at + 2: at + 4], "big")
        body = data[at + 4: at + 2 + length]
        if length < 2 or len(body) < length - 2:
            return None
        at += 2 + length
        if kind in _FRAMES and len(body) >= 6:
            components, frame = tuple(body[6: 6 + 3 * body[5]: 3]), kind
        elif kind == _SOS:
            scan = _scan(body)
            if scan is None:
                return None
            scans.append(scan)
            at = _scan_end(data, at)
    return components, frame, scans


def _scan(body: bytes) -> _Scan | None:
    """An SOS segment's body (T.81 B.2.3): Ns, Ns x (Cs, Td/Ta), Ss, Se, Ah/Al."""
    n = body[0] if body else 0
    if n < 1 or len(body) < 4 + 2 * n:
        return None
    return _Scan(tuple(body[1: 1 + 2 * n: 2]), body[1 + 2 * n], body[2 + 2 * n], body[3 + 2 * n] & 0x0F)


def _scan_end(data: bytes, at: int) -> int:
    """Where the entropy-coded data starting at `at` ends: the next marker, or len(data). In the
    data, 0xFF is followed by 0x00 (a stuffed byte), RSTn or another 0xFF (fill)."""
    while True:
        at = data.find(b"\xff", at)
        if at < 0 or at + 1 >= len(data):
            return len(data)
        following = data[at + 1]
        if following == 0xFF:
            at += 1
        elif following == 0 or 0xD0 <= following <= 0xD7:
            at += 2
        else:
            return at


def _covered(components: tuple[int, ...], frame: int, scans: list[_Scan]) -> bool:
    """Whether `scans` code every component (sequential, lossless) or every coefficient of every
    component at full precision (progressive), so that no scan can follow."""
    if not components or not scans:
        return False
    if frame not in _PROGRESSIVE:
        return set(components) <= {c for scan in scans for c in scan.components}
    final = {(c, k) for scan in scans if scan.low == 0 for c in scan.components
             for k in range(scan.start, scan.end + 1)}
    return all((c, k) in final for c in components for k in range(64))
