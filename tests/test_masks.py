"""Tests of nsclean.algorithm.masks: pure-array background masks."""

import hashlib
import json

import numpy as np
import pytest

from nsclean.algorithm import masks
from nsclean.algorithm import nirspec as dqflags


def checksum(*arrays):
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def brute_force_disk_dilation(footprint, radius):
    out = np.zeros_like(footprint)
    ys, xs = np.nonzero(footprint)
    yy, xx = np.indices(footprint.shape)
    for y, x in zip(ys, xs, strict=True):
        out |= (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
    return out


def brute_force_longest_run(mask):
    result = []
    for column in mask.T:
        longest = run = 0
        for usable in column:
            run = 0 if usable else run + 1
            longest = max(longest, run)
        result.append(longest)
    return np.array(result)


# -- footprints ------------------------------------------------------------------------


def test_ifu_footprint_is_the_finite_pixels():
    cal_sci = np.full((6, 5), np.nan, dtype=np.float32)
    cal_sci[2:4, 1:4] = 3.0
    cal_sci[3, 3] = np.inf
    footprint = masks.ifu_footprint(cal_sci)
    expected = np.zeros((6, 5), bool)
    expected[2:4, 1:4] = True
    expected[3, 3] = False
    np.testing.assert_array_equal(footprint, expected)


def test_slit_footprint_trace_and_box_modes():
    data = np.full((3, 4), np.nan)
    data[1, 1:3] = 1.0
    slit = masks.SlitRegion("12", xstart=5, ystart=2, data=data)
    trace = masks.slit_footprint((10, 12), [slit], mode="trace")
    box = masks.slit_footprint((10, 12), [slit], mode="box")
    assert np.argwhere(trace).tolist() == [[3, 6], [3, 7]]
    assert box.sum() == 12 and box[2:5, 5:9].all()


def test_slit_outside_image_is_an_error_naming_the_slit():
    slit = masks.SlitRegion("S200A1", xstart=10, ystart=0, data=np.ones((2, 4)))
    with pytest.raises(ValueError, match="S200A1.*does not fit"):
        masks.slit_footprint((8, 12), [slit])


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 7])
def test_dilation_is_a_euclidean_disk(radius):
    footprint = np.zeros((40, 40), bool)
    footprint[20, 20] = footprint[5, 30] = footprint[33, 2] = True
    dilated = masks.dilate_footprint(footprint, radius)
    np.testing.assert_array_equal(dilated, brute_force_disk_dilation(footprint, radius))
    assert dilated is not footprint


@pytest.mark.parametrize("radius", [1, 2, 3, 8])
def test_dilation_equals_scikit_image_disk_dilation(radius):
    # The dilation is scikit-image's dilation by its disk; the brute-force disk
    # (brute_force_disk_dilation) checks the edges below.
    from skimage.morphology import dilation, disk

    rng = np.random.default_rng(40 + radius)
    footprint = rng.random((300, 260)) < 0.01
    footprint[100:104, :] = True  # a trace-like band
    expected = dilation(footprint, disk(radius))
    np.testing.assert_array_equal(masks.dilate_footprint(footprint, radius), expected)


@pytest.mark.parametrize("shape", [(1, 1), (3, 40), (40, 3), (37, 29)])
@pytest.mark.parametrize("radius", [1, 2, 5, 6, 12])
def test_dilation_at_edges_of_small_and_thin_images(shape, radius):
    rng = np.random.default_rng(radius)
    for fraction in (0.0, 0.05, 0.5):
        footprint = rng.random(shape) < fraction
        footprint[0, 0] = footprint[-1, -1] = fraction > 0  # pixels at the corners
        np.testing.assert_array_equal(masks.dilate_footprint(footprint, radius),
                                      brute_force_disk_dilation(footprint, radius))


# -- geometry --------------------------------------------------------------------------


def test_fixed_slit_band_full_frame_and_subarray():
    band = masks.fixed_slit_band((2048, 8))
    rows = np.flatnonzero(band[:, 0])
    assert rows[0] == 922 and rows[-1] == 1115 and rows.size == 194
    # ALLSLITS-like subarray starting at full-frame row 896: the band moves with it
    sub = masks.fixed_slit_band((256, 8), origin=(896, 0))
    rows = np.flatnonzero(sub[:, 0])
    assert rows[0] == 922 - 896 and rows[-1] == 1115 - 896
    assert not masks.fixed_slit_band((32, 8), origin=(0, 0)).any()


