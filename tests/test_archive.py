"""nsclean.archive.archive: the manifest, the local source, downloads, and the real astroquery
client against the loopback MAST server (in child processes, because astroquery fixes
its URLs at import)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import network_guard
import pytest
from archive_helpers import EXPOSURES, FAST_SHORT_READ, RATE, make_program, run_child

from nsclean.archive import archive
from nsclean.testing.mastserver import MastServer

pytestmark = pytest.mark.usefixtures("loopback_only")

TOKEN = "tok-3f9c1d7e-SECRET-do-not-log"
FAST = FAST_SHORT_READ


@pytest.fixture(scope="module")
def program_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("program")
    # the BOTS exposure has no cal file: it cannot get an automatic mask
    make_program(directory, without_cal={"jw02222001001_04102_00001_nrs1"})
    return directory


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------
# pure functions: stems, pairing, manifest file, local source
# ---------------------------------------------------------------------------------------
def test_stem_of():
    assert archive.stem_of("a/jw01345062001_03101_00001_nrs2_rate.fits") == \
        "jw01345062001_03101_00001_nrs2"
    assert archive.stem_of("jw01345062001_03101_00001_nrs2_cal.fits") == \
        "jw01345062001_03101_00001_nrs2"
    with pytest.raises(ValueError, match="not a"):
        archive.stem_of("jw01345062001_03101_00001_nrs2_s2d.fits")


def test_local_source_pairs_by_stem_and_applies_policy(program_dir, tmp_path):
    products = archive.scan_local(program_dir)
    manifest = archive.build_manifest(products)
    assert [r.stem for r in manifest.rows] == sorted(e[0] for e in EXPOSURES)
    assert manifest.without_cal == ["jw02222001001_04102_00001_nrs1"]
    bots = manifest.rows[-1]
    assert (bots.status, bots.cal_file, bots.subarray, bots.exp_type) == \
        ("skipped", "", "SUB2048", "NRS_BRIGHTOBJ")
    assert "no cal" in bots.reason
    ok = manifest.rows[0]
    assert ok.status == "ok" and ok.rate_file.endswith("_rate.fits")
    assert ok.cal_file == ok.stem + "_cal.fits" and ok.mask_source == "cal"
    assert ok.rate_size == (program_dir / ok.rate_file).stat().st_size
    assert (ok.program, ok.observation, ok.visit, ok.detector) == ("01345", "062", "001", "NRS1")

    assert manifest.rows[-1].mask_source == "user"
    with pytest.raises(archive.ArchiveError, match="jw02222001001_04102_00001_nrs1"):
        archive.build_manifest(products, missing_cal="error")

    selected = archive.fetch_manifest("1345", source="local", local_dir=program_dir,
                                      modes="IFU", detectors="nrs1")
    assert [r.stem for r in selected.rows] == ["jw01345062001_03101_00001_nrs1",
                                               "jw01345062001_03101_00002_nrs1"]
    assert archive.fetch_manifest(source="local", local_dir=program_dir, observations=63,
                                  gratings="G395M").rows[0].exp_type == "NRS_MSASPEC"
    with pytest.raises(ValueError, match="unknown NIRSpec mode"):
        archive.fetch_manifest("1345", source="local", local_dir=program_dir, modes="WFSS")


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_manifest_round_trip(program_dir, tmp_path, suffix):
    manifest = archive.fetch_manifest(source="local", local_dir=program_dir)
    path = archive.write_manifest(manifest, tmp_path / f"manifest{suffix}")
    header = path.read_text().splitlines()[0]
    assert header.split("\t" if suffix == ".tsv" else ",") == list(archive.MANIFEST_COLUMNS)
    assert archive.read_manifest(path) == manifest.rows
    assert leftovers(tmp_path) == []
    (tmp_path / "bad.csv").write_text("stem,program\nx,1\n")
    with pytest.raises(ValueError, match="missing columns"):
        archive.read_manifest(tmp_path / "bad.csv")


def test_local_files_are_linked_or_copied_atomically(program_dir, tmp_path):
    row = archive.fetch_manifest(source="local", local_dir=program_dir).rows[0]
    paths = archive.download_exposure(row, tmp_path / "cache")
    assert paths["rate"].read_bytes() == (program_dir / row.rate_file).read_bytes()
    again = archive.download_file(row.rate_uri, paths["rate"], expected_size=row.rate_size)
    assert not again.fetched
    with pytest.raises(archive.DownloadError, match="manifest says"):
        archive.download_file(row.cal_uri, tmp_path / "other" / row.cal_file,
                              expected_size=row.cal_size + 1)
    assert leftovers(tmp_path / "other") == []


# ---------------------------------------------------------------------------------------
# downloads against the loopback server (requests only, in process)
# ---------------------------------------------------------------------------------------
def uri(name):
    return f"mast:JWST/product/{name}"


def test_download_then_cache_hit_makes_no_request(program_dir, tmp_path):
    size = (program_dir / RATE).stat().st_size
    with MastServer(program_dir) as server:
        first = archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                                      archive_url=server.url, token="", **FAST)
        assert first.fetched and first.attempts == 1 and first.nbytes == size
        assert (tmp_path / RATE).read_bytes() == (program_dir / RATE).read_bytes()
        second = archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                                       archive_url=server.url, token="", **FAST)
        assert not second.fetched and second.attempts == 0
        assert server.count(RATE) == 1
        # without the catalogue size, a HEAD decides
        third = archive.download_file(uri(RATE), tmp_path / RATE, archive_url=server.url,
                                      token="", **FAST)
        assert not third.fetched and server.count(RATE, "HEAD") == 1
        # a file of the wrong size on disk is fetched again, and the temporary file of
        # an attempt that was killed mid-transfer is cleared away
        (tmp_path / RATE).write_bytes(b"partial")
        killed = tmp_path / f".{RATE}.abc123.tmp"
        killed.write_bytes(b"half a file")
        other = tmp_path / ".other_rate.fits.abc123.tmp"
        other.write_bytes(b"another file's download")
        assert archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                                     archive_url=server.url, token="", **FAST).fetched
        assert (tmp_path / RATE).stat().st_size == size
        assert not killed.exists() and other.exists()


@pytest.mark.parametrize("fsync", [False, True])
def test_a_download_is_flushed_to_disk_only_with_fsync(fsync, program_dir, tmp_path,
                                                       monkeypatch):
    flushed = []
    real_fsync = os.fsync

    def spy(fd):
        flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    size = (program_dir / RATE).stat().st_size
    with MastServer(program_dir) as server:
        archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                              archive_url=server.url, token="", fsync=fsync, **FAST)
    assert (tmp_path / RATE).read_bytes() == (program_dir / RATE).read_bytes()
    if fsync:  # the temporary file, before its rename to the final name
        assert len(flushed) == 1 and flushed[0].startswith(f".{RATE}."), flushed
    else:
        assert flushed == []


@pytest.mark.parametrize("fault", ["500", "503", "cut", "wrong_size", "slow"])
def test_each_fault_is_retried_to_success(program_dir, tmp_path, fault):
    size = (program_dir / RATE).stat().st_size
    with MastServer(program_dir, faults={RATE: [fault, fault]}, slow_seconds=1.0) as server:
        result = archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                                       archive_url=server.url, token="", retries=3, **FAST)
        assert result.fetched and result.attempts == 3
        assert [r.fault for r in server.requests if r.method == "GET"] == [fault, fault, ""]
    assert (tmp_path / RATE).read_bytes() == (program_dir / RATE).read_bytes()
    assert leftovers(tmp_path) == []


def test_retry_after_is_honoured(program_dir, tmp_path):
    size = (program_dir / RATE).stat().st_size
    with MastServer(program_dir, faults={RATE: ["503"]}) as server:
        result = archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                                       archive_url=server.url, token="", backoff=0.01,
                                       max_backoff=5.0, timeout=(2.0, 2.0))
    assert result.attempts == 2 and 1.0 <= result.seconds < 4.0


@pytest.mark.parametrize("fault", ["500", "cut", "wrong_size", "slow"])
def test_persistent_fault_gives_clear_error_and_no_file(program_dir, tmp_path, fault):
    size = (program_dir / RATE).stat().st_size
    with MastServer(program_dir, faults={RATE: fault}, slow_seconds=1.0) as server:
        started = time.monotonic()
        with pytest.raises(archive.DownloadError) as error:
            archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                                  archive_url=server.url, token="", retries=2, **FAST)
        assert time.monotonic() - started < 5
        assert server.count(RATE, "GET") == 3
    message = str(error.value)
    assert RATE in message and "after 3 attempts" in message
    assert not (tmp_path / RATE).exists() and leftovers(tmp_path) == []


def test_exclusive_file_needs_token_and_token_is_never_logged(program_dir, tmp_path,
                                                             caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    size = (program_dir / RATE).stat().st_size
    with MastServer(program_dir, exclusive=[RATE], tokens={TOKEN: "Ada"}) as server:
        monkeypatch.delenv("MAST_API_TOKEN", raising=False)
        with pytest.raises(archive.AuthenticationRequired, match="MAST_API_TOKEN") as error:
            archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                                  archive_url=server.url, **FAST)
        assert "token is needed" in str(error.value) and RATE in str(error.value)
        assert server.count(RATE) == 1  # a 401 is not retried
        monkeypatch.setenv("MAST_API_TOKEN", "wrong")
        with pytest.raises(archive.AuthenticationRequired, match="expired or lack"):
            archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                                  archive_url=server.url, **FAST)
        monkeypatch.setenv("MAST_API_TOKEN", TOKEN)
        result = archive.download_file(uri(RATE), tmp_path / RATE, expected_size=size,
                                       archive_url=server.url, **FAST)
        assert result.fetched and server.requests[-1].authenticated
    assert leftovers(tmp_path) == []
    assert TOKEN not in caplog.text


def test_unknown_file_is_not_retried(program_dir, tmp_path):
    with MastServer(program_dir) as server:
        with pytest.raises(archive.DownloadError, match="not found"):
            archive.download_file(uri("jw01345099001_03101_00001_nrs1_rate.fits"),
                                  tmp_path / "x_rate.fits", archive_url=server.url, token="",
                                  **FAST)
        assert len([r for r in server.requests if r.method == "GET"]) == 1


def test_network_guard_refuses_the_real_archive(tmp_path):
    with pytest.raises(network_guard.NonLoopbackAccess):
        archive.download_file(uri(RATE), tmp_path / RATE, expected_size=1, token="",
                              archive_url="https://mast.stsci.edu", retries=0)
    network_guard.ATTEMPTS.clear()  # expected here; anything else fails the module


def test_download_job_imports_neither_numpy_nor_astropy(program_dir, tmp_path):
    # The workflow runs one download job per file: start-up is most of their cost, and
    # astropy.io.fits alone would add ~0.7 s to each.
    with MastServer(program_dir) as server:
        child = run_child(f"""
