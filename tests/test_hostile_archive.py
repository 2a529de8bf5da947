"""nsclean.archive against a hostile archive: redirects to another host, product names
that are paths, odd ``Content-Length``, duplicated listings, a server that drips bytes,
and the token, which must reach the archive and nothing else.

The real downloader and (in child processes) the real astroquery client talk to
``HostileMast`` servers on loopback; a second server on 127.0.0.2 plays "another host"
and records every header it receives.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import pytest
from archive_helpers import CAL, FAST, RATE, STEM, run_child
from hostile_server import HostileMast

from nsclean.archive import archive
from nsclean.testing.mastserver import MastServer

pytestmark = pytest.mark.usefixtures("loopback_only")

TOKEN = "tok-8d1e55aa-SECRET-hostile"


def uri(name):
    return f"mast:JWST/product/{name}"


def size_of(program_dir, name=RATE):
    return (program_dir / name).stat().st_size


def files_under(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


# ---------------------------------------------------------------------------------------
# the token goes to the archive's origin only
# ---------------------------------------------------------------------------------------
def test_a_redirect_to_another_host_does_not_carry_the_token(program_dir, tmp_path,
                                                              monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MAST_API_TOKEN", TOKEN)
    with HostileMast(program_dir, host="127.0.0.2", tokens={TOKEN: "x"}) as other, \
            HostileMast(program_dir, tokens={TOKEN: "Ada"}, redirect={RATE: other.url}) \
            as mast:
        result = archive.download_file(uri(RATE), tmp_path / RATE,
                                       expected_size=size_of(program_dir),
                                       archive_url=mast.url, **FAST)
        # the HEAD of a cached file without a catalogue size follows the redirect too
        again = archive.download_file(uri(RATE), tmp_path / RATE, archive_url=mast.url,
                                      **FAST)
    assert result.fetched and not again.fetched
    assert (tmp_path / RATE).read_bytes() == (program_dir / RATE).read_bytes()
    # the archive got the token; the other host got both requests, never the token
    assert [TOKEN in c for c in mast.cookies_seen()] == [True, True]
    assert len(other.headers_seen) == 2
    assert not any(TOKEN in str(headers) for _, headers in other.headers_seen)
    assert [r.authenticated for r in other.requests] == [False, False]
    assert TOKEN not in caplog.text


def test_a_redirect_to_another_port_of_the_same_host_does_not_carry_the_token(
        program_dir, tmp_path):
    with MastServer(program_dir, tokens={TOKEN: "x"}) as other, \
            HostileMast(program_dir, redirect={RATE: other.url}) as mast:
        archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size_of(program_dir),
                              archive_url=mast.url, token=TOKEN, **FAST)
    assert other.requests and not any(r.authenticated for r in other.requests)


def test_the_token_is_never_sent_in_clear_text_to_a_remote_archive(tmp_path):
    # refused before any connection is made (the network guard would fail the test)
    with pytest.raises(archive.ArchiveConfigError, match="plain http") as error:
        archive.download_file(uri(RATE), tmp_path / RATE, expected_size=10,
                              archive_url="http://archive.example.org", token=TOKEN)
    assert TOKEN not in str(error.value)
    assert not (tmp_path / RATE).exists()


def test_the_astroquery_session_keeps_the_token_to_the_archive(program_dir, tmp_path):
    """astroquery's login puts the token in a domain-less session cookie; a redirect or
    any request of that session to another host must not carry it."""
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    with HostileMast(program_dir, host="127.0.0.2") as other, \
            HostileMast(program_dir, tokens={TOKEN: "Ada"}) as mast:
        child = run_child(f"""
from nsclean.archive import archive
archive.configure_mast_server({mast.url!r})
rows = archive.query_mast("1345", archive_url={mast.url!r}, token={TOKEN!r}, retries=0)
from astroquery.mast import Observations
Observations._session.get({other.url!r} + "/whoami", timeout=5)
result = len(rows)
""", timeout=60, env_extra={"HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"),
                                  "TMPDIR": str(home / "tmp")})
    assert child["rc"] == 0, child["stderr"][-3000:]
    assert child["result"] == 10
    assert any(TOKEN in c for c in mast.cookies_seen())  # the archive did get it
    assert other.headers_seen and not any(TOKEN in c for c in other.cookies_seen())
    assert TOKEN not in child["stdout"] + child["stderr"]
    # nor in astropy's and astroquery's caches and configuration, nor the temporary files
    written = [p for p in home.rglob("*") if p.is_file()]
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]


# ---------------------------------------------------------------------------------------
# product names that are paths
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("listed", [f"../../{RATE}", f"/tmp/nsclean-escape/{RATE}",
                                    f"..\\..\\{RATE}"])
def test_product_names_that_are_paths_fail_their_exposure(program_dir, tmp_path, listed):
    with HostileMast(program_dir, rename={RATE: listed}) as mast:
        child = run_child(f"""