def test_reference_border_follows_the_subarray_position():
    full = masks.reference_pixel_border((2048, 2048))
    assert full.sum() == 2048 * 2048 - 2040 * 2040
    assert full[3, 1000] and not full[4, 1000] and full[1000, 2044] and not full[1000, 2043]
    # SUB512 at the left edge: only its first 4 columns; one in the middle: none
    left = masks.reference_pixel_border((32, 512), origin=(996, 0))
    assert left[:, :4].all() and not left[:, 4:].any()
    middle = masks.reference_pixel_border((32, 512), origin=(996, 600))
    assert not middle.any()
    # SUB2048 spans all columns: only the 4 + 4 reference columns
    strip = masks.reference_pixel_border((32, 2048), origin=(996, 0))
    assert strip.sum(axis=0).nonzero()[0].tolist() == [0, 1, 2, 3, 2044, 2045, 2046, 2047]


def test_flagged_pixels_selects_bits():
    dq = np.array(
        [
            dqflags.DO_NOT_USE,
            dqflags.JUMP_DET,
            dqflags.MSA_FAILED_OPEN,
            dqflags.REFERENCE_PIXEL | dqflags.DO_NOT_USE,
            dqflags.SATURATED,
            0,
        ],
        dtype=np.uint32,
    )
    assert masks.flagged_pixels(dq).tolist() == [True, False, True, True, False, False]
    with_jump = masks.flagged_pixels(dq, jump=True)
    assert with_jump.tolist() == [True, True, True, True, False, False]
    none = masks.flagged_pixels(dq, do_not_use=False, failed_open=False, reference_pixels=False)
    assert not none.any()


# -- clipping --------------------------------------------------------------------------


def test_bright_pixels_follow_column_stripes():
    rng = np.random.default_rng(3)
    stripes = rng.normal(0, 20, size=64)  # 1/f-like stripes 20x the white noise
    image = rng.normal(0, 1, size=(256, 64)) + stripes
    image[100, 10] += 8.0  # a faint source: 8 sigma above its column
    candidates = np.ones(image.shape, bool)
    bright, stats = masks.bright_pixels(image, candidates, n_sigma=5)
    assert bright[100, 10]
    assert bright.sum() <= 2  # stripes themselves are not clipped
    assert 0.9 < stats["sigma"] < 1.1


def test_bright_pixels_only_tests_candidates():
    image = np.zeros((50, 4))
    image[:, 0] = np.random.default_rng(0).normal(size=50)
    image[10, 0] = 100
    candidates = np.ones(image.shape, bool)
    candidates[10, 0] = False
    bright, _ = masks.bright_pixels(image, candidates, n_sigma=3)
    assert not bright[10, 0]


# -- guard -----------------------------------------------------------------------------


def test_longest_masked_run_matches_brute_force():
    mask = np.random.default_rng(5).random((97, 31)) < 0.7
    mask[:, 3] = False
    mask[:, 4] = True
    np.testing.assert_array_equal(masks.longest_masked_run(mask), brute_force_longest_run(mask))


def test_guard_reports_sparse_and_gapped_columns_but_not_reference_columns():
    mask = np.ones((2048, 16), bool)
    mask[:, 5] = False
    mask[::100, 5] = True  # only 21 background pixels, 99-pixel gaps
    mask[100:700, 9] = False  # a 600-pixel gap
    mask[:, 0] = False  # a reference column of the detector
    report = masks.guard_report(mask, masks.MaskOptions(), origin=(0, 0))
    assert report["weak_columns"] == [5, 9]
    assert report["column_counts"][5] == 21
    assert report["longest_gap"][9] == 600
    assert report["n_columns_too_few"] == 1 and report["n_columns_long_gap"] == 1


def test_guard_threshold_shrinks_for_short_subarray_columns():
    mask = np.zeros((32, 10), bool)
    mask[:8, :] = True
    mask[:7, 6] = False  # one background pixel left
    report = masks.guard_report(mask, origin=(996, 600))
    assert report["min_pixels"] == 8
    assert report["weak_columns"] == [6]