import sys
from nsclean.archive import archive
from nsclean.workflow import pipeline
size = {(program_dir / RATE).stat().st_size}
archive.download_file({uri(RATE)!r}, {str(tmp_path / RATE)!r}, expected_size=size,
                      archive_url={server.url!r}, token="", retries=0)
result = sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "astropy", "scipy"))
""")
    assert child["rc"] == 0, child["stderr"]
    assert child["result"] == []
    assert (tmp_path / RATE).stat().st_size == (program_dir / RATE).stat().st_size


# ---------------------------------------------------------------------------------------
# the real astroquery client in child processes
# ---------------------------------------------------------------------------------------
QUERY = """
import logging, sys
logging.basicConfig(stream=sys.stderr, level=logging.DEBUG)
import nsclean
from nsclean.archive import archive
assert "astroquery.mast" not in sys.modules  # or configure_mast_server could not work
archive.configure_mast_server({url!r})
result = []
for selections in {selections!r}:
    manifest = archive.fetch_manifest(["1345", "2222"], archive_url={url!r},
                                      pagesize={pagesize}, backoff=0.01, timeout={timeout},
                                      **selections)
    archive.write_manifest(manifest, {manifest_path!r})
    result.append({{"rows": [r.stem for r in manifest.rows], "skipped": [
        r.stem for r in manifest.rows if r.status == "skipped"],
        "without_cal": manifest.without_cal}})
