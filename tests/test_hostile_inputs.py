"""Broken and hostile input files: a local archive directory with damaged files, masks
that are not masks, a gzip bomb named .fits, and CLI commands whose second output
cannot be written.  Real files, the real ``nsclean`` command (in a subprocess) and the
library's readers."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from archive_helpers import make_program, run_child
from astropy.io import fits

from nsclean.archive import archive
from nsclean.io.errors import NSCleanInputError
from nsclean.io.exposure import read_mask, read_rate
from nsclean.testing import simulate

STEM = "jw01345062001_03101_00001_nrs1"


# ---------------------------------------------------------------------------------------
# archive.source: local with damaged files
# ---------------------------------------------------------------------------------------
@pytest.fixture
def damaged_dir(tmp_path):
    """The small test programme, with three kinds of damage next to good files."""
    directory = tmp_path / "local"
    make_program(directory)
    # an interrupted copy: the cal file is empty
    (directory / "jw01345062001_03101_00002_nrs1_cal.fits").write_bytes(b"")
    # a web page saved under a rate file's name
    (directory / "jw01345063001_03101_00001_nrs2_rate.fits").write_text(
        "<!DOCTYPE html><html><body>Sign in to MAST</body></html>\n")
    # a browser's second copy of a good file
    shutil.copy(directory / f"{STEM}_rate.fits", directory / f"{STEM} (1)_rate.fits")
    # half a FITS header
    good = (directory / "jw01345062001_03101_00001_nrs2_rate.fits").read_bytes()
    (directory / "jw01345062001_03101_00001_nrs2_rate.fits").write_bytes(good[:1000])
    return directory


def test_a_local_directory_with_damaged_files_gives_failed_and_skipped_rows(damaged_dir):
    before = {p.name: p.read_bytes() for p in damaged_dir.iterdir()}
    manifest = archive.fetch_manifest("1345", source="local", local_dir=damaged_dir)
    rows = {row.stem: row for row in manifest.rows}
    assert rows["jw01345062001_03101_00002_nrs1"].status == "failed"
    assert "is empty (0 bytes" in rows["jw01345062001_03101_00002_nrs1"].reason
    assert rows["jw01345063001_03101_00001_nrs2"].status == "failed"
    assert "HTML page" in rows["jw01345063001_03101_00001_nrs2"].reason
    assert rows["jw01345062001_03101_00001_nrs2"].status == "failed"
    assert "not a readable FITS file" in rows["jw01345062001_03101_00001_nrs2"].reason
    copy = rows[f"{STEM} (1)"]
    assert copy.status == "skipped" and "(1)" in copy.reason
    # the good exposures are there, to be processed
    assert rows[STEM].status == "ok"
    assert rows["jw01345063001_03101_00001_nrs1"].status == "ok"
    assert {p.name: p.read_bytes() for p in damaged_dir.iterdir()} == before


# ---------------------------------------------------------------------------------------
# masks that are not masks
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bots(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bots")
    sim = simulate.simulate_exposure("bots", "NRS1", readout="NRS", seed=3)
    rate, cal = simulate.write_exposure(sim, directory)
    DIGESTS.update({path: path.read_bytes() for path in (rate, cal)})
    return rate, cal


DIGESTS: dict = {}


def write_image(path, data, **header):
    hdu = fits.PrimaryHDU(data)
    for key, value in header.items():
        hdu.header[key] = value
    hdu.writeto(path)
    return path


@pytest.mark.parametrize(("kind", "problem"), [
    ("nan", "NaN"), ("inf", "infinite"), ("float", "not 0 or 1"), ("int", "not 0 or 1"),
    ("negative", "not 0 or 1")])
def test_a_mask_must_be_boolean_or_zero_one(bots, tmp_path, kind, problem):
    rate = read_rate(bots[0])
    shape = rate.sci.shape
    data = np.ones(shape, np.float32)
    if kind == "nan":
        data[0, :10] = np.nan
    elif kind == "inf":
        data[1, :3] = np.inf
    elif kind == "float":
        data[:, ::2] = 0.5
    elif kind == "int":
        data = np.full(shape, 7, np.int16)
    elif kind == "negative":
        data = np.zeros(shape, np.int32)
        data[0, 0] = -1
    path = write_image(tmp_path / "mask.fits", data)
    with pytest.raises(NSCleanInputError, match=problem) as error:
        read_mask(path, rate)
    assert str(path) in str(error.value)


def test_the_rate_file_is_not_a_mask(bots):
    rate = read_rate(bots[0])
    with pytest.raises(NSCleanInputError, match="not a mask"):
        read_mask(bots[0], rate)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int32, np.float32])
def test_zero_one_masks_of_any_type_and_a_jwst_mask_model_are_read(bots, tmp_path, dtype):
    from stdatamodels.jwst import datamodels

    rate = read_rate(bots[0])
    expected = np.zeros(rate.sci.shape, bool)
    expected[:, ::3] = True
    path = write_image(tmp_path / "mask.fits", expected.astype(np.uint8 if dtype is bool
                                                                else dtype))
    mask, _ = read_mask(path, rate)
    assert mask.dtype == bool and np.array_equal(mask, expected)
    # jwst's clean_flicker_noise saves its mask as an ImageModel (SCI = 0/1 float)
    model = datamodels.ImageModel(data=expected.astype(np.float32))
    model.save(tmp_path / "jwst_mask.fits")
    mask, _ = read_mask(tmp_path / "jwst_mask.fits", rate)
    assert np.array_equal(mask, expected)


def run_cli(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "nsclean.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          check=False)


def test_the_cli_refuses_a_rate_file_given_as_mask(bots, tmp_path):
    out = tmp_path / "clean_rate.fits"
    done = run_cli("clean", bots[0], "--mask", bots[0], "-o", out)
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "not a mask" in done.stderr and str(bots[0]) in done.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# a gzip bomb and absurd declared sizes
# ---------------------------------------------------------------------------------------
def bomb(path, shape=(65536, 16384)):
    """A gzip file, named .fits, of a FITS header declaring ``shape`` float32 and
    (part of) its data: small on disk, gigabytes once decompressed."""
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = -32
    header["NAXIS"] = 2
    header["NAXIS1"] = shape[1]
    header["NAXIS2"] = shape[0]
    header["INSTRUME"] = "NIRSPEC"
    header["DETECTOR"] = "NRS1"
    zeros = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(header.tostring().encode())
        for _ in range(256):  # 256 MiB of zeros: ~0.25 MB compressed
            handle.write(zeros)
    return path


@pytest.mark.parametrize("reader", ["rate", "mask", "cli"])
def test_a_gzip_bomb_is_refused_before_it_is_decompressed(tmp_path, reader, bots):
    path = bomb(tmp_path / f"{STEM}_rate.fits")
    assert path.stat().st_size < 2_000_000
    started = time.process_time()
    if reader == "cli":
        children = time.monotonic()
        done = run_cli("clean", path, "--mask", path, "-o", tmp_path / "out.fits")
        seconds = time.monotonic() - children
        assert done.returncode == 1 and "compressed" in done.stderr, done.stderr
        assert seconds < 10
        return
    with pytest.raises(NSCleanInputError, match="compressed") as error:
        if reader == "rate":
            read_rate(path)
        else:
            read_mask(path, read_rate(bots[0]))
    assert str(path) in str(error.value)
    assert time.process_time() - started < 1.0


def test_a_plain_fits_declaring_more_data_than_a_nirspec_product_is_refused(tmp_path):
    # 65536 x 65536 float64 = 32 GiB declared; the file itself is one header
    header = fits.Header()
    for key, value in (("SIMPLE", True), ("BITPIX", -64), ("NAXIS", 2),
                       ("NAXIS1", 65536), ("NAXIS2", 65536), ("INSTRUME", "NIRSPEC")):
        header[key] = value
    path = tmp_path / f"{STEM}_rate.fits"
    path.write_bytes(header.tostring().encode())
    started = time.process_time()
    with pytest.raises(NSCleanInputError, match="declares") as error:
        read_rate(path)
    assert time.process_time() - started < 1.0
    assert "65536" in str(error.value)


# ---------------------------------------------------------------------------------------
# all of a command's outputs, or none
# ---------------------------------------------------------------------------------------
def unwritable_dir(tmp_path):
    """A path under a regular file: no process (root included) can create it."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    return blocker / "sub"