# -- the whole mask --------------------------------------------------------------------


def small_scene(shape=(128, 96), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 1, size=shape).astype(np.float32)
    footprint = np.zeros(shape, bool)
    footprint[40:50, 10:80] = True
    image[footprint] += 50
    dq = np.zeros(shape, np.uint32)
    dq[5, 5] = dqflags.DO_NOT_USE
    image[5, 5] = np.nan
    dq[60, 60] = dqflags.JUMP_DET
    dq[70, 70] = dqflags.MSA_FAILED_OPEN
    image[90, 30] = np.nan  # NaN without a flag
    image[100, 50] += 40  # uncovered bright source
    return image, dq, footprint


def test_build_background_mask_removes_each_kind_of_pixel():
    image, dq, footprint = small_scene()
    before = checksum(image, dq, footprint)
    mask, info = masks.build_background_mask(
        image, dq, footprint, exp_type="NRS_FIXEDSLIT", origin=(1000, 1000)
    )
    assert checksum(image, dq, footprint) == before  # inputs untouched
    assert mask.dtype == bool and mask.shape == image.shape
    assert not mask[footprint].any()
    assert not mask[38, 20] and not mask[51, 20] and mask[52, 20]  # dilation radius 2
    assert not mask[5, 5] and not mask[90, 30] and not mask[70, 70] and not mask[100, 50]
    assert not mask[60, 60]  # JUMP_DET masked by default
    steps = {step["step"]: step for step in info["steps"]}
    assert list(steps) == [
        "nan",
        "dq",
        "reference_border",
        "fixed_slit_band",
        "footprint",
        "jump",
        "clip",
    ]
    assert steps["fixed_slit_band"]["applied"] is False  # fixed-slit exposure, subarray
    assert steps["clip"]["n_removed"] >= 1
    assert info["n_background"] == int(mask.sum())
    assert len(info["guard"]["column_counts"]) == image.shape[1]
    json.dumps(info)  # the record goes into headers and JSON summaries


@pytest.mark.parametrize(
    ("option", "pixel"),
    [
        ({"mask_nan": False, "mask_do_not_use": False}, (5, 5)),
        ({"mask_jump": False}, (60, 60)),
        ({"mask_failed_open": False}, (70, 70)),
        ({"clip_sigma": None}, (100, 50)),
        ({"use_footprint": False, "clip_sigma": None}, (45, 20)),
        ({"dilation_radius": 0}, (39, 20)),
    ],
)
def test_each_step_can_be_switched(option, pixel):
    image, dq, footprint = small_scene()
    default, _ = masks.build_background_mask(image, dq, footprint, origin=(1000, 1000))
    changed, info = masks.build_background_mask(image, dq, footprint, origin=(1000, 1000), **option)
    assert default[pixel] != changed[pixel]
    for name, value in option.items():
        assert info["options"][name] == value


@pytest.mark.parametrize(
    ("exp_type", "full_frame", "mode", "expected"),
    [
        ("NRS_IFU", True, "auto", True),
        ("NRS_MSASPEC", True, "auto", True),
        ("NRS_FIXEDSLIT", True, "auto", False),
        ("NRS_IFU", False, "auto", False),
        ("NRS_FIXEDSLIT", True, "always", True),
        ("NRS_IFU", True, "never", False),
    ],
)
def test_fixed_slit_band_modes(exp_type, full_frame, mode, expected):
    image = np.zeros((1200, 8), np.float32)
    mask, info = masks.build_background_mask(
        image, exp_type=exp_type, full_frame=full_frame, fixed_slit_band=mode, clip_sigma=None
    )
    assert (not mask[1000, 6]) == expected
    assert mask[900, 6] and mask[1116, 6]


def test_fixed_slit_rows_are_configurable():
    image = np.zeros((1200, 8), np.float32)
    mask, info = masks.build_background_mask(
        image, exp_type="NRS_IFU", full_frame=True, fixed_slit_rows=(900, 1100)
    )
    assert not mask[900, 6] and not mask[1100, 6] and mask[899, 6] and mask[1101, 6]
    assert info["options"]["fixed_slit_rows"] == [900, 1100]


