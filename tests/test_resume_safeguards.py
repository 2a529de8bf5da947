"""Resumable downloads and segmented exposures together with the hostile-archive
safeguards: a partial file another process is writing, a resume through a redirect to
another host, the umask of a resumed file, and segments listed twice, unreadable or
named like paths.

The real downloader talks to the loopback servers (``MastServer``, ``HostileMast``); the
manifests come from real simulated FITS files.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat

import pytest
from archive_helpers import FAST, RATE, gets
from hostile_server import HostileMast

from nsclean.archive import archive
from nsclean.testing import simulate
from nsclean.testing.mastserver import MastServer

pytestmark = pytest.mark.usefixtures("loopback_only")

TOKEN = "tok-5c2e91d0-SECRET-resume"
TSO = "jw02222004001_03101_00001_nrs1"


@pytest.fixture(scope="module")
def tso_dir(tmp_path_factory):
    """A 3-segment time series (program 2222) on its own."""
    directory = tmp_path_factory.mktemp("tso")
    series = simulate.simulate_timeseries("NRS1", 6, seed=1, subarray="SUB32",
                                          program="02222", observation=4)
    simulate.write_timeseries(series, directory, segments=3)
    return directory


def segment_name(number, kind="rateints"):
    base, detector = TSO.rsplit("_", 1)
    return f"{base}-seg{number:03d}_{detector}_{kind}.fits"


# ---------------------------------------------------------------------------------------
# the resumable partial file
# ---------------------------------------------------------------------------------------
def test_a_partial_file_another_process_is_writing_is_left_alone_then_resumed(program_dir,
                                                                            tmp_path):
    source = (program_dir / RATE).read_bytes()
    destination = tmp_path / RATE
    partial = archive.partial_path(destination)
    partial.write_bytes(source[: len(source) // 3])
    with MastServer(program_dir) as mast:
        with open(partial, "rb") as other:
            fcntl.flock(other.fileno(), fcntl.LOCK_EX)  # as the other download does
            with pytest.raises(archive.DownloadError, match="another process is downloading"):
                archive.download_file(f"mast:JWST/product/{RATE}", destination,
                                      expected_size=len(source), archive_url=mast.url,
                                      token="", retries=1, **FAST)
            # neither written into, nor removed when this download gave up
            assert partial.read_bytes() == source[: len(source) // 3]
            assert not destination.exists() and gets(mast) == []
        # the other process is gone (killed): its partial file is resumed
        archive.download_file(f"mast:JWST/product/{RATE}", destination,
                              expected_size=len(source), archive_url=mast.url, token="",
                              retries=0, **FAST)
        (request,) = gets(mast)
    assert request.range == f"bytes={len(source) // 3}-" and request.status == 206
    assert destination.read_bytes() == source
    assert sorted(p.name for p in tmp_path.iterdir()) == [RATE]


def test_a_resumed_download_follows_a_redirect_without_the_token(program_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("MAST_API_TOKEN", TOKEN)
    source = (program_dir / RATE).read_bytes()
    destination = tmp_path / RATE
    archive.partial_path(destination).write_bytes(source[:1000])
    with HostileMast(program_dir, host="127.0.0.2", tokens={TOKEN: "x"}) as other, \
            HostileMast(program_dir, tokens={TOKEN: "Ada"}, redirect={RATE: other.url}) \
            as mast:
        archive.download_file(f"mast:JWST/product/{RATE}", destination,
                              expected_size=len(source), archive_url=mast.url, retries=0,
                              **FAST)
    assert destination.read_bytes() == source
    ((_, asked),) = mast.headers_seen
    ((_, served),) = other.headers_seen
    assert TOKEN in asked.get("Cookie", "") and TOKEN not in str(served)
    for headers in (asked, served):  # the Range and the encoding survive the redirect
        assert headers.get("Range") == "bytes=1000-"
        assert headers.get("Accept-Encoding") == "identity"


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_a_resumed_download_follows_the_umask(program_dir, tmp_path, umask):
    source = (program_dir / RATE).read_bytes()
    destination = tmp_path / RATE
    partial = archive.partial_path(destination)
    partial.write_bytes(source[:1000])
    partial.chmod(0o600)  # left by a run under another umask
    previous = os.umask(umask)
    try:
        with MastServer(program_dir) as mast:
            archive.download_file(f"mast:JWST/product/{RATE}", destination,
                                  expected_size=len(source), archive_url=mast.url, token="",
                                  retries=0, **FAST)
            (request,) = gets(mast)
    finally:
        os.umask(previous)
    assert request.status == 206
    assert stat.S_IMODE(destination.stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------------------------------
# segments in the manifest
# ---------------------------------------------------------------------------------------
def test_a_segment_listed_twice_is_taken_once_and_a_conflicting_one_fails(tso_dir,
                                                                           caplog):
    caplog.set_level(logging.WARNING)
    products = archive.scan_local(tso_dir)
    second = next(p for p in products if p["productFilename"] == segment_name(2))

    (row,) = archive.build_manifest(products + [dict(second)]).rows
    assert (row.status, row.rate_files) == ("ok", [segment_name(n) for n in (1, 2, 3)])
    assert "listed twice; taken once" in caplog.text

    other = dict(second, size=second["size"] + 2880, dataURI=second["dataURI"] + "x")
    (row,) = archive.build_manifest(products + [other]).rows
    assert row.status == "failed"
    assert "different files for one rateints product (seg002)" in row.reason


def test_an_unreadable_segment_fails_its_exposure(tso_dir, tmp_path):
    for path in tso_dir.iterdir():
        (tmp_path / path.name).symlink_to(path)
    (tmp_path / segment_name(2)).unlink()
    (tmp_path / segment_name(2)).write_bytes(b"")  # an interrupted copy
    (row,) = archive.fetch_manifest(source="local", local_dir=tmp_path).rows
    assert row.status == "failed" and f"{segment_name(2)} is empty" in row.reason
    assert row.rate_files == [segment_name(n) for n in (1, 2, 3)]


def test_download_exposure_refuses_a_segment_named_like_a_path(tso_dir, tmp_path):
    (row,) = archive.fetch_manifest(source="local", local_dir=tso_dir).rows
    assert row.status == "ok" and len(row.rate_files) == 3
    row.rate_file = " ".join([row.rate_files[0], f"../../{segment_name(2)}",
                              row.rate_files[2]])
    with pytest.raises(archive.DownloadError, match="is a path.*refused"):
        archive.download_exposure(row, tmp_path / "downloads")
    assert list(tmp_path.iterdir()) == []  # not even the first segment was fetched