def test_mask_with_an_unwritable_png_leaves_no_mask_behind(bots, tmp_path):
    rate, cal = bots
    out = tmp_path / "mask.fits"
    done = run_cli("mask", cal, rate, "-o", out, "--png", unwritable_dir(tmp_path) / "m.png")
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "m.png" in done.stderr
    assert not out.exists()
    # and the rerun is not refused with "output exists"
    again = run_cli("mask", cal, rate, "-o", out, "--png", tmp_path / "m.png")
    assert again.returncode == 0, again.stderr
    assert out.exists() and (tmp_path / "m.png").exists()


def test_clean_with_an_unwritable_product_dir_leaves_no_cleaned_file(bots, tmp_path):
    rate, cal = bots
    out = tmp_path / "cleaned_rate.fits"
    done = run_cli("clean", rate, "--cal", cal, "-o", out, "--save-model", "--save-mask",
                   "--product-dir", unwritable_dir(tmp_path))
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-directory"]
    again = run_cli("clean", rate, "--cal", cal, "-o", out, "--save-model",
                    "--product-dir", tmp_path / "products")
    assert again.returncode == 0, again.stderr
    assert out.exists() and len(list((tmp_path / "products").iterdir())) == 1


def test_an_existing_second_output_refuses_before_anything_is_written(bots, tmp_path):
    rate, cal = bots
    out = tmp_path / "mask.fits"
    png = tmp_path / "m.png"
    png.write_bytes(b"someone's picture")
    done = run_cli("mask", cal, rate, "-o", out, "--png", png)
    assert done.returncode == 1 and "exists" in done.stderr
    assert not out.exists() and png.read_bytes() == b"someone's picture"