from nsclean.archive import archive
archive.configure_mast_server({mast.url!r})
manifest = archive.fetch_manifest("1345", archive_url={mast.url!r}, retries=0)
archive.write_manifest(manifest, {str(tmp_path / "manifest.csv")!r})
result = {{r.stem: [r.status, r.reason] for r in manifest.rows}}
""", timeout=60)
        assert child["rc"] == 0, child["stderr"][-3000:]
        statuses = child["result"]
        # (a name with backslashes is not even this exposure's rate file: no rate file)
        expected = "no rate file" if "\\" in listed else "is a path"
        assert statuses[STEM][0] in ("failed", "skipped")
        assert expected in statuses[STEM][1]
        assert [s for s, (status, _) in statuses.items() if status == "ok"] \
            and all(status != "failed" for s, (status, _) in statuses.items() if s != STEM)

        # the library refuses such a row itself, before any request
        (row,) = [r for r in archive.read_manifest(tmp_path / "manifest.csv")
                  if r.stem == STEM]
        row.rate_file = listed
        downloads = tmp_path / "deep" / "downloads"
        before = len(mast.requests)
        with pytest.raises(archive.DownloadError, match="refused"):
            archive.download_exposure(row, downloads, archive_url=mast.url, token="",
                                      **FAST)
        assert len(mast.requests) == before
    assert files_under(tmp_path) == ["manifest.csv"]
    assert not Path("/tmp/nsclean-escape").exists()


# ---------------------------------------------------------------------------------------
# odd answers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", ["12abc", "-5", "1e6", ""])
def test_a_content_length_that_is_not_a_byte_count_fails_the_file_clearly(program_dir,
                                                                           tmp_path,
                                                                           length):
    with HostileMast(program_dir, bad_length={RATE: length}) as mast:
        with pytest.raises(archive.DownloadError) as error:
            archive.download_file(uri(RATE), tmp_path / RATE,
                                  expected_size=size_of(program_dir), archive_url=mast.url,
                                  token="", retries=1, **FAST)
    assert RATE in str(error.value) and "Content-Length" in str(error.value)
    assert files_under(tmp_path) == []


def test_a_file_listed_twice_is_one_exposure_and_a_conflicting_one_fails(program_dir,
                                                                         tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    query = """
