"""Downloading the hotdog zip: sha1 checking, safe extraction, one-line offline errors.

No network: the "server" is a file:// URL to a zip built here, and the offline
case is a refused connection on loopback.
"""

from __future__ import annotations

import hashlib
import io
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from fastft.data.download import download_hotdog, safe_extract
from fastft.errors import DataError


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buf, "JPEG")
    return buf.getvalue()


def _hotdog_zip(path: Path) -> str:
    """A miniature of the real zip (top folder hotdog/); returns its sha1."""
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            zf.writestr(f"hotdog/{split}/hotdog/1.jpg", _jpeg((180, 70, 50)))
            zf.writestr(f"hotdog/{split}/not-hotdog/2.jpg", _jpeg((40, 160, 60)))
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # A proxy in the environment would turn the loopback refusal into a proxy round trip.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
def served(tmp_path) -> tuple[str, str]:
    src = tmp_path / "server" / "hotdog.zip"
    src.parent.mkdir()
    return src.as_uri(), _hotdog_zip(src)


def test_download_extracts_and_keeps_the_zip(tmp_path, served):
    url, sha1 = served
    target = tmp_path / "cache" / "hotdog"
    assert download_hotdog(target, url=url, sha1=sha1) == target
    for split in ("train", "test"):
        assert (target / split / "hotdog" / "1.jpg").is_file()
        assert (target / split / "not-hotdog" / "2.jpg").is_file()
    zip_path = target.parent / "hotdog.zip"
    assert hashlib.sha1(zip_path.read_bytes()).hexdigest() == sha1
    assert sorted(p.name for p in target.parent.iterdir()) == ["hotdog", "hotdog.zip"]


def test_verified_zip_is_reused_without_downloading(tmp_path, served, monkeypatch):
    url, sha1 = served
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "hotdog.zip").write_bytes(Path(urllib.request.url2pathname(url[len("file://"):])).read_bytes())
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    assert (download_hotdog(cache / "hotdog", url=url, sha1=sha1) / "train").is_dir()


def test_wrong_sha1_deletes_the_download(tmp_path, served):
    url, sha1 = served
    target = tmp_path / "cache" / "hotdog"
    wrong = "0" * 40
    with pytest.raises(DataError) as err:
        download_hotdog(target, url=url, sha1=wrong)
    message = str(err.value)
    assert sha1 in message and wrong in message and url in message
    assert list(target.parent.iterdir()) == []  # no dataset, no .part, no zip


@pytest.mark.parametrize("member", ["../evil.txt", "/abs.txt", "hotdog/../../evil.txt", "C:/evil.txt"])
def test_unsafe_member_refuses_the_whole_zip(tmp_path, member):
    zip_path = tmp_path / "bad.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("hotdog/train/hotdog/1.jpg", _jpeg((180, 70, 50)))
        zf.writestr(zipfile.ZipInfo(member), b"owned")
    dest = tmp_path / "out" / "dest"
    with pytest.raises(DataError, match=member.replace(".", r"\.")):
        safe_extract(zip_path, dest)
    assert not dest.exists()  # checked before anything was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_symlink_member_is_refused(tmp_path):
    zip_path = tmp_path / "link.zip"
    info = zipfile.ZipInfo("hotdog/link")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="hotdog/link"):
        safe_extract(zip_path, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_inner_dotdot_that_stays_inside_is_allowed(tmp_path):
    zip_path = tmp_path / "ok.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("a/../b.txt", b"fine")
    safe_extract(zip_path, tmp_path / "dest")
    # zipfile itself drops ".." parts (a/b.txt); what matters is no refusal, no escape.
    assert [p.read_bytes() for p in (tmp_path / "dest").rglob("b.txt")] == [b"fine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "ok.zip"]


def test_offline_is_one_line_with_the_alternatives(tmp_path):
    target = tmp_path / "cache" / "hotdog"
    url = "http://127.0.0.1:9/hotdog.zip"
    with pytest.raises(DataError) as err:
        download_hotdog(target, url=url, timeout_s=5)
    message = str(err.value)
    assert "\n" not in message
    assert url in message and "--data synthetic" in message and str(target) in message
    assert err.value.one_line() == message
    assert list(target.parent.iterdir()) == []


def test_zip_without_train_and_test_is_a_data_error(tmp_path):
    src = tmp_path / "server" / "hotdog.zip"
    src.parent.mkdir()
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("hotdog/readme.txt", b"no images")
    sha1 = hashlib.sha1(src.read_bytes()).hexdigest()
    target = tmp_path / "cache" / "hotdog"
    with pytest.raises(DataError, match="train/ and test/"):
        download_hotdog(target, url=src.as_uri(), sha1=sha1)
    assert sorted(p.name for p in target.parent.iterdir()) == ["hotdog.zip"]  # no temp folder left


def _no_network(*args, **kwargs):
    raise AssertionError("download_hotdog touched the network")


def test_present_dataset_returns_without_touching_the_url(tmp_path, monkeypatch):
    target = tmp_path / "hotdog"
    (target / "train").mkdir(parents=True)
    (target / "test").mkdir()
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    assert download_hotdog(target, url="http://127.0.0.1:9/never.zip") == target