result = result[0] if len(result) == 1 else result
{after}
"""


def query_in_child(server, tmp_path, *, pagesize=None, env=None, timeout=5, runs=None,
                   after="", **selections):
    """Run fetch_manifest for each selection in a child, then the code ``after``."""
    code = QUERY.format(url=server.url, pagesize=pagesize, selections=runs or [selections],
                        timeout=timeout, manifest_path=str(tmp_path / "manifest.csv"),
                        after=after)
    return run_child(code, env_extra=env, timeout=60)


def test_astroquery_program_query_paging_executing_and_downloads(program_dir, tmp_path):
    with MastServer(program_dir, executing_polls=1) as server:
        child = query_in_child(server, tmp_path, pagesize=3, after=f"""
import astroquery.mast
result["invoke_url"] = astroquery.mast.Observations._portal_api_connection.MAST_REQUEST_URL
assert archive.configure_mast_server({server.url!r}) is None  # same URL: nothing to do
try:
    archive.configure_mast_server("http://127.0.0.1:10")
except archive.ArchiveConfigError as exc:
    result["refused"] = str(exc)
""")
        assert child["rc"] == 0, child["stderr"][-3000:]
        # astroquery really talks to the loopback server, and cannot be re-pointed
        assert child["result"]["invoke_url"] == f"{server.url}/api/v0/invoke"
        assert "imported before configure_mast_server" in child["result"]["refused"]
        filtered = [r for r in server.requests if r.target == "Mast.Caom.Filtered"]
        # 9 observation rows (3 level-3, 6 level-2) in pages of 3, each page polled
        # twice (EXECUTING first)
        assert [r.page for r in filtered] == [1, 1, 2, 2, 3, 3]
        assert [r.executing for r in filtered] == [True, False] * 3
        assert server.count("Mast.Caom.Products") >= 2
        result = child["result"]
        assert result["rows"] == sorted(e[0] for e in EXPOSURES)
        assert result["without_cal"] == result["skipped"] == ["jw02222001001_04102_00001_nrs1"]

        rows = archive.read_manifest(tmp_path / "manifest.csv")
        ifu = rows[0]
        assert (ifu.exp_type, ifu.grating, ifu.filter, ifu.data_rights) == \
            ("NRS_IFU", "PRISM", "CLEAR", "PUBLIC")
        assert ifu.rate_uri == f"mast:JWST/product/{ifu.rate_file}"
        assert [r.exp_type for r in rows][-1] == "NRS_BRIGHTOBJ"

        cache = tmp_path / "cache"
        started = time.monotonic()
        for row in rows:
            if row.status == "ok":
                archive.download_exposure(row, cache, archive_url=server.url, token="", **FAST)
        seconds = time.monotonic() - started
        downloads = len([r for r in server.requests if r.method == "GET" and
                         r.target.endswith(".fits")])
        assert downloads == 10
        for row in rows[:-1]:
            assert (cache / row.rate_file).read_bytes() == \
                (program_dir / row.rate_file).read_bytes()
        for row in rows:  # second run: everything is a cache hit, no request at all
            if row.status == "ok":
                archive.download_exposure(row, cache, archive_url=server.url, token="", **FAST)
        assert len([r for r in server.requests if r.method == "GET" and
                    r.target.endswith(".fits")]) == downloads
        assert seconds < 10


def test_astroquery_selection_by_observation_detector_and_grating(program_dir, tmp_path):
    with MastServer(program_dir) as server:
        child = query_in_child(server, tmp_path, runs=[
            {"modes": ["MOS", "BOTS"], "detectors": ["NRS2"]},
            {"observations": [62], "gratings": "PRISM"},
            {"modes": "BOTS"}])
        assert child["rc"] == 0, child["stderr"][-3000:]
        mos, ifu, bots = child["result"]
        assert mos["rows"] == ["jw01345063001_03101_00001_nrs2"]
        assert ifu["rows"] == ["jw01345062001_03101_00001_nrs1",
                               "jw01345062001_03101_00001_nrs2",
                               "jw01345062001_03101_00002_nrs1"]
        assert bots["rows"] == bots["skipped"] == ["jw02222001001_04102_00001_nrs1"]
        assert server.count("Mast.Caom.Filtered") == 3


def test_astroquery_token_login_and_bad_token(program_dir, tmp_path):
    with MastServer(program_dir, tokens={TOKEN: "Ada Lovelace"}) as server:
        child = query_in_child(server, tmp_path, env={"MAST_API_TOKEN": TOKEN}, modes="FS",
                               after=f"""
