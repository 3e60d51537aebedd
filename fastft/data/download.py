"""Fetch and unpack the d2l.ai hotdog zip that chapter 13.2 trains on.

The download is the one step that needs the network, so every way it can fail
ends in a single-line DataError that names the offline alternatives. Nothing
half-done is left looking complete: the zip is checked against its sha1 before
it is kept, and the dataset appears at `target` only by an atomic rename.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from fastft.data.staging import is_vacant, move_into_place
from fastft.errors import DataError

HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"

_CHUNK = 1 << 20
_S_IFMT, _S_IFLNK = 0o170000, 0o120000


def _is_dataset(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def _sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offline_error(url: str, reason: object, target: Path) -> DataError:
    # Reasons can carry newlines (HTTP bodies, nested errors); the CLI promises one line.
    why = " ".join(str(reason).split()) or "unknown error"
    return DataError(
        f"cannot download {url} ({why}). Use --data synthetic for the built-in synthetic dataset, "
        f"or --data DIR with an ImageFolder dataset (DIR/train/CLASS/*.jpg, DIR/test/CLASS/*.jpg), "
        f"or place the extracted dataset at {target}"
    )


def _fetch(url: str, dest: Path, sha1: str, timeout_s: float, target: Path) -> None:
    """Stream `url` to `dest` via a .part file, keeping it only if the sha1 matches."""
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha1()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, desc=dest.name, unit="B", unit_scale=True, disable=None) as bar:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        part.unlink(missing_ok=True)
        raise _offline_error(url, f"HTTP {e.code} {e.reason}", target) from e
    except urllib.error.URLError as e:
        part.unlink(missing_ok=True)
        raise _offline_error(url, e.reason, target) from e
    except (OSError, ValueError, http.client.HTTPException) as e:
        # OSError covers timeouts and resets mid-stream, HTTPException a
        # truncated body, ValueError a malformed URL.
        part.unlink(missing_ok=True)
        raise _offline_error(url, e, target) from e
    actual = digest.hexdigest()
    if actual != sha1.lower():
        part.unlink(missing_ok=True)
        raise DataError(
            f"downloaded {url} has sha1 {actual}, expected {sha1}; deleted it, the file is corrupt or changed"
        )
    os.replace(part, dest)


def _check_member(info: zipfile.ZipInfo, dest: str) -> None:
    name = info.filename.replace("\\", "/")
    if (info.external_attr >> 16) & _S_IFMT == _S_IFLNK:
        raise DataError(f"refusing to extract symlink member {info.filename!r} from the zip")
    if PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"refusing to extract member {info.filename!r}: absolute path")
    landing = os.path.normpath(os.path.join(dest, name))
    if os.path.commonpath([dest, landing]) != dest:
        raise DataError(f"refusing to extract member {info.filename!r}: it would land outside {dest}")


def safe_extract(zip_path: Path, dest: Path) -> None:
    """Extract `zip_path` into `dest`, refusing the whole archive if any member
    is absolute, escapes `dest`, or is a symlink (checked before writing anything)."""
    root = os.path.abspath(dest)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = zf.infolist()
            for info in members:
                _check_member(info, root)
            Path(root).mkdir(parents=True, exist_ok=True)
            zf.extractall(root, members)
    except zipfile.BadZipFile as e:
        raise DataError(f"{zip_path} is not a valid zip file ({e})") from e
    except OSError as e:
        raise DataError(f"cannot extract {zip_path} to {dest} ({e})") from e


def _find_dataset_root(folder: Path) -> Path:
    """The folder holding train/ and test/: the zip's top folder (hotdog/) or itself."""
    if _is_dataset(folder):
        return folder
    for child in sorted(folder.iterdir()):
        if child.is_dir() and _is_dataset(child):
            return child
    raise DataError(f"the extracted zip has no folder with train/ and test/ inside (looked in {folder})")


def _install(zip_path: Path, target: Path) -> None:
    """Extract beside `target`, then rename the dataset folder into place."""
    if not is_vacant(target):
        raise DataError(f"{target} exists but has no train/ and test/ folders; remove it or point --data elsewhere")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
    except OSError as e:
        raise DataError(f"cannot create a temp folder beside {target} ({e})") from e
    try:
        safe_extract(zip_path, tmp)
        move_into_place(_find_dataset_root(tmp), target)
    except OSError as e:
        raise DataError(f"cannot move the extracted dataset to {target} ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_hotdog(target: Path, url: str = HOTDOG_URL, sha1: str = HOTDOG_SHA1,
                    timeout_s: float = 30.0) -> Path:
    """Make `target` hold the hotdog dataset (target/train, target/test) and return it.

    An existing dataset is returned untouched; a verified hotdog.zip beside
    `target` is reused instead of downloading again.
    """
    target = Path(target)
    if _is_dataset(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {target.parent} ({e})") from e
    zip_path = target.parent / "hotdog.zip"
    if not (zip_path.is_file() and _sha1_of(zip_path) == sha1.lower()):
        _fetch(url, zip_path, sha1, timeout_s, target)
    _install(zip_path, target)
    return target
