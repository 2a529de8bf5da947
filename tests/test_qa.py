"""QA metrics measured against synthetic images with a known injected truth."""

import json

import numpy as np
import pytest

from nsclean.algorithm import qa
from nsclean.algorithm._blocks import block_count, block_sum

SHAPE = (1024, 1024)
WHITE = 5.0


def _mask(shape=SHAPE, period=40, width=12):
    """IFU-like background: horizontal bands of `width` rows every `period` rows."""
    rows = np.arange(shape[0]) % period < width
    return np.broadcast_to(rows[:, None], shape).copy()


def _frame_pattern(shape, amplitude, scale=100.0):
    """Smooth pattern that decays away from the four edges (positive offset)."""
    y = np.arange(shape[0])[:, None]
    x = np.arange(shape[1])[None, :]
    distance = np.minimum(np.minimum(y, shape[0] - 1 - y), np.minimum(x, shape[1] - 1 - x))
    return amplitude * np.exp(-distance / scale)


def _scene(seed=0, stripe=2.0, frame=0.0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    white = rng.normal(0.0, WHITE, shape)
    stripe_values = rng.normal(0.0, stripe, shape[1])
    stripes = np.broadcast_to(stripe_values, shape).copy()
    frame_image = _frame_pattern(shape, frame) if frame else np.zeros(shape)
    return white, stripes, frame_image


def test_banding_rms_matches_injected_stripes_and_drops_to_white_expectation():
    white, stripes, _ = _scene(stripe=2.0)
    mask = _mask()
    before = white + stripes
    after = before - stripes
    m = qa.exposure_metrics(before, after, stripes, mask)

    injected = np.std(stripes[0])
    assert m["before"]["banding_rms"] == pytest.approx(injected, rel=0.05)
    assert m["before"]["banding_excess_rms"] == pytest.approx(injected, rel=0.05)

    # Pure white noise: each column mean scatters by sigma / sqrt(n_column).
    n_column = mask.sum(axis=0)
    expected = WHITE * np.sqrt(np.mean(1.0 / n_column))
    assert m["after"]["banding_rms"] == pytest.approx(expected, rel=0.1)
    assert m["after"]["banding_white_rms"] == pytest.approx(expected, rel=0.05)
    assert m["after"]["banding_excess_rms"] < 0.3 * expected

    # Sum of independent Gaussians is Gaussian, so the robust sigma is exact.
    assert m["before"]["background_rms"] == pytest.approx(np.hypot(WHITE, 2.0), rel=0.03)
    assert m["after"]["background_rms"] == pytest.approx(WHITE, rel=0.03)
    assert m["ratio"]["banding_rms"] < 0.2
    assert m["flags"] == []


def test_uniform_banding_counts_column_length_not_pixels():
    """Stripes left only in a dense background block barely move the length-weighted banding."""
    rng = np.random.default_rng(7)
    white = rng.normal(0.0, WHITE, SHAPE)
    rows = np.arange(SHAPE[0])
    # IFU-like: a solid background block at the bottom, thin gaps elsewhere.
    block = rows < 128
    mask = np.broadcast_to((block | (rows % 32 < 4))[:, None], SHAPE).copy()
    stripes = rng.normal(0.0, 2.0, SHAPE[1])
    residual = np.where(block[:, None], stripes[None, :], 0.0)  # left in the block only
    m = qa.exposure_metrics(white + residual, white + residual, None, mask)["before"]

    # Unweighted: the block holds 128 of ~240 background pixels per column.
    share = 128 / mask[:, 0].sum()
    assert m["banding_excess_rms"] == pytest.approx(share * np.std(stripes), rel=0.15)
    # Length-weighted: the block is 1/8 of the column (plus its density roll-off).
    assert m["banding_uniform_excess_rms"] < 0.5 * m["banding_excess_rms"]
    assert m["banding_uniform_excess_rms"] == pytest.approx(np.std(stripes) / 8, rel=0.35)

    # Uniform sampling: both definitions agree.
    uniform = qa.exposure_metrics(white + stripes, white, None, _mask())["before"]
    assert uniform["banding_uniform_rms"] == pytest.approx(uniform["banding_rms"], rel=0.02)
    assert uniform["banding_uniform_white_rms"] == pytest.approx(
        uniform["banding_white_rms"], rel=0.1
    )


def test_bad_cleaning_is_flagged():
    white, stripes, _ = _scene(stripe=2.0)
    mask = _mask()
    before = white + stripes
    # A cleaner that subtracted its model with the wrong sign.
    after = before + stripes
    m = qa.exposure_metrics(before, after, -stripes, mask)
    text = " ".join(m["flags"])
    assert "banding not reduced" in text
    assert "background rms went up" in text
    assert m["ratio"]["banding_rms"] == pytest.approx(2.0, rel=0.05)


def test_large_model_is_flagged_and_threshold_is_adjustable():
    white, stripes, _ = _scene(stripe=2.0)
    mask = _mask()
    before = white + stripes
    model = stripes * 4.0  # rms ~8, above the ~5.4 background rms
    after = before - stripes
    flags = qa.exposure_metrics(before, after, model, mask)["flags"]
    assert any("model rms" in f for f in flags)
    relaxed = qa.exposure_metrics(before, after, model, mask, max_model_ratio=3.0)["flags"]
    assert not any("model rms" in f for f in relaxed)
    with pytest.raises(TypeError, match="unknown threshold"):
        qa.exposure_metrics(before, after, model, mask, max_modle_ratio=3.0)


def test_picture_frame_detected_and_removed():
    white, stripes, frame = _scene(stripe=1.0, frame=4.0)
    mask = _mask()
    before = white + stripes + frame
    after = white
    m = qa.exposure_metrics(before, after, stripes + frame, mask, edge_width=128)

    # Truth: rms of the injected frame over the edge band, about the interior.
    y = np.arange(SHAPE[0])[:, None]
    x = np.arange(SHAPE[1])[None, :]
    distance = np.minimum(np.minimum(y, SHAPE[0] - 1 - y), np.minimum(x, SHAPE[1] - 1 - x))
    edge = distance < 128
    truth = np.sqrt(np.mean((frame[edge] - np.median(frame[~edge])) ** 2))
    assert m["before"]["picture_frame_amplitude"] == pytest.approx(truth, rel=0.25)
    assert m["after"]["picture_frame_amplitude"] < 0.15 * truth
    assert m["ratio"]["frame_rms"] < 0.3

    no_frame = qa.exposure_metrics(white + stripes, white, stripes, mask)
    assert no_frame["before"]["picture_frame_amplitude"] < 0.15 * truth

    # Putting the frame back in is caught.
    worse = qa.exposure_metrics(white, white + frame, -frame, mask)
    assert any("picture frame" in f for f in worse["flags"])


def test_lowfreq_power_along_rows_and_columns():
    rng = np.random.default_rng(3)
    white = rng.normal(0.0, WHITE, SHAPE)
    mask = _mask()
    amplitude = 1.5
    columns = np.arange(SHAPE[1])
    rows = np.arange(SHAPE[0])
    # Period 256 px (frequency 1/256 <= the 1/128 cutoff): sine power = A^2 / 2.
    along_rows = np.broadcast_to(amplitude * np.sin(2 * np.pi * columns / 256.0), SHAPE)
    along_columns = np.broadcast_to(amplitude * np.sin(2 * np.pi * rows / 256.0)[:, None], SHAPE)

    m = qa.exposure_metrics(white + along_rows, white, along_rows, mask)
    assert m["before"]["lowfreq_power_rows"] == pytest.approx(amplitude**2 / 2, rel=0.1)
    assert m["after"]["lowfreq_power_rows"] < 0.02 * amplitude**2

    m = qa.exposure_metrics(white + along_columns, white, along_columns, mask)
    assert m["before"]["lowfreq_power_columns"] == pytest.approx(amplitude**2 / 2, rel=0.1)
    assert m["after"]["lowfreq_power_columns"] < 0.02 * amplitude**2
    # A pattern constant along each row leaves the column means alone.
    assert m["before"]["lowfreq_power_rows"] < 0.02 * amplitude**2


def test_banding_power_spectrum_peak_and_parseval():
    rng = np.random.default_rng(4)
    white = rng.normal(0.0, 1.0, SHAPE)
    columns = np.arange(SHAPE[1])
    image = white + 2.0 * np.cos(2 * np.pi * columns / 16.0)[None, :]
    mask = _mask()
    freq, power = qa.banding_power_spectrum(image, mask)
    assert freq[np.argmax(power)] == pytest.approx(1 / 16)
    assert freq.min() > 0 and freq.max() == pytest.approx(0.5)
    column_means = np.array([image[mask[:, j], j].mean() for j in range(SHAPE[1])])
    assert power.sum() == pytest.approx(np.var(column_means), rel=1e-6)


def test_white_level_matches_pure_white_noise_spectrum():
    rng = np.random.default_rng(6)
    image = rng.normal(0.0, WHITE, SHAPE)
    mask = _mask()
    freq, power = qa.banding_power_spectrum(image, mask)
    level = qa.banding_white_level(image, mask)
    n_column = mask.sum(axis=0)
    assert level == pytest.approx(2 * WHITE**2 * np.mean(1 / n_column) / SHAPE[1], rel=0.05)
    # 512 independent bins, each exponentially distributed: the mean is ~4 % exact.
    assert power[:-1].mean() == pytest.approx(level, rel=0.15)
    # Stripes raise the spectrum but not the white level.
    stripes = np.broadcast_to(rng.normal(0.0, 2.0, SHAPE[1]), SHAPE)
    assert qa.banding_white_level(image + stripes, mask) == pytest.approx(level, rel=0.02)
    assert qa.banding_power_spectrum(image + stripes, mask)[1].mean() > 10 * level
    assert qa.banding_white_level(image, np.zeros(SHAPE, bool)) is None


def test_nans_are_ignored_and_new_nans_flagged():
    white, stripes, _ = _scene(stripe=2.0)
    mask = _mask()
    before = white + stripes
    before[:, 100:110] = np.nan
    before[500, :] = np.nan
    after = before - stripes
    m = qa.exposure_metrics(before, after, stripes, mask)
    assert m["before"]["n_nonfinite"] == np.count_nonzero(np.isnan(before))
    assert m["before"]["banding_rms"] == pytest.approx(np.std(stripes[0]), rel=0.05)
    assert [100, 0] in m["worst_columns"]
    assert m["flags"] == []
    json.dumps(m, allow_nan=False)

    broken = after.copy()
    broken[:, 600:620] = np.nan
    flags = qa.exposure_metrics(before, broken, stripes, mask)["flags"]
    assert any("non-finite" in f for f in flags)


def test_empty_and_tiny_masks():
    white, stripes, _ = _scene(stripe=2.0)
    empty = np.zeros(SHAPE, bool)
    m = qa.exposure_metrics(white + stripes, white, stripes, empty)
    assert m["n_background"] == 0
    assert m["before"]["banding_rms"] is None
    assert m["flags"] and "no usable background" in m["flags"][0]
    json.dumps(m, allow_nan=False)
    freq, power = qa.banding_power_spectrum(white, empty)
    assert freq.size == 0 and power.size == 0

    sparse = np.zeros(SHAPE, bool)
    sparse[::64, ::3] = True  # ~0.5 % background, two thirds of the columns empty
    m = qa.exposure_metrics(white + stripes, white, stripes, sparse)
    assert any("low background fraction" in f for f in m["flags"])
    assert any("columns have under" in f for f in m["flags"])
    json.dumps(m, allow_nan=False)


def test_subarray_shape():
    rng = np.random.default_rng(5)
    shape = (32, 2048)
    white = rng.normal(0.0, WHITE, shape)
    stripes = np.broadcast_to(rng.normal(0.0, 3.0, shape[1]), shape)
    mask = np.zeros(shape, bool)
    mask[:6] = True
    mask[-6:] = True
    m = qa.exposure_metrics(white + stripes, white, stripes, mask)
    assert m["shape"] == [32, 2048]
    # 12 background pixels per column: white noise adds 5 / sqrt(12) in
    # quadrature, which the excess removes again.
    injected = np.std(stripes[0])
    assert m["before"]["banding_rms"] == pytest.approx(np.hypot(injected, WHITE / 12**0.5), rel=0.1)
    assert m["before"]["banding_excess_rms"] == pytest.approx(injected, rel=0.1)
    # 32 rows hold no frequency below 1/128 and no interior away from the edges.
    assert m["before"]["lowfreq_power_columns"] is None
    assert m["before"]["picture_frame_amplitude"] is None
    json.dumps(m, allow_nan=False)


def test_guard_lines_from_fit_info():
    white, stripes, _ = _scene(stripe=2.0)
    mask = _mask()
    frequencies = np.full(SHAPE[1], 8)
    frequencies[[3, 7]] = -1
    frequencies[10:210] = 4
    info = {
        "n_lines": SHAPE[1],
        "n_guarded": 200,
        "n_uncleaned": 2,
        "frequencies": frequencies,
        "max_frequency": 8,
    }
    m = qa.exposure_metrics(white + stripes, white, stripes, mask, fit_info=info)
    guard = m["guard"]
    assert guard["uncleaned_lines"] == [3, 7]
    assert guard["guarded_lines"] == list(range(10, 30))  # capped at 20
    assert guard["guarded_fraction"] == pytest.approx(200 / SHAPE[1])
    assert guard["uncleaned_fraction"] == pytest.approx(2 / SHAPE[1])
    assert m["flags"] == []  # 20 % guarded, 0.2 % uncleaned: below the defaults

    # As loaded back from JSON (a list) and without max_frequency or counts:
    # everything is derived from the per-line frequencies.
    frequencies[:600] = 3
    frequencies[600:640] = -1
    info = {"frequencies": frequencies.tolist()}
    m = qa.exposure_metrics(white + stripes, white, stripes, mask, fit_info=info)
    # Guarded lines are reported, not flagged by default (IFU masks guard ~93 % by design).
    assert not any("guard lowered" in flag for flag in m["flags"])
    m = qa.exposure_metrics(white + stripes, white, stripes, mask, fit_info=info,
                            max_guarded_fraction=0.5)
    assert m["guard"]["n_lines"] == SHAPE[1]
    assert m["guard"]["n_uncleaned"] == 40
    assert m["guard"]["n_guarded"] == 600
    assert m["guard"]["guarded_lines"] == list(range(20))
    text = " ".join(m["flags"])
    assert "guard lowered the frequencies on 58.6% of lines" in text
    assert "3.9% of lines left uncleaned" in text
    json.dumps(m, allow_nan=False)


def test_residual_banding_flag():
    white, stripes, _ = _scene(stripe=2.0)
    mask = _mask()
    before = white + stripes
    # Half the stripes removed: reduced enough, yet far above the white level.
    m = qa.exposure_metrics(before, before - 0.5 * stripes, 0.5 * stripes, mask)
    assert m["ratio"]["banding_rms"] == pytest.approx(0.5, rel=0.05)
    assert any("residual banding" in f for f in m["flags"])
    assert not any("banding not reduced" in f for f in m["flags"])


def test_float32_with_pedestal_matches_float64():
    """A large sky level in float32 must not cost the banding its precision."""
    white, stripes, frame = _scene(stripe=2.0, frame=3.0)
    mask = _mask()
    before = 1000.0 + white + stripes + frame
    after = 1000.0 + white
    m64 = qa.exposure_metrics(before, after, stripes + frame, mask)
    m32 = qa.exposure_metrics(
        before.astype(np.float32), after.astype(np.float32), None, mask.astype(np.uint8)
    )
    for key in ("banding_rms", "banding_excess_rms", "frame_rms", "lowfreq_power_rows"):
        for state in ("before", "after"):
            assert m32[state][key] == pytest.approx(m64[state][key], rel=1e-3), (state, key)


def test_inputs_untouched_and_shapes_checked():
    white, stripes, _ = _scene(stripe=2.0, shape=(256, 256))
    before = white + stripes
    copy = before.copy()
    mask = _mask((256, 256))
    qa.exposure_metrics(before, white, stripes, mask)
    np.testing.assert_array_equal(before, copy)
    with pytest.raises(ValueError, match="shape"):
        qa.exposure_metrics(before, white[:100], stripes, mask)
    with pytest.raises(ValueError, match="background_mask"):
        qa.exposure_metrics(before, white, stripes, mask[:, :10])


def test_flatten_metrics_order_and_values():
    white, stripes, _ = _scene(stripe=2.0, shape=(256, 256))
    m = qa.exposure_metrics(white + stripes, white + 2 * stripes, -stripes, _mask((256, 256)))
    flat = qa.flatten_metrics(m)
    assert tuple(flat) == qa.FLAT_METRIC_KEYS
    assert flat["after.banding_rms"] == m["after"]["banding_rms"]
    assert flat["n_flags"] == len(m["flags"]) > 0
    assert flat["flags"] == " | ".join(m["flags"])
    assert all(v is None for v in qa.flatten_metrics(None).values())


def test_spectra_handed_back_are_those_of_the_spectrum_functions():
    white, stripes, _ = _scene(stripe=2.0)
    mask = _mask()
    before, after = white + stripes, white
    spectra = {}
    plain = qa.exposure_metrics(before, after, before - after, mask)
    metrics = qa.exposure_metrics(before, after, before - after, mask, spectra=spectra)
    assert metrics == plain
    for name, image in (("before", before), ("after", after)):
        for mine, reference in zip(spectra[name], qa.banding_power_spectrum(image, mask),
                                   strict=True):
            np.testing.assert_array_equal(mine, reference)
    assert spectra["white"] == qa.banding_white_level(after, mask)
    empty = {}
    qa.exposure_metrics(before, after, None, np.zeros(SHAPE, bool), spectra=empty)
    assert empty["white"] is None and empty["before"][0].size == 0


@pytest.mark.parametrize("shape", [(4, 4), (13, 30), (64, 2048), (2048, 37)])
def test_block_count_is_the_number_of_background_pixels_per_block(shape):
    use = np.random.default_rng(sum(shape)).random(shape) < 0.4
    padded = np.pad(use, ((0, -shape[0] % 4), (0, -shape[1] % 4)))
    expected = padded.reshape(padded.shape[0] // 4, 4, -1, 4).sum(axis=(1, 3))
    counts = block_count(use, (4, 4))
    assert counts.dtype == np.float64
    np.testing.assert_array_equal(counts, expected)
    # the same float64 values as the block sum the picture-frame metric used before
    np.testing.assert_array_equal(counts, block_sum(use, (4, 4)))
