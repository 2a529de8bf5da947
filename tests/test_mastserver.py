"""The loopback MAST server, spoken to with plain requests (the astroquery client is
exercised in test_archive.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace
from urllib.parse import quote

import pytest
import requests
from archive_helpers import EXPOSURES

from nsclean.testing.mastserver import MastServer, build_catalogue

pytestmark = pytest.mark.usefixtures("loopback_only")

TIMEOUT = (2.0, 5.0)


def invoke(server, service, params, *, page=1, pagesize=50000, breaker="b1"):
    request = {"service": service, "params": params, "format": "json", "page": page,
               "pagesize": pagesize, "cacheBreaker": breaker}
    body = "request=" + quote(json.dumps(request))
    response = requests.post(f"{server.url}/api/v0/invoke", data=body, timeout=TIMEOUT,
                             headers={"Content-type": "application/x-www-form-urlencoded"})
    response.raise_for_status()
    return response.json()


def download_url(server, name):
    return f"{server.url}/api/v0.1/Download/file?uri=mast:JWST/product/{name}"


def test_catalogue_follows_jwst_caom_conventions(program_dir):
    catalogue = build_catalogue(program_dir)
    by_id = {row["obs_id"]: row for row in catalogue.observations}
    level3 = by_id["jw01345-o062_t001_nirspec_prism-clear"]
    assert level3["calib_level"] == 3
    assert level3["instrument_name"] == "NIRSPEC/IFU"
    assert level3["proposal_id"] == "1345"  # no leading zeros in MAST
    assert level3["filters"] == "CLEAR;PRISM"
    level2 = by_id["jw01345062001_03101_00001_nrs2"]
    assert level2["calib_level"] == 2
    assert by_id["jw01345063001_03101_00001_nrs1"]["instrument_name"] == "NIRSPEC/MSA"
    assert by_id["jw02222001001_04102_00001_nrs1"]["dataproduct_type"] == "timeseries"
    # the level-3 row holds the products of its three exposures, the level-2 row its own
    assert len(catalogue.products_by_obsid[level3["obsid"]]) == 6
    names = {p["productFilename"] for p in catalogue.products_by_obsid[level2["obsid"]]}
    assert names == {"jw01345062001_03101_00001_nrs2_rate.fits",
                     "jw01345062001_03101_00001_nrs2_cal.fits"}
    assert len(catalogue.observations) == 3 + len(EXPOSURES)


def test_filtered_query_paging_and_executing(program_dir):
    with MastServer(program_dir, executing_polls=1) as server:
        filters = [{"paramName": "proposal_id", "values": ["1345"]},
                   {"paramName": "instrument_name", "values": ["NIRSPEC/IFU"]}]
        first = invoke(server, "Mast.Caom.Filtered", {"columns": "*", "filters": filters},
                       pagesize=3)
        assert first["status"] == "EXECUTING"
        page1 = invoke(server, "Mast.Caom.Filtered", {"columns": "*", "filters": filters},
                       pagesize=3)
        assert page1["status"] == "COMPLETE"
        assert page1["paging"] == {"page": 1, "pageSize": 3, "pagesFiltered": 2, "rows": 3,
                                   "rowsFiltered": 4, "rowsTotal": 4}
        invoke(server, "Mast.Caom.Filtered", {"columns": "*", "filters": filters},
               page=2, pagesize=3)  # EXECUTING again: a new page is a new request
        page2 = invoke(server, "Mast.Caom.Filtered", {"columns": "*", "filters": filters},
                       page=2, pagesize=3)
        ids = [r["obs_id"] for r in page1["data"] + page2["data"]]
        assert len(ids) == len(set(ids)) == 4
        assert all(r["instrument_name"] == "NIRSPEC/IFU" for r in page1["data"])
        bad = {"filters": [{"paramName": "nonsense", "values": ["x"]}]}
        assert invoke(server, "Mast.Caom.Filtered", bad, breaker="b2")["status"] == "EXECUTING"
        assert invoke(server, "Mast.Caom.Filtered", bad, breaker="b2")["status"] == "ERROR"
        assert [r.executing for r in server.requests] == [True, False, True, False, True, False]


def test_download_head_get_and_content_length(program_dir):
    name = "jw01345062001_03101_00001_nrs1_rate.fits"
    with MastServer(program_dir) as server:
        head = requests.head(download_url(server, name), timeout=TIMEOUT)
        assert head.status_code == 200
        assert int(head.headers["Content-Length"]) == (program_dir / name).stat().st_size
        got = requests.get(download_url(server, name), timeout=TIMEOUT)
        assert got.content == (program_dir / name).read_bytes()
        missing = requests.get(download_url(server, "jw_nothing_rate.fits"), timeout=TIMEOUT)
        assert missing.status_code == 404
        assert server.count(name, "HEAD") == 1 and server.count(name, "GET") == 1


def test_exclusive_files_need_a_valid_token(program_dir):
    name = "jw01345063001_03101_00001_nrs1_cal.fits"
    with MastServer(program_dir, exclusive=[name], tokens={"good-token": "Ada"}) as server:
        assert requests.get(download_url(server, name), timeout=TIMEOUT).status_code == 401
        assert requests.get(download_url(server, name), cookies={"mast_token": "bad"},
                            timeout=TIMEOUT).status_code == 401
        ok = requests.get(download_url(server, name), cookies={"mast_token": "good-token"},
                          timeout=TIMEOUT)
        assert ok.status_code == 200
        assert requests.get(f"{server.url}/whoami", timeout=TIMEOUT).json()["anon"] is True
        me = requests.get(f"{server.url}/whoami", cookies={"mast_token": "good-token"},
                          timeout=TIMEOUT).json()
        assert me["anon"] is False and me["attrib"]["display_name"] == "Ada"
        assert "good-token" not in repr(server.requests)
        products = server.catalogue.products_by_obsid
        rights = {p["productFilename"]: p["dataRights"] for ps in products.values() for p in ps}
        assert rights[name] == "EXCLUSIVE_ACCESS"
        assert rights["jw01345063001_03101_00001_nrs1_rate.fits"] == "PUBLIC"


def test_faults_are_consumed_one_per_request(program_dir):
    name = "jw01345062001_03101_00001_nrs1_rate.fits"
    size = (program_dir / name).stat().st_size
    with MastServer(program_dir, faults={name: ["500", "wrong_size", "cut"]},
                    slow_seconds=0.3) as server:
        url = download_url(server, name)
        assert requests.get(url, timeout=TIMEOUT).status_code == 500
        short = requests.get(url, timeout=TIMEOUT)
        assert short.status_code == 200
        assert int(short.headers["Content-Length"]) == len(short.content) == size - 100
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(url, timeout=TIMEOUT).content  # noqa: B018 - reading is the test
        assert len(requests.get(url, timeout=TIMEOUT).content) == size  # faults used up
        server.add_faults(name, ["slow"])
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url, timeout=(2.0, 0.1)).content  # noqa: B018
        assert time.monotonic() - started < 2.0
        assert [r.fault for r in server.requests] == ["500", "wrong_size", "cut", "", "slow"]


def test_persistent_fault_and_service_faults(program_dir):
    name = "jw01345062001_03101_00001_nrs1_cal.fits"
    with MastServer(program_dir, faults={name: "503", "Mast.Caom.Filtered": ["500"]}) as server:
        for _ in range(3):
            assert requests.get(download_url(server, name), timeout=TIMEOUT).status_code == 503
        with pytest.raises(requests.HTTPError):
            invoke(server, "Mast.Caom.Filtered", {"filters": []})
        assert invoke(server, "Mast.Caom.Filtered", {"filters": []})["status"] == "COMPLETE"
        with pytest.raises(ValueError, match="unknown fault"):
            server.add_faults(name, ["explode"])


def test_binds_loopback_only(program_dir):
    with pytest.raises(ValueError):
        MastServer(program_dir, host="0.0.0.0")
    with MastServer(program_dir) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.port > 0


def test_command_line_prints_url_and_serves(program_dir, tmp_path):
    name = "jw01345062001_03101_00001_nrs1_rate.fits"
    (tmp_path / "tokens").write_text("cli-secret-token\n")
    process = subprocess.Popen([sys.executable, "-m", "nsclean.testing.mastserver", "--root",
                                str(program_dir), "--port", "0", "--exclusive", name,
                                "--token-file", str(tmp_path / "tokens")],
                               stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "serving 12 files" in line and "cli-secret-token" not in line
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        assert requests.get(f"{url}/whoami", timeout=TIMEOUT).json()["anon"] is True
        server = SimpleNamespace(url=url)
        assert requests.get(download_url(server, name), timeout=TIMEOUT).status_code == 401
        assert requests.get(download_url(server, name), cookies={"mast_token": "cli-secret-token"},
                            timeout=TIMEOUT).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
