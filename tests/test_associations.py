"""Stage-2 associations rewritten to point at the cleaned rates (offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nsclean.archive.associations import (
    AssociationError,
    read_association,
    rewrite_spec2_association,
    write_association,
)

SCIENCE = "jw01345062001_03101_00001_nrs1"
BACKGROUND = "jw01345062001_03101_00002_nrs1"
IMPRINT = "jw01345062001_03103_00001_nrs1"


def association():
    """An IFU spec2 association as the archive writes them: two science exposures, each
    with the other as background and a shared imprint (leakcal) exposure."""
    def product(science, background):
        return {"name": science, "members": [
            {"expname": f"{science}_rate.fits", "exptype": "science", "exposerr": "null"},
            {"expname": f"{background}_rate.fits", "exptype": "background"},
            {"expname": f"{IMPRINT}_rate.fits", "exptype": "imprint"},
            # (not an exposure's rate file: left as it is)
            {"expname": "jw01345-o062_t001_cat.ecsv", "exptype": "sourcecat"},
        ]}

    return {"asn_type": "spec2", "asn_rule": "Asn_Lv2SpecSpecial", "version_id": "x",
            "code_version": "1.14.0", "degraded_status": "No known degraded exposures",
            "program": "01345", "constraints": "none", "asn_id": "o062", "target": "t001",
            "asn_pool": "jw01345_pool.csv",
            "products": [product(SCIENCE, BACKGROUND), product(BACKGROUND, SCIENCE)]}


@pytest.fixture
def files(tmp_path):
    source = tmp_path / "archive" / "jw01345-o062_20230101t000000_spec2_00001_asn.json"
    source.parent.mkdir()
    source.write_text(json.dumps(association()))
    cleaned = {}
    for stem in (SCIENCE, BACKGROUND, IMPRINT):
        path = tmp_path / "results" / "01345" / stem / f"{stem}_nsclean_rate.fits"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        cleaned[stem] = path
    return source, cleaned


def test_every_exposure_member_points_at_its_cleaned_file(files, tmp_path):
    source, cleaned = files
    original = read_association(source)
    out_dir = tmp_path / "results" / "01345" / "stage2"
    rewritten = rewrite_spec2_association(original, cleaned, out_dir, source=source.name)
    assert original == association()  # the input is not modified
    for product in rewritten["products"]:
        kinds = {m["exptype"]: m["expname"] for m in product["members"]}
        for kind in ("science", "background", "imprint"):
            target = (out_dir / kinds[kind]).resolve()
            assert target in {p.resolve() for p in cleaned.values()}, kind
            assert not os.path.isabs(kinds[kind])
        assert kinds["sourcecat"] == "jw01345-o062_t001_cat.ecsv"  # not an exposure: kept
    assert rewritten["products"][0]["members"][0]["expname"] == \
        f"../{SCIENCE}/{SCIENCE}_nsclean_rate.fits"
    assert rewritten["nsclean"]["source"] == source.name
    path = write_association(rewritten, out_dir / source.name)
    assert read_association(path) == rewritten


def test_a_member_that_was_not_cleaned_refuses_the_association(files, tmp_path):
    source, cleaned = files
    del cleaned[IMPRINT]
    with pytest.raises(AssociationError) as error:
        rewrite_spec2_association(read_association(source), cleaned, tmp_path,
                                  source=source.name)
    message = str(error.value)
    assert message.startswith(source.name) and "\n" not in message
    assert f"imprint {IMPRINT}_rate.fits" in message


def test_unreadable_associations_are_named(tmp_path):
    bad = tmp_path / "bad_asn.json"
    bad.write_text("{not json")
    with pytest.raises(AssociationError, match="bad_asn.json: not a readable association"):
        read_association(bad)
    empty = tmp_path / "empty_asn.json"
    empty.write_text(json.dumps({"products": []}))
    with pytest.raises(AssociationError, match="no products"):
        read_association(empty)


def test_jwst_loads_the_rewritten_association_and_finds_the_files(files, tmp_path):
    pytest.importorskip("jwst", reason="needs the [jwst] extra: pip install -e '.[jwst]'")
    from jwst.associations import load_asn

    source, cleaned = files
    out_dir = tmp_path / "results" / "01345" / "stage2"
    path = write_association(
        rewrite_spec2_association(read_association(source), cleaned, out_dir,
                                  source=source.name), out_dir / source.name)
    with open(path) as handle:
        asn = load_asn(handle)  # validated against jwst's level-2 association schemas
    for product in asn["products"]:
        for member in product["members"]:
            if member["exptype"] != "sourcecat":
                assert (Path(path).parent / member["expname"]).is_file()


def test_spec2_associations_are_found_in_mast_and_in_a_directory(tmp_path):
    """The loopback MAST serves association files as products (ASN) of the program's
    level-3 observations; the real astroquery client finds the spec2 ones."""
    import network_guard
    from archive_helpers import make_program, run_child

    from nsclean.archive.associations import find_spec2_associations
    from nsclean.testing.mastserver import MastServer

    network_guard.install()
    make_program(tmp_path, exposures=[(SCIENCE, "NRS_IFU", "G395H", "F290LP", "FULL")])
    spec2 = "jw01345-o062_20230101t000000_spec2_00001_asn.json"
    (tmp_path / spec2).write_text(json.dumps(association()))
    (tmp_path / "jw01345-o062_20230101t000000_spec3_00001_asn.json").write_text("{}")
    (tmp_path / "jw02222-o001_20230101t000000_spec2_00001_asn.json").write_text("{}")
    local = find_spec2_associations(["1345"], source="local", local_dir=tmp_path)
    assert [a["productFilename"] for a in local] == [spec2]
    with MastServer(tmp_path) as server:
        child = run_child(f"""
from nsclean.archive import archive
from nsclean.archive.associations import find_spec2_associations
archive.configure_mast_server({server.url!r})
result = find_spec2_associations(["1345"], archive_url={server.url!r}, backoff=0.01)
""", timeout=60)
    assert child["rc"] == 0, child["stderr"][-3000:]
    (found,) = child["result"]
    assert found == {"productFilename": spec2, "dataURI": f"mast:JWST/product/{spec2}",
                     "size": (tmp_path / spec2).stat().st_size}
    assert not network_guard.ATTEMPTS