from nsclean.archive import archive
archive.configure_mast_server({url!r})
manifest = archive.fetch_manifest("1345", archive_url={url!r}, retries=0)
result = [[r.stem, r.status, r.reason] for r in manifest.rows]
"""
    with HostileMast(program_dir, duplicate={RATE: None}) as mast:
        same = run_child(query.format(url=mast.url), timeout=60)
    with HostileMast(program_dir, duplicate={RATE: size_of(program_dir) + 2880}) as mast:
        conflict = run_child(query.format(url=mast.url), timeout=60)
    assert same["rc"] == 0 and conflict["rc"] == 0, same["stderr"] + conflict["stderr"]
    rows = [r for r in same["result"] if r[0] == STEM]
    assert rows == [[STEM, "ok", ""]]
    rows = [r for r in conflict["result"] if r[0] == STEM]
    assert len(rows) == 1 and rows[0][1] == "failed" and "twice" in rows[0][2]
    assert "twice" in conflict["stderr"]

    # a manifest with a repeated row (concatenated by hand) is still one exposure each
    products = archive.scan_local(program_dir)
    manifest = archive.write_manifest(archive.build_manifest(products + products[:2]),
                                      tmp_path / "m.csv")
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines + lines[1:3]) + "\n")
    stems = [r.stem for r in archive.read_manifest(manifest)]
    assert len(stems) == len(set(stems)) == len(lines) - 1
    assert "listed more than once" in caplog.text and "listed twice" in caplog.text


def test_a_dripping_server_meets_the_attempt_deadline(program_dir, tmp_path):
    """One byte every 0.2 s never trips a 2 s read timeout; the deadline ends it."""
    with HostileMast(program_dir, drip={RATE: 0.2}) as mast:
        started = time.monotonic()
        with pytest.raises(archive.DownloadError) as error:
            archive.download_file(uri(RATE), tmp_path / RATE,
                                  expected_size=size_of(program_dir), archive_url=mast.url,
                                  token="", retries=1, deadline=1.0, **FAST)
        seconds = time.monotonic() - started
        # the other file of the exposure is not held up
        archive.download_file(uri(CAL), tmp_path / CAL, expected_size=size_of(program_dir,
                              CAL), archive_url=mast.url, token="", deadline=1.0, **FAST)
    assert seconds < 5, seconds
    assert "too slow" in str(error.value) and "after 2 attempts" in str(error.value)
    assert files_under(tmp_path) == [CAL]


def test_the_default_deadline_follows_the_size_and_the_minimum_rate(program_dir, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(archive, "DEADLINE_BASE", 0.5)
    size = size_of(program_dir)
    with HostileMast(program_dir, drip={RATE: 0.2}) as mast:
        started = time.monotonic()
        with pytest.raises(archive.DownloadError, match="deadline of this attempt is 1 s"):
            # 0.5 s + size / (2 * size) s = 1 s
            archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                                  archive_url=mast.url, token="", retries=0,
                                  min_rate=2.0 * size, **FAST)
    assert time.monotonic() - started < 4


# ---------------------------------------------------------------------------------------
# permissions
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_downloaded_files_follow_the_umask(program_dir, tmp_path, umask):
    previous = os.umask(umask)
    try:
        with MastServer(program_dir) as mast:
            archive.download_file(uri(RATE), tmp_path / RATE,
                                  expected_size=size_of(program_dir), archive_url=mast.url,
                                  token="", **FAST)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / RATE).stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------------------------------
# two downloads of one file at once
# ---------------------------------------------------------------------------------------
def test_a_download_in_progress_elsewhere_is_not_removed_as_stale(program_dir, tmp_path):
    """The stale-temporary cleanup removed another process's download in progress; a
    transfer in progress holds a lock on its temporary file, a killed one does not."""
    import fcntl

    in_progress = tmp_path / f".{RATE}.other.part"
    killed = tmp_path / f".{RATE}.killed.part"
    killed.write_bytes(b"left by a killed attempt")
    with open(in_progress, "wb") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)  # as the other process's download does
        other.write(b"half of it")
        with MastServer(program_dir) as mast:
            archive.download_file(uri(RATE), tmp_path / RATE,
                                  expected_size=size_of(program_dir), archive_url=mast.url,
                                  token="", **FAST)
        assert in_progress.exists() and not killed.exists()
    assert (tmp_path / RATE).read_bytes() == (program_dir / RATE).read_bytes()


def test_a_file_uri_from_the_archive_fails_its_exposure(program_dir, tmp_path):
    """A file: data URI would make the downloader copy one of our own files."""
    secret = tmp_path / "private" / RATE
    secret.parent.mkdir()
    secret.write_bytes(b"not for the archive to choose")
    with HostileMast(program_dir, data_uri={RATE: secret.as_uri()}) as mast:
        child = run_child(f"""
from nsclean.archive import archive
archive.configure_mast_server({mast.url!r})
manifest = archive.fetch_manifest("1345", archive_url={mast.url!r}, retries=0)
result = {{r.stem: [r.status, r.reason] for r in manifest.rows}}
""", timeout=60)
    assert child["rc"] == 0, child["stderr"][-3000:]
    status, reason = child["result"][STEM]
    assert status == "failed" and "not a mast: URI" in reason


def test_a_compressed_body_never_puts_more_than_announced_on_disk(program_dir, tmp_path):
    """A server that gzips the answer anyway (Content-Length = compressed size): the
    decompressed stream is cut at the announced size, not written out whole."""
    with HostileMast(program_dir, gzip=[RATE]) as mast:
        with pytest.raises(archive.DownloadError, match="more than the announced"):
            archive.download_file(uri(RATE), tmp_path / RATE, archive_url=mast.url,
                                  token="", retries=0, **FAST)
        (request,) = [headers for path, headers in mast.headers_seen if "Download" in path]
    assert request.get("Accept-Encoding") == "identity"
    assert files_under(tmp_path) == []
