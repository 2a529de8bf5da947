"""Figures are written atomically as valid PNGs of the documented size."""

import os
import struct
import time

import numpy as np
import pytest

from nsclean.report import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) from the IHDR chunk; fails unless the file is a PNG."""
    with open(path, "rb") as handle:
        header = handle.read(24)
    assert header[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def _decodes(path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.size


def _exposure(shape, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.arange(shape[0])[:, None]
    mask = np.broadcast_to(rows % 40 < 12, shape).copy()
    stripes = np.broadcast_to(rng.normal(0.0, 2.0, shape[1]), shape)
    spectra = np.where(mask, 0.0, 40.0 * np.exp(-((((rows % 40) - 26) / 4.0) ** 2)))
    white = rng.normal(0.0, 5.0, shape)
    before = white + stripes + spectra
    before[5, 7] = np.nan
    return before, before - stripes, np.array(stripes), mask


def _expected(kind):
    width, height = figures.FIGURE_SIZES[kind]
    return round(width * figures.DPI), round(height * figures.DPI)


def test_individual_figures(tmp_path):
    before, after, model, mask = _exposure((256, 256))
    written = {
        "comparison": figures.plot_comparison(
            before, after, model, tmp_path / "c.png", background_mask=mask, title="t"
        ),
        "mask": figures.plot_mask(before, mask, tmp_path / "m.png"),
        "column": figures.plot_column(before, model, mask, tmp_path / "col.png", column=10),
        "spectrum": figures.plot_power_spectrum(before, after, mask, tmp_path / "s.png"),
    }
    for kind, path in written.items():
        assert os.path.isfile(path)
        assert _png_size(path) == _expected(kind)
        assert _decodes(path) == _expected(kind)
    thumb = figures.write_thumbnail(before, after, tmp_path / "t.png", background_mask=mask)
    # 256 px -> blocks of 2 -> 128 rows; two halves and a 2-column gap.
    assert _png_size(thumb) == (2 * 128 + 2, 128)
    # No temporary files are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["c.png", "m.png", "col.png", "s.png", "t.png"]
    )


def test_thumbnail_shows_cleaning(tmp_path):
    """The after half must be visibly less striped than the before half."""
    from PIL import Image

    before, after, _, mask = _exposure((512, 512), seed=2)
    path = figures.write_thumbnail(before, after, tmp_path / "t.png", background_mask=mask)
    with Image.open(path) as image:
        grey = np.asarray(image.convert("L"), dtype=float)
    half = (grey.shape[1] - 2) // 2
    left, right = grey[:, :half], grey[:, half + 2 :]
    assert left.shape == right.shape == (128, 128)
    # Column-to-column scatter of the column means = the banding on display.
    assert np.std(left.mean(axis=0)) > 3 * np.std(right.mean(axis=0))


def test_column_out_of_range(tmp_path):
    before, _, model, mask = _exposure((64, 64))
    with pytest.raises(ValueError, match="column"):
        figures.plot_column(before, model, mask, tmp_path / "x.png", column=64)
    assert not list(tmp_path.iterdir())


def test_subarray_and_empty_mask(tmp_path):
    before, after, model, mask = _exposure((32, 2048))
    paths = figures.write_figures(before, after, model, mask, tmp_path, "sub")
    assert _png_size(paths["comparison"]) == _expected("comparison_wide")
    assert _png_size(paths["mask"]) == _expected("mask_wide")
    empty = np.zeros_like(mask)
    paths = figures.write_figures(before, after, None, empty, tmp_path / "e", "empty")
    for path in paths.values():
        _decodes(path)


def test_full_frame_set(tmp_path):
    before, after, model, mask = _exposure((2048, 2048))
    figures.write_figures(
        before[:64, :64],
        after[:64, :64],
        model[:64, :64],
        mask[:64, :64],
        tmp_path / "warm",
        "warm",
    )
    start = time.perf_counter()
    paths = figures.write_figures(before, after, model, mask, tmp_path, "jw01345062001_nrs1")
    elapsed = time.perf_counter() - start
    print(f"full-frame figure set: {elapsed:.2f} s")
    assert set(paths) == {"comparison", "mask", "column", "spectrum", "thumbnail"}
    for kind in ("comparison", "mask", "column", "spectrum"):
        assert _png_size(paths[kind]) == _expected(kind)
        assert os.path.basename(paths[kind]) == f"jw01345062001_nrs1_{kind}.png"
    assert _png_size(paths["thumbnail"]) == (2 * 128 + 2, 128)


@pytest.mark.filterwarnings("error")
def test_all_nan_and_constant_images(tmp_path):
    nan = np.full((64, 64), np.nan)
    paths = figures.write_figures(nan, nan, None, np.zeros((64, 64), bool), tmp_path, "nan")
    flat = np.zeros((64, 64))
    paths.update(
        {
            f"flat_{k}": v
            for k, v in figures.write_figures(
                flat, flat, flat, np.ones((64, 64), bool), tmp_path, "flat"
            ).items()
        }
    )
    for path in paths.values():
        _decodes(path)


def _reference_block_mean(image, use, factors):
    """Block means of the used pixels, one block at a time (NaN where none is used)."""
    fy, fx = factors
    ny, nx = image.shape
    means = np.full((-(-ny // fy), -(-nx // fx)), np.nan)
    counts = np.zeros(means.shape)
    for i in range(means.shape[0]):
        for j in range(means.shape[1]):
            block = (slice(i * fy, (i + 1) * fy), slice(j * fx, (j + 1) * fx))
            values = image[block][use[block]]
            counts[i, j] = values.size
            if values.size:
                means[i, j] = values.astype(np.float64).mean()
    return means, counts


@pytest.mark.parametrize("shape, factors", [((64, 64), (4, 4)), ((37, 50), (4, 3)),
                                            ((32, 96), (1, 8)), ((48, 48), (16, 16))])
def test_block_reductions_equal_a_block_by_block_mean(shape, factors):
    rng = np.random.default_rng(shape[0])
    image = rng.normal(10.0, 3.0, shape).astype(np.float32)
    use = rng.random(shape) < 0.6
    use[: factors[0], : factors[1]] = False  # one block without any pixel to use
    expected, expected_counts = _reference_block_mean(image, use, factors)

    means, counts = figures._block_mean(np.where(use, image, 0), use, factors)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(means, expected, rtol=1e-12)  # NaN where expected is NaN
    everything, pixels = figures._block_mean(image, None, factors)
    reference, reference_pixels = _reference_block_mean(image, np.ones(shape, bool), factors)
    np.testing.assert_array_equal(pixels, reference_pixels)
    np.testing.assert_allclose(everything, reference, rtol=1e-12)
    np.testing.assert_allclose(figures._mask_fraction(use, factors),
                               expected_counts / reference_pixels, rtol=1e-15)


def test_display_ignores_nans_and_keeps_empty_blocks_empty():
    rng = np.random.default_rng(5)
    image = rng.normal(0.0, 1.0, (64, 64))
    holed = image.copy()
    holed[:4, :4] = np.nan  # one whole 4x4 block
    holed[10, 10] = np.inf
    plain = figures._display(image, (4, 4), 0.0)
    display = figures._display(holed, (4, 4), 0.0)
    assert np.isnan(display[0, 0]) and np.isfinite(display[1:, 1:]).all()
    # the block with the inf pixel is the mean of its 15 finite pixels
    block = image[8:12, 8:12].astype(np.float32).astype(np.float64).ravel()
    assert display[2, 2] == pytest.approx(np.delete(block, 2 * 4 + 2).mean(), rel=1e-12)
    np.testing.assert_array_equal(display[3:, 3:], plain[3:, 3:])
    # Smoothing (8 px = 2 blocks): normalised convolution around the empty block, a
    # plain Gaussian of the block means without one.
    from scipy.ndimage import gaussian_filter

    smoothed = figures._display(holed, (4, 4), 8.0)
    assert np.isnan(smoothed[0, 0]) and np.isfinite(smoothed[1:, 1:]).all()
    weight = np.isfinite(display).astype(float)
    expected = gaussian_filter(np.nan_to_num(display), 2.0) / gaussian_filter(weight, 2.0)
    np.testing.assert_allclose(smoothed[1:, 1:], expected[1:, 1:], rtol=1e-12)
    np.testing.assert_allclose(figures._display(image, (4, 4), 8.0),
                               gaussian_filter(plain, 2.0), rtol=1e-12)


def test_nearest_picks_spread_evenly_and_keep_small_images_whole():
    picks = figures._nearest_picks(512, 300.2)
    assert picks.size == 301 and picks[0] == 0 and picks[-1] == 511
    assert np.all(np.diff(picks) >= 1) and np.all(np.diff(picks) <= 2)
    np.testing.assert_array_equal(figures._nearest_picks(100, 300.0), np.arange(100))
    np.testing.assert_array_equal(figures._nearest_picks(8, 4), [1, 3, 5, 7])


def test_image_panels_get_no_more_pixels_than_they_show(tmp_path, monkeypatch):
    kept = {}
    monkeypatch.setattr(figures, "_save", lambda figure, path: kept.setdefault(path, figure))
    before, after, model, mask = _exposure((2048, 2048))
    figures.write_figures(before, after, model, mask, tmp_path, "s")
    for kind in ("comparison", "mask"):
        figure = kept[os.path.join(tmp_path, f"s_{kind}.png")]
        for ax in figure.axes:
            for image in ax.images:
                box = ax.get_position()
                width, height = figure.get_size_inches() * figure.dpi * (box.width, box.height)
                ny, nx = image.get_array().shape[:2]
                assert ny <= np.ceil(height) < 512 and nx <= np.ceil(width) < 512
                # extent (and so the axes and their ticks) is the full frame
                assert tuple(image.get_extent()) == (0, 2048, 0, 2048)


def test_write_figures_restores_the_garbage_collector(tmp_path):
    import gc

    before, after, model, mask = _exposure((64, 64))
    assert gc.isenabled()
    figures.write_figures(before, after, model, mask, tmp_path, "on")
    assert gc.isenabled()
    gc.disable()
    try:
        figures.write_figures(before, after, model, mask, tmp_path, "off")
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("shape", [(2048, 64), (129, 7), (128, 3), (1, 5)])
def test_column_std_is_numpy_std_to_the_bit(shape):
    rng = np.random.default_rng(shape[0])
    model = rng.normal(0.1, 1e-3, shape) * rng.random(shape[1])  # a pedestal and spreads
    np.testing.assert_array_equal(figures._column_std(model), np.std(model, axis=0))
    mask = np.ones(shape, bool)
    assert figures._default_column(model, mask) == int(np.argmax(np.nanstd(model, axis=0)))


def test_background_centre_is_the_background_median():
    rng = np.random.default_rng(1)
    display = rng.normal(3.0, 1.0, (64, 64))
    display[0, :5] = np.nan
    fraction = rng.random((64, 64))
    expected = np.median(display[(fraction > 0.5) & np.isfinite(display)])
    assert figures._background_centre(display, fraction) == expected
    assert figures._background_centre(display, None) == np.nanmedian(display)
    assert figures._background_centre(np.full((4, 4), np.nan), None) == 0.0