try:
    archive.query_mast("1345", archive_url={server.url!r}, token="not-" + {TOKEN!r}, retries=0)
except archive.ArchiveError as exc:
    result["bad_token"] = str(exc)
""")
        assert child["rc"] == 0, child["stderr"][-3000:]
        whoami = [r for r in server.requests if r.target == "whoami"]
        assert [r.authenticated for r in whoami] == [True, False]
        assert all(r.authenticated for r in server.requests[:-1])
        assert child["result"]["bad_token"] == \
            "MAST did not accept the token from MAST_API_TOKEN (whoami answered anonymous)"
        everything = child["stdout"] + child["stderr"] + (tmp_path / "manifest.csv").read_text()
        assert "welcome Ada Lovelace" in child["stderr"]
        assert TOKEN not in everything


def test_astroquery_query_faults_retry_or_fail_clearly(program_dir, tmp_path):
    faults = {"Mast.Caom.Filtered": ["500", "cut"], "Mast.Caom.Products": ["slow"],
              "columnsconfig": ["503"], "whoami": "500"}
    with MastServer(program_dir, faults=faults, tokens={TOKEN: "Ada"},
                    slow_seconds=2.0) as server:
        # transient faults are retried; then a persistent one (whoami) gives a clear error
        child = query_in_child(server, tmp_path, modes="IFU", timeout=1, after=f"""