def test_inputs_are_untouched(bots):
    # every test above read these files; none may have changed them
    assert DIGESTS and all(path.read_bytes() == content for path, content in DIGESTS.items())


# ---------------------------------------------------------------------------------------
# inputs are never outputs, whatever --overwrite says
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mask-onto-rate", "png-onto-cal", "clean-onto-hardlink",
                                  "model-onto-rate", "png2mask-onto-png"])
def test_an_output_that_is_an_input_is_refused_even_with_overwrite(bots, tmp_path, case):
    rate, cal = (Path(shutil.copy(path, tmp_path)) for path in bots)
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    if case == "mask-onto-rate":
        done = run_cli("mask", cal, rate, "-o", rate, "--overwrite")
    elif case == "png-onto-cal":
        done = run_cli("mask", cal, rate, "-o", tmp_path / "m.fits", "--png", cal,
                       "--overwrite")
    elif case == "clean-onto-hardlink":
        os.link(rate, tmp_path / "link_rate.fits")
        before[tmp_path / "link_rate.fits"] = rate.read_bytes()
        done = run_cli("clean", rate, "--cal", cal, "-o", tmp_path / "link_rate.fits",
                       "--overwrite")
    elif case == "model-onto-rate":
        stem = rate.name.removesuffix("_rate.fits")
        model = tmp_path / f"{stem}_flicker_noise.fits"
        os.symlink(rate, model)
        done = run_cli("clean", rate, "--cal", cal, "-o", tmp_path / "out.fits",
                       "--save-model", "--overwrite")
    else:
        from PIL import Image

        png = tmp_path / "shaded.png"
        Image.new("RGB", (8, 8), (255, 0, 0)).save(png)
        before[png] = png.read_bytes()
        done = run_cli("png2mask", png, "-o", png, "--overwrite")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "would overwrite the input" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    for path, content in before.items():
        assert path.read_bytes() == content, path
    assert not (tmp_path / "out.fits").exists() and not (tmp_path / "m.fits").exists()


