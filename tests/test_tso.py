"""Tests of time-series (BOTS) products: nsclean.io.tso, the simulator's TSO files, the CLI."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from nsclean import cli
from nsclean.io import exposure as ex
from nsclean.io import tso
from nsclean.io.errors import NSCleanInputError
from nsclean.testing import simulate

datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hdu_layout(path):
    with fits.open(path, memmap=False) as hdul:
        return [(h.name, h.fileinfo()["hdrLoc"], h.fileinfo()["datLoc"],
                 h.fileinfo()["datLoc"] + h.fileinfo()["datSpan"]) for h in hdul]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A 9-integration SUB2048 NRS2 time series in 3 segments, with calints."""
    directory = tmp_path_factory.mktemp("tso")
    ts = simulate.simulate_timeseries("NRS2", 9, seed=11, observation=4)
    rateints, calints = simulate.write_timeseries(ts, directory, segments=3)
    return ts, rateints, calints


@pytest.fixture
def copies(series, tmp_path):
    ts, rateints, calints = series
    work = tmp_path / "in"
    work.mkdir()
    return (ts, [Path(shutil.copy(p, work)) for p in rateints],
            [Path(shutil.copy(p, work)) for p in calints])


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("detector", ["nrs1", "nrs2"])
def test_segment_names_give_the_exposure_stem(detector):
    name = f"jw01366004001_04101_00001-seg002_{detector}_rateints.fits"
    assert tso.parse_product_name(name) == tso.ProductName(
        f"jw01366004001_04101_00001_{detector}", 2, "rateints")
    assert ex.exposure_stem(name) == f"jw01366004001_04101_00001_{detector}"
    assert tso.cleaned_name(name) == \
        f"jw01366004001_04101_00001-seg002_{detector}_nsclean_rateints.fits"
    unsegmented = tso.parse_product_name(f"jw01366004001_04101_00001_{detector}_calints.fits")
    assert (unsegmented.segment, unsegmented.suffix) == (None, "calints")


def test_simulator_writes_tso_products_as_mast_names_them(series, tmp_path):
    ts, rateints, calints = series
    assert [p.name for p in rateints] == [
        f"jw09999004001_03101_00001-seg00{n}_nrs2_rateints.fits" for n in (1, 2, 3)]
    assert [p.name.replace("calints", "rateints") for p in calints] == [p.name for p in rateints]
    headers = [fits.getheader(p) for p in rateints]
    assert [(h["INTSTART"], h["INTEND"], h["NINTS"]) for h in headers] == \
        [(1, 3, 9), (4, 6, 9), (7, 9, 9)]
    with datamodels.open(rateints[1]) as model:
        assert type(model).__name__ == "CubeModel" and model.data.shape == (3, 32, 2048)
    with datamodels.open(calints[0]) as model:
        assert type(model).__name__ == "SlitModel" and model.data.shape[0] == 3
    # a BOTS exposure written as one rate image comes with calints, never a _cal
    sim = simulate.simulate_exposure("bots", "NRS1", seed=2)
    rate, cal = simulate.write_exposure(sim, tmp_path)
    assert cal.name.endswith("_calints.fits") and not list(tmp_path.glob("*_cal.fits"))


# -- reading and errors ------------------------------------------------------------------------


def test_segments_are_put_in_integration_order(series):
    _, rateints, _ = series
    exposure = tso.read_rateints(rateints[::-1])
    assert exposure.stem == "jw09999004001_03101_00001_nrs2"
    assert [s.path for s in exposure.segments] == rateints
    assert exposure.n_integrations == 9 and exposure.image_shape == (32, 2048)


def test_rateints_given_as_a_rate_says_what_it_is(series):
    _, rateints, _ = series
    with pytest.raises(NSCleanInputError) as error:
        ex.read_rate(rateints[0])
    message = str(error.value)
    assert message.startswith(str(rateints[0])) and "rateints" in message
    assert "swapped" not in message and "\n" not in message


def test_missing_middle_segment_is_named(series):
    _, rateints, _ = series
    with pytest.raises(NSCleanInputError, match=r"segment seg002 of exposure "
                                                r"jw09999004001_03101_00001_nrs2 is missing"):
        tso.read_rateints([rateints[0], rateints[2]])