try:
    archive.query_mast("1345", archive_url={server.url!r}, token={TOKEN!r}, backoff=0.01)
except archive.ArchiveError as exc:
    result["persistent"] = str(exc)
""")
        assert child["rc"] == 0, child["stderr"][-3000:]
        assert len(child["result"]["rows"]) == 3
        seen = [(r.target, r.fault) for r in server.requests if r.fault]
        assert seen == [("columnsconfig", "503"), ("Mast.Caom.Filtered", "500"),
                        ("Mast.Caom.Filtered", "cut"), ("Mast.Caom.Products", "slow")] \
            + [("whoami", "500")] * 4
        assert child["result"]["persistent"] == \
            "MAST login failed after 4 attempts; last error: whoami answered without the " \
            "'anon' field (a server error page?)"
        assert TOKEN not in child["stdout"] + child["stderr"]


# ---------------------------------------------------------------------------------------
# the steps of the rule scripts, run in this process with the arguments the scripts pass
# ---------------------------------------------------------------------------------------
def run_step(name, job, log):
    """``nsclean.workflow.steps.<name>`` as its rule script calls it."""
    from nsclean.workflow import steps

    job = {"params": {}, "wildcards": {}, "input": {}, **job}
    getattr(steps, name)(**job, log=str(log))


@pytest.mark.usefixtures("restore_streams")
def test_rule_steps_with_local_source(program_dir, tmp_path):
    log = tmp_path / "fetch_manifest.log"
    manifest = tmp_path / "01345" / "manifest.tsv"
    config = {"archive": {"source": "local", "local_dir": str(program_dir)}}
    run_step("fetch_manifest", {
        "output": {"manifest": str(manifest)}, "params": {"archive": config["archive"]},
        "wildcards": {"program": "01345"}}, log)
    rows = archive.read_manifest(manifest)
    assert {r.program for r in rows} == {"01345"} and len(rows) == 5
    assert "5 exposures to process" in log.read_text()

    target = tmp_path / "01345" / "archive" / rows[0].cal_file
    status = tmp_path / "01345" / "downloads" / f"{rows[0].cal_file}.json"
    run_fetch_file_step(str(manifest), target, status, tmp_path / "f.log", config["archive"])
    assert target.read_bytes() == (program_dir / rows[0].cal_file).read_bytes()
    assert "fetched" in (tmp_path / "f.log").read_text()
    assert json.loads(status.read_text())["status"] == "ok"


def run_fetch_file_step(manifest, target, status, log, archive_settings):
    run_step("fetch_file", {
        "input": {"manifest": str(manifest)},
        "output": {"file": str(target), "status": str(status)},
        "params": {"archive": archive_settings}}, log)


@pytest.mark.usefixtures("restore_streams")
def test_fetch_file_step_logs_a_clear_401(program_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MAST_API_TOKEN", raising=False)
    products = [p for p in archive.scan_local(program_dir) if p["productFilename"] == RATE]
    for product in products:  # the same file as MAST would list it
        product.update(dataURI=uri(RATE), dataRights="EXCLUSIVE_ACCESS")
    # A rate without its cal, kept for a user mask (missing_cal: user_mask): fetched.
    manifest = archive.write_manifest(archive.build_manifest(products, missing_cal="user_mask"),
                                      tmp_path / "manifest.csv")
    log = tmp_path / "fetch_file.log"
    with MastServer(program_dir, exclusive=[RATE]) as server:
        status = tmp_path / "downloads" / f"{RATE}.json"
        settings = {"url": server.url}
        # A refusal fails this exposure only: a status record says why, the file is an
        # empty placeholder (never partial data), and the job succeeds.
        run_fetch_file_step(manifest, tmp_path / "archive" / RATE, status, log, settings)
        record = json.loads(status.read_text())
        assert record["status"] == "failed"
        assert "a MAST API token is needed" in record["reason"]
        # A file the manifest does not list is a bug of the workflow: the job fails.
        with pytest.raises(archive.ArchiveError, match="unknown_rate.fits is not listed in"):
            run_fetch_file_step(manifest, tmp_path / "archive" / "unknown_rate.fits",
                                status, log, settings)
    assert "a MAST API token is needed" in log.read_text()
    assert (tmp_path / "archive" / RATE).stat().st_size == 0


def test_missing_cal_policies_are_those_the_config_schema_offers():
    """archive.missing_cal: the library accepts exactly the values the workflow's schema
    allows (the library once offered 'user_mask' when the schema rejected it and the
    workflow could not carry it out; the workflow now can, through user_masks)."""
    import yaml

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow" / "schemas"
                             / "config.schema.yaml").read_text())
    offered = schema["properties"]["archive"]["properties"]["missing_cal"]
    assert tuple(offered["enum"]) == archive.MISSING_CAL_POLICIES
    assert offered["default"] == "skip"
    for policy in archive.MISSING_CAL_POLICIES:
        archive.build_manifest([], missing_cal=policy)
    with pytest.raises(ValueError, match="missing_cal must be one of skip, error, user_mask"):
        archive.build_manifest([], missing_cal="ignore")


def test_a_local_file_is_linked_into_place_not_copied(program_dir, tmp_path):
    """The local source puts the archive's file in the results as a hard link (no space,
    no copying) under its final name only when complete; the source is untouched."""
    source = program_dir / RATE
    before = source.read_bytes()
    target = tmp_path / "results" / RATE
    target.parent.mkdir()
    result = archive.download_file(source.resolve().as_uri(), target,
                                   expected_size=len(before))
    assert result.fetched and target.read_bytes() == before
    assert os.path.samefile(source, target)
    assert source.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == [RATE]  # no temporary left
