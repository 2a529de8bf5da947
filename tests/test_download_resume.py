"""Downloads that break off resume with an HTTP Range request, against the loopback MAST
server (which serves ranges as MAST does), and log their progress."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from archive_helpers import FAST, gets
from archive_helpers import RATE as NAME
from astropy.io import fits

from nsclean.archive import archive
from nsclean.testing.mastserver import MastServer

pytestmark = pytest.mark.usefixtures("loopback_only")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One 4 MB rate file (big enough to arrive in several blocks)."""
    directory = tmp_path_factory.mktemp("served")
    primary = fits.PrimaryHDU()
    for key, value in (("TELESCOP", "JWST"), ("INSTRUME", "NIRSPEC"), ("DETECTOR", "NRS1"),
                       ("EXP_TYPE", "NRS_IFU"), ("PROGRAM", "01345"), ("OBSERVTN", "062"),
                       ("VISIT", "001"), ("EXPOSURE", "1")):
        primary.header[key] = value
    data = np.random.default_rng(1).normal(size=(1024, 1024)).astype(np.float32)
    fits.HDUList([primary, fits.ImageHDU(data, name="SCI")]).writeto(directory / NAME)
    return directory


def test_a_download_cut_in_half_resumes_with_a_range_request(served, tmp_path, caplog):
    source = served / NAME
    size = source.stat().st_size
    destination = tmp_path / NAME
    with MastServer(served, faults={NAME: ["cut"]}) as server, \
            caplog.at_level(logging.INFO, logger="nsclean.archive.archive"):
        result = archive.download_file(f"mast:JWST/product/{NAME}", destination,
                                       expected_size=size, archive_url=server.url, token="",
                                       retries=2, **FAST)
        first, second = gets(server)
    assert destination.read_bytes() == source.read_bytes()
    assert result.attempts == 2 and result.nbytes == size
    # The server cut the first answer at half the file; the second asked only for what
    # was missing: from the last whole block received (1 MB blocks) on.
    assert (first.fault, first.range) == ("cut", "")
    assert second.status == 206 and second.range.startswith("bytes=")
    kept = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert size // 2 - (1 << 20) < kept <= size // 2
    assert f"resuming at byte {kept} of {size}" in caplog.text
    assert f"{size - kept} bytes transferred (resumed at byte {kept})" in caplog.text
    assert "MB/s" in caplog.text
    assert not archive.partial_path(destination).exists()


def test_the_partial_file_of_a_killed_download_is_resumed(served, tmp_path):
    source = served / NAME
    size = source.stat().st_size
    destination = tmp_path / NAME
    # what a download killed at a third leaves behind
    archive.partial_path(destination).write_bytes(source.read_bytes()[: size // 3])
    with MastServer(served) as server:
        archive.download_file(f"mast:JWST/product/{NAME}", destination, expected_size=size,
                              archive_url=server.url, token="", retries=0, **FAST)
        (request,) = gets(server)
    assert request.range == f"bytes={size // 3}-" and request.status == 206
    assert destination.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]


def test_a_partial_file_longer_than_the_catalogue_size_is_discarded(served, tmp_path):
    source = served / NAME
    size = source.stat().st_size
    destination = tmp_path / NAME
    archive.partial_path(destination).write_bytes(b"x" * (size + 10))
    with MastServer(served) as server:
        archive.download_file(f"mast:JWST/product/{NAME}", destination, expected_size=size,
                              archive_url=server.url, token="", retries=0, **FAST)
        (request,) = gets(server)
    assert request.range == "" and request.status == 200
    assert destination.read_bytes() == source.read_bytes()


def test_server_ranges(served):
    """The loopback server answers ranges as RFC 9110 says (206 and Content-Range, 416)."""
    import requests

    source = (served / NAME).read_bytes()
    with MastServer(served) as server:
        url = f"{server.url}/api/v0.1/Download/file?uri=mast:JWST/product/{NAME}"
        part = requests.get(url, headers={"Range": "bytes=100-199"}, timeout=5)
        tail = requests.get(url, headers={"Range": "bytes=1000-"}, timeout=5)
        beyond = requests.get(url, headers={"Range": f"bytes={len(source)}-"}, timeout=5)
    assert part.status_code == 206 and part.content == source[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(source)}"
    assert tail.status_code == 206 and tail.content == source[1000:]
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(source)}"


def test_a_download_that_gives_up_leaves_no_partial_file(served, tmp_path):
    destination = tmp_path / NAME
    with MastServer(served, faults={NAME: ["cut", "cut"]}) as server, \
            pytest.raises(archive.DownloadError, match="after 2 attempts"):
        archive.download_file(f"mast:JWST/product/{NAME}", destination,
                              expected_size=(served / NAME).stat().st_size,
                              archive_url=server.url, token="", retries=1, **FAST)
    assert list(Path(tmp_path).iterdir()) == []


def test_progress_is_logged_with_bytes_and_rate(served, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(archive, "PROGRESS_INTERVAL", 0.0)  # every block, not every 10 s
    size = (served / NAME).stat().st_size
    with MastServer(served) as server, \
            caplog.at_level(logging.INFO, logger="nsclean.archive.archive"):
        archive.download_file(f"mast:JWST/product/{NAME}", tmp_path / NAME,
                              expected_size=size, archive_url=server.url, token="",
                              retries=0, **FAST)
    progress = [r.getMessage() for r in caplog.records if f"of {size} bytes (" in
                r.getMessage()]
    assert len(progress) >= 3  # 4 MB in 1 MB blocks
    assert all(message.endswith("MB/s") for message in progress)
    assert progress[-1].startswith(f"{NAME}: {size} of {size} bytes (100 %)")