def test_missing_last_segment_is_found_from_nints(series):
    _, rateints, _ = series
    with pytest.raises(NSCleanInputError, match=r"integrations 7-9 of NINTS 9 are in no given "
                                                r"file: a segment after seg002"):
        tso.read_rateints(rateints[:2])


def test_segments_of_two_exposures_are_refused(series, tmp_path):
    _, rateints, _ = series
    other = simulate.simulate_timeseries("NRS1", 2, seed=3, observation=5)
    (other_path,), _ = simulate.write_timeseries(other, tmp_path, calints=False)
    with pytest.raises(NSCleanInputError, match="different exposures"):
        tso.read_rateints([rateints[0], other_path])


def test_mismatched_calints_gives_one_line_and_no_output(copies, tmp_path):
    _, rateints, _ = copies
    other = simulate.simulate_timeseries("NRS1", 9, seed=4, observation=4)
    _, wrong = simulate.write_timeseries(other, tmp_path / "other", segments=3)
    out = tmp_path / "out"
    with pytest.raises(NSCleanInputError) as error:
        tso.clean_rateints(rateints, out, calints_paths=wrong[:1])
    message = str(error.value)
    assert message.startswith(str(wrong[0])) and "\n" not in message
    assert "does not match rateints" in message and "DETECTOR: rate NRS2, cal NRS1" in message
    assert not out.exists() or not list(out.iterdir())


def test_calints_segment_with_other_integrations_is_a_mismatch(copies, tmp_path):
    _, rateints, calints = copies
    with fits.open(calints[1], mode="update") as hdul:
        hdul[0].header["INTSTART"] = 5
    with pytest.raises(NSCleanInputError, match="INTSTART: rateints 4, calints 5"):
        tso.clean_rateints(rateints, tmp_path / "out", calints_paths=calints)


# -- cleaning ---------------------------------------------------------------------------------


def test_clean_rateints_keeps_every_hdu_and_records_provenance(copies, tmp_path):
    ts, rateints, calints = copies
    before = [sha256(p) for p in rateints + calints]
    out = tmp_path / "out"
    summary = tso.clean_rateints(rateints, out, calints_paths=calints, save_model=True,
                                 save_mask=True, workers=1)
    assert [sha256(p) for p in rateints + calints] == before  # inputs untouched
    cleaned = [out / tso.cleaned_name(p) for p in rateints]
    assert set(map(str, cleaned)) <= set(summary["outputs"])
    assert (out / f"{ts.stem}_mask.fits").is_file()
    assert summary["n_integrations"] == 9 and summary["segments"] == 3
    assert summary["fit"]["n_lines"] > 0
    for source, product in zip(rateints, cleaned, strict=True):
        layout_in, layout_out = hdu_layout(source), hdu_layout(product)
        assert [h[0] for h in layout_in] == [h[0] for h in layout_out]
        raw_in, raw_out = source.read_bytes(), product.read_bytes()
        for (name, h0, d0, d1), (_, k0, e0, e1) in zip(layout_in[1:], layout_out[1:],
                                                       strict=True):
            assert raw_in[h0:d0] == raw_out[k0:e0], f"{name} header changed"
            if name != "SCI":
                assert raw_in[d0:d1] == raw_out[e0:e1], f"{name} data changed"
        header = fits.getheader(product)
        assert header["S_NSCLEN"] == "COMPLETE" and header["NSCNINTS"] == 3
        assert header["INTSTART"] == fits.getheader(source)["INTSTART"]
        assert header["NSCMCAL"].startswith(calints[0].name)
        with datamodels.open(product) as model:
            assert type(model).__name__ == "CubeModel" and model.data.shape == (3, 32, 2048)
        model_file = out / product.name.replace("_nsclean_rateints", "_flicker_noise")
        with fits.open(source) as a, fits.open(product) as b, fits.open(model_file) as m:
            finite = np.isfinite(a["SCI"].data)
            assert np.array_equal(finite, np.isfinite(b["SCI"].data))
            np.testing.assert_allclose(b["SCI"].data[finite],
                                       (a["SCI"].data - m["SCI"].data)[finite], atol=1e-6)


