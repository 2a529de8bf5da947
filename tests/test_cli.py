"""Tests of the ``nsclean`` command line (nsclean.cli)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from nsclean import cli
from nsclean.testing import simulate


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli_src")
    sim = simulate.simulate_exposure("fs", "NRS2", readout="NRS", subarray="SUB512", seed=5)
    rate, cal = simulate.write_exposure(sim, directory)
    return sim, rate, cal


@pytest.fixture
def files(source_files, tmp_path):
    sim, rate, cal = source_files
    work = tmp_path / "in"
    work.mkdir()
    return sim, Path(shutil.copy(rate, work)), Path(shutil.copy(cal, work))


def run(argv, capsys):
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_help_speaks_to_astronomers(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for words in ("NIRSpec", "_rate.fits", "nsclean mask", "nsclean clean", "background"):
        assert words in text
    for command in ("mask", "clean", "png2mask"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        assert "usage: nsclean " + command in capsys.readouterr().out


def test_mask_then_clean(files, tmp_path, capsys):
    sim, rate, cal = files
    before = sha256(rate), sha256(cal)
    mask = tmp_path / "out" / "mask.fits"
    png = tmp_path / "out" / "mask.png"
    status, out, err = run(["mask", cal, rate, "-o", mask, "--png", png, "--dilate", "3"], capsys)
    assert status == 0, err
    assert "wrote" in out and mask.exists() and png.exists()
    assert fits.getheader(mask)["NSCMDIL"] == 3
    cleaned = tmp_path / "out" / "cleaned_rate.fits"
    status, out, err = run(
        [
            "clean",
            rate,
            "--mask",
            mask,
            "-o",
            cleaned,
            "--save-model",
            "--json",
            "--method",
            "median",
        ],
        capsys,
    )
    assert status == 0, err
    summary = json.loads(out)
    assert summary["fit_options"]["method"] == "median"
    assert summary["mask_options"]["dilation_radius"] == 3  # read back from the mask file
    header = fits.getheader(cleaned)
    assert header["S_NSCLEN"] == "COMPLETE" and header["NSCFMETH"] == "median"
    assert (tmp_path / "out" / f"{sim.stem}_flicker_noise.fits").exists()
    assert (sha256(rate), sha256(cal)) == before


def test_clean_with_cal_builds_the_mask(files, tmp_path, capsys):
    _, rate, cal = files
    out = tmp_path / "c.fits"
    status, _, err = run(["clean", rate, "--cal", cal, "-o", out, "--clip", "0"], capsys)
    assert status == 0, err
    assert fits.getheader(out)["NSCMCLIP"] == "NONE"
    assert fits.getheader(out)["NSCFADPT"] is True


def test_every_fit_option_reaches_the_fit(files, tmp_path, capsys):
    _, rate, cal = files
    out = tmp_path / "plain.fits"
    status, _, err = run(
        ["clean", rate, "--cal", cal, "-o", out, "--no-adaptive", "--outlier-iterations", "2",
         "--chunk-length", "1024"],
        capsys,
    )
    assert status == 0, err
    header = fits.getheader(out)
    assert header["NSCFADPT"] is False
    assert header["NSCFOITR"] == 2 and header["NSCFCHNK"] == 1024


def test_png2mask_converts_a_hand_shaded_png(files, tmp_path, capsys):
    from PIL import Image

    sim, rate, _ = files
    background = np.zeros(sim.rate.shape, bool)
    background[:, :200] = True
    grey = np.full(sim.rate.shape + (3,), 128, np.uint8)
    grey[background] = (166, 90, 90)  # 30 % red over grey
    png = tmp_path / "hand.png"
    Image.fromarray(grey[::-1]).save(png)  # as exported from DS9: row 1 at the bottom
    out = tmp_path / "hand.fits"
    status, _, err = run(["png2mask", png, "-o", out, "--rate", rate], capsys)
    assert status == 0, err
    np.testing.assert_array_equal(fits.getdata(out).astype(bool), background)
    assert fits.getheader(out)["DETECTOR"] == "NRS2"


def test_existing_output_needs_overwrite(files, tmp_path, capsys):
    _, rate, cal = files
    out = tmp_path / "mask.fits"
    out.write_text("precious")
    status, _, err = run(["mask", cal, rate, "-o", out], capsys)
    assert status == 1 and "exists" in err
    assert out.read_text() == "precious"
    status, _, err = run(["mask", cal, rate, "-o", out, "--overwrite"], capsys)
    assert status == 0, err


def _truncate(rate, cal):
    rate.write_bytes(rate.read_bytes()[:20000])
    return rate


def _not_nirspec(rate, cal):
    with fits.open(rate, mode="update") as hdul:
        hdul[0].header["INSTRUME"] = "MIRI"
    return rate


def _no_dq(rate, cal):
    with fits.open(rate) as hdul:
        kept = fits.HDUList([h.copy() for h in hdul if h.name != "DQ"])
    kept.writeto(rate, overwrite=True)
    return rate


def _nan(rate, cal):
    with fits.open(rate, mode="update") as hdul:
        hdul["SCI"].data[...] = np.nan
    return rate


def _other_exposure(rate, cal):
    with fits.open(cal, mode="update") as hdul:
        hdul[0].header["EXPOSURE"] = "7"
    return cal


def _unknown_subarray(rate, cal):
    with fits.open(rate, mode="update") as hdul:
        hdul[0].header["SUBARRAY"] = "SUBWHATEVER"
    return rate


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_truncate, "truncated"),
        (_not_nirspec, "not a NIRSpec exposure"),
        (_no_dq, "no DQ extension"),
        (_nan, "no finite pixel"),
        (_other_exposure, "EXPOSURE: rate 1, cal 7"),
        (_unknown_subarray, "unknown NIRSpec subarray SUBARRAY = SUBWHATEVER"),
    ],
)
@pytest.mark.parametrize("command", ["mask", "clean"])
def test_bad_input_one_line_nonzero_no_output(files, tmp_path, capsys, damage, words, command):
    _, rate, cal = files
    bad = damage(rate, cal)
    out = tmp_path / "out" / "result.fits"
    if command == "mask":
        argv = ["mask", cal, rate, "-o", out, "--png", tmp_path / "out" / "q.png"]
    else:
        argv = ["clean", rate, "--cal", cal, "-o", out, "--save-mask", "--save-model"]
    status, out_text, err = run(argv, capsys)
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nsclean: error: {bad}:") and words in lines[0]
    assert out_text == ""
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_clean_without_any_mask_is_refused(files, tmp_path, capsys):
    _, rate, _ = files
    status, _, err = run(["clean", rate, "-o", tmp_path / "x.fits"], capsys)
    assert status == 1 and "--mask" in err and "--cal" in err
    assert not (tmp_path / "x.fits").exists()


def test_bad_option_value_is_a_usage_error(files, tmp_path, capsys):
    _, rate, cal = files
    status, _, err = run(["mask", cal, rate, "-o", tmp_path / "m.fits", "--dilate", "-2"], capsys)
    assert status == 2 and "dilation_radius" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["clean", str(rate), "-o", "x.fits", "--method", "wavelet"])
    assert info.value.code == 2


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).parent / "nsclean"
    result = subprocess.run(
        [str(script), "clean", str(tmp_path / "missing_rate.fits"), "--cal", "x", "-o", "y"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "missing_rate.fits: file not found" in result.stderr