# ---------------------------------------------------------------------------------------
# more hostile local directories
# ---------------------------------------------------------------------------------------
def test_a_local_directory_with_a_fifo_a_folder_and_links_does_not_hang(tmp_path):
    directory = tmp_path / "local"
    make_program(directory)
    for name in ("jw01345062001_03101_00002_nrs1_cal.fits",
                 "jw01345063001_03101_00001_nrs2_cal.fits",
                 "jw02222001001_04102_00001_nrs1_cal.fits"):
        (directory / name).unlink()
    os.mkfifo(directory / "jw01345062001_03101_00002_nrs1_cal.fits")  # would block a reader
    (directory / "jw01345063001_03101_00001_nrs2_cal.fits").mkdir()
    os.symlink("/dev/zero", directory / "jw02222001001_04102_00001_nrs1_cal.fits")
    os.symlink("/etc/hostname", directory / "jw02222001001_04102_00002_nrs1_rate.fits")
    os.symlink("nowhere", directory / "jw01345064001_03101_00001_nrs1_rate.fits")
    os.symlink("jw01345064001_03101_00002_nrs1_rate.fits",
               directory / "jw01345064001_03101_00002_nrs1_rate.fits")  # a loop
    # in a child, bounded: a reader that opens the FIFO blocks for ever
    child = run_child(f"""
from nsclean.archive import archive
rows = archive.fetch_manifest(source="local", local_dir={str(directory)!r}).rows
result = {{row.stem: [row.status, row.reason] for row in rows}}
""", timeout=30)
    assert child["rc"] == 0, child["stderr"][-3000:]
    rows = {stem: SimpleNamespace(status=status, reason=reason)
            for stem, (status, reason) in child["result"].items()}
    for stem in ("jw01345062001_03101_00002_nrs1", "jw01345063001_03101_00001_nrs2",
                 "jw02222001001_04102_00001_nrs1"):
        assert rows[stem].status == "failed" and "not a regular file" in rows[stem].reason
    for stem in ("jw01345064001_03101_00001_nrs1", "jw01345064001_03101_00002_nrs1"):
        assert rows[stem].status == "failed" and "dangling or looping" in rows[stem].reason
    assert rows["jw02222001001_04102_00002_nrs1"].status == "failed"
    assert "not a FITS file" in rows["jw02222001001_04102_00002_nrs1"].reason
    assert rows[STEM].status == "ok"


def test_a_png_bomb_is_refused_from_its_header(tmp_path):
    from PIL import Image

    png = tmp_path / "shaded.png"
    Image.new("1", (12000, 12000)).save(png)  # 144 Mpixel, a few kB on disk
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = run_cli("png2mask", png, "-o", tmp_path / "mask.fits")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 1, done.stderr
    assert "larger than a NIRSpec frame" in done.stderr and str(png) in done.stderr
    assert not (tmp_path / "mask.fits").exists()
    # the command's CPU (start-up included), far from decoding 144 Mpixel
    assert after.ru_utime - before.ru_utime < 5.0


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_every_output_follows_the_umask(bots, tmp_path, umask):
    import stat

    from nsclean.io.exposure import make_mask
    from nsclean.workflow.pipeline import write_status

    previous = os.umask(umask)
    try:
        manifest = archive.write_manifest(
            archive.fetch_manifest(source="local", local_dir=Path(bots[0]).parent),
            tmp_path / "manifest.csv")
        make_mask(bots[1], bots[0], tmp_path / "mask.fits", png_path=tmp_path / "mask.png")
        write_status(tmp_path / "status.json", "ok")
    finally:
        os.umask(previous)
    for path in (manifest, tmp_path / "mask.fits", tmp_path / "mask.png",
                 tmp_path / "status.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