def test_every_integration_is_cleaned_against_the_truth(copies, tmp_path):
    ts, rateints, calints = copies
    summary = tso.clean_rateints(rateints, tmp_path / "out", calints_paths=calints, workers=2)
    removed = np.concatenate([
        fits.getdata(p, "SCI").astype(np.float64) - fits.getdata(q, "SCI")
        for p, q in zip(rateints, summary["outputs"], strict=True)])
    truth = ts.noise_correlated
    dark = ~ts.base.illuminated & np.isfinite(ts.base.rate)
    for index in range(ts.n_integrations):  # each plane has its own noise, and its own fit
        before = np.std(truth[index][dark])
        after = np.std((truth[index] - removed[index])[dark])
        assert after < 0.85 * before, (index, before, after)
    # the planes' models differ: integrations were not given one shared model
    assert not np.allclose(removed[0], removed[1])


def test_processes_and_one_process_give_the_same_products(copies, tmp_path):
    _, rateints, calints = copies
    one = tso.clean_rateints(rateints, tmp_path / "one", calints_paths=calints, workers=1)
    two = tso.clean_rateints(rateints, tmp_path / "two", calints_paths=calints, workers=2)
    for a, b in zip(one["outputs"], two["outputs"], strict=True):
        np.testing.assert_array_equal(fits.getdata(a, "SCI"), fits.getdata(b, "SCI"))
    assert one["fit"] == two["fit"]


@pytest.mark.parametrize("subarray", ["SUB2048", "SUB1024A", "SUB1024B", "SUB512", "SUB32"])
@pytest.mark.parametrize("detector", ["NRS1", "NRS2"])
def test_every_bots_subarray_on_both_detectors(subarray, detector, tmp_path):
    ts = simulate.simulate_timeseries(detector, 2, seed=5, subarray=subarray)
    (rateints,), (calints,) = simulate.write_timeseries(ts, tmp_path / "in")
    assert "-seg" not in rateints.name
    summary = tso.clean_rateints(rateints, tmp_path / "out", calints_paths=calints, workers=1)
    (product,) = summary["outputs"]
    assert summary["subarray"] == subarray and summary["detector"] == detector
    with datamodels.open(product) as model:
        assert model.data.shape == ts.rates.shape
        assert model.meta.subarray.name == subarray


def test_a_failing_segment_leaves_no_product(copies, tmp_path):
    _, rateints, calints = copies
    out = tmp_path / "out"
    blocked = out / tso.cleaned_name(rateints[1])
    blocked.mkdir(parents=True)  # the second product cannot be written
    with pytest.raises(OSError):
        tso.clean_rateints(rateints, out, calints_paths=calints, overwrite=True, workers=1)
    assert sorted(p.name for p in out.iterdir()) == [blocked.name]


def test_user_mask_alone_cleans_a_time_series(copies, tmp_path):
    ts, rateints, calints = copies
    mask_file = tmp_path / "mask.fits"
    tso.make_rateints_mask(calints[:1], rateints, mask_file)
    summary = tso.clean_rateints(rateints, tmp_path / "out", mask_path=mask_file, workers=1)
    assert summary["mask_source"] == "user" and len(summary["outputs"]) == 3


# -- command line -----------------------------------------------------------------------------


def test_cli_cleans_segments_with_their_calints(copies, tmp_path, capsys):
    _, rateints, calints = copies
    out = tmp_path / "cleaned"
    status = cli.main(["clean", *map(str, rateints), "--cal", str(calints[0]), "-o", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted(tso.cleaned_name(p)
                                                           for p in rateints)


def test_cli_missing_segment_is_one_line(copies, tmp_path, capsys):
    _, rateints, calints = copies
    out = tmp_path / "cleaned"
    status = cli.main(["clean", str(rateints[0]), str(rateints[2]), "--cal", str(calints[0]),
                       "-o", str(out)])
    err = capsys.readouterr().err
    assert status == cli.EXIT_INPUT
    assert err.count("\n") == 1 and "seg002" in err and "missing" in err
    assert not out.exists()