def test_options_are_validated():
    with pytest.raises(ValueError, match="footprint_mode"):
        masks.MaskOptions(footprint_mode="slits")
    with pytest.raises(ValueError, match="dilation_radius"):
        masks.MaskOptions(dilation_radius=-1)
    with pytest.raises(ValueError, match="unknown mask option.*dilate"):
        masks.MaskOptions.from_mapping({"dilate": 3})
    with pytest.raises(ValueError, match="shape"):
        masks.build_background_mask(np.zeros((4, 4)), np.zeros((4, 5), np.uint32))


def test_combine_masks():
    auto = np.array([True, True, False, False])
    user = np.array([True, False, True, False])
    assert masks.combine_masks(auto, user, "and").tolist() == [True, False, False, False]
    assert masks.combine_masks(auto, user, "replace").tolist() == user.tolist()
    with pytest.raises(ValueError, match="shape"):
        masks.combine_masks(auto, user[:3])


# -- PNG workflow ----------------------------------------------------------------------


def gimp_style_shading(grey, background, opacity=0.3):
    """What an image editor does when a selection is filled with red at some opacity."""
    rgb = np.repeat(grey[..., None].astype(float), 3, axis=2)
    red = np.array([255.0, 0.0, 0.0])
    rgb[background] = (1 - opacity) * rgb[background] + opacity * red
    return np.rint(rgb).astype(np.uint8)


def test_mask_from_shaded_rgb_reads_red_shading_at_any_grey_level():
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, size=(40, 30))
    grey[:, 0] = 255  # white pixels too
    grey[:, 1] = 0
    background = rng.random((40, 30)) < 0.4
    rgb = gimp_style_shading(grey, background)
    got = masks.mask_from_shaded_rgb(rgb, flip_vertical=False)
    np.testing.assert_array_equal(got, background)
    flipped = masks.mask_from_shaded_rgb(rgb)  # DS9 export: row 0 at the bottom
    np.testing.assert_array_equal(flipped, background[::-1])


def test_transparent_pixels_are_not_background():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255
    got = masks.mask_from_shaded_rgb(rgba, flip_vertical=False)
    assert got.tolist() == [[True, False], [False, False]]


def test_quicklook_round_trips_through_the_png_reader():
    rng = np.random.default_rng(9)
    image = rng.normal(size=(64, 48)).astype(np.float32)
    image[3, 3] = np.nan
    mask = rng.random((64, 48)) < 0.5
    before = checksum(image, mask)
    rgb = masks.quicklook_rgb(image, mask)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 48, 3)
    np.testing.assert_array_equal(masks.mask_from_shaded_rgb(rgb), mask)
    assert checksum(image, mask) == before


def test_jump_fallback_keeps_jumps_only_where_masking_them_weakens_a_column():
    image = np.zeros((2048, 12), np.float32)
    dq = np.zeros(image.shape, np.uint32)
    dq[::50, :] = dqflags.JUMP_DET  # scattered hits everywhere: harmless
    dq[100:1900, 6] = dqflags.JUMP_DET  # a column-long shower: would leave a 1800-px gap
    footprint = np.zeros(image.shape, bool)
    mask, info = masks.build_background_mask(image, dq, footprint, origin=(0, 1000))
    jump_step = next(step for step in info["steps"] if step["step"] == "jump")
    assert jump_step["restored_columns"] == [6]
    assert mask[100:1900, 6].all()  # the shower's column keeps its jump pixels
    assert not mask[200, 5] and not mask[200, 7]  # other columns lose theirs
    assert info["guard"]["weak_columns"] == []
    strict, info = masks.build_background_mask(
        image, dq, footprint, origin=(0, 1000), jump_fallback=False
    )
    assert not strict[100:1900, 6].any()
    assert info["guard"]["weak_columns"] == [6]


def test_column_levels_are_exact_medians():
    rng = np.random.default_rng(11)
    image = rng.normal(size=(301, 40)).astype(np.float32)
    candidates = rng.random(image.shape) < 0.3
    candidates[:, 7] = False
    candidates[:, 8] = False
    candidates[5, 8] = True
    levels, has_level = masks._column_medians(image, candidates)
    expected = np.nanmedian(np.where(candidates, image, np.nan)[:, has_level], axis=0)
    np.testing.assert_allclose(levels[has_level], expected, rtol=0, atol=1e-7)
    assert not has_level[7] and has_level[8] and levels[8] == image[5, 8]
