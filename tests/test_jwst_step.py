"""nsclean in the jwst pipeline: NSCleanStep through stpipe (call, strun, Spec2Pipeline
hooks), offline, and jwst's own clean_flicker_noise taking our mask as user_mask.

Skipped unless the ``[jwst]`` extra is installed.  CRDS is never contacted:
``STPIPE_DISABLE_CRDS_STEPPARS`` keeps stpipe from fetching step parameters, and the
steps used need no reference file.
"""

import os
import subprocess
import sys
from pathlib import Path

import network_guard
import numpy as np
import pytest
from astropy.io import fits

pytest.importorskip("jwst", reason="needs the [jwst] extra: pip install -e '.[jwst]'")

from stdatamodels.jwst import datamodels  # noqa: E402

from nsclean.algorithm import core  # noqa: E402
from nsclean.algorithm.masks import MaskOptions  # noqa: E402
from nsclean.io import exposure as ex  # noqa: E402
from nsclean.io import tso  # noqa: E402
from nsclean.io.errors import NSCleanInputError  # noqa: E402
from nsclean.jwst_step import NSCleanStep  # noqa: E402
from nsclean.testing import simulate  # noqa: E402

CAPTURED = []


def capture(model):
    """A post-hook that keeps what the step before it produced."""
    CAPTURED.append(model.copy())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("STPIPE_DISABLE_CRDS_STEPPARS", "true")
    network_guard.install()
    yield
    assert not network_guard.ATTEMPTS, network_guard.ATTEMPTS


@pytest.fixture(scope="module")
def exposure(tmp_path_factory):
    """A fixed-slit SUB512 exposure; the rate also saved by stdatamodels (with ASDF)."""
    directory = tmp_path_factory.mktemp("jwst_step")
    sim = simulate.simulate_exposure("fs", "NRS1", readout="NRS", subarray="SUB512", seed=9)
    rate, cal = simulate.write_exposure(sim, directory)
    pipeline_dir = directory / "pipeline"
    pipeline_dir.mkdir()
    with datamodels.open(rate) as model:
        model.save(pipeline_dir / rate.name)
    return sim, rate, cal, pipeline_dir / rate.name


def test_step_options_are_the_library_defaults():
    step = NSCleanStep()
    for name, value in core._DEFAULTS.items():
        assert getattr(step, name) == value, name
    for name, value in MaskOptions().to_dict().items():
        assert getattr(step, name) == (list(value) if isinstance(value, tuple) else value), name


def test_call_on_a_model_cleans_as_the_library_does(exposure, tmp_path):
    sim, rate, cal, _ = exposure
    with datamodels.open(rate) as model:
        result = NSCleanStep.call(model, cal_file=str(cal))
        original = model.data.copy()
    expected = tmp_path / "expected_rate.fits"
    ex.clean_exposure(rate, expected, cal_path=cal)
    np.testing.assert_allclose(result.data, fits.getdata(expected, "SCI"), atol=1e-6)
    assert not np.allclose(np.nan_to_num(result.data), np.nan_to_num(original))
    assert result.meta.cal_step.clean_flicker_noise == "COMPLETE"
    # a file cleaned once is not cleaned again
    again = NSCleanStep.call(result, cal_file=str(cal))
    np.testing.assert_array_equal(again.data, result.data)


def test_rateints_cube_is_cleaned_per_integration(tmp_path):
    series = simulate.simulate_timeseries("NRS2", 3, seed=6, subarray="SUB512")
    (rateints,), (calints,) = simulate.write_timeseries(series, tmp_path / "in")
    with datamodels.open(rateints) as model:
        result = NSCleanStep.call(model, cal_file=str(calints))
    summary = tso.clean_rateints(rateints, tmp_path / "out", calints_paths=calints, workers=1)
    assert type(result).__name__ == "CubeModel" and result.data.shape == (3, 32, 512)
    np.testing.assert_allclose(result.data, fits.getdata(summary["outputs"][0], "SCI"),
                               atol=1e-6)


def test_a_non_nirspec_model_is_refused_in_one_line(exposure):
    _, rate, _, _ = exposure
    with datamodels.open(rate) as model:
        model.meta.instrument.name = "NIRCAM"
        model.meta.instrument.detector = "NRCA1"
        with pytest.raises(NSCleanInputError) as error:
            NSCleanStep.call(model)
    message = str(error.value)
    assert rate.name in message and "not a NIRSpec exposure (INSTRUME = NIRCAM)" in message
    assert "\n" not in message


def test_a_cal_file_of_another_exposure_is_refused(exposure, tmp_path):
    _, rate, _, _ = exposure
    other = simulate.simulate_exposure("fs", "NRS2", readout="NRS", subarray="SUB512", seed=2)
    _, other_cal = simulate.write_exposure(other, tmp_path)
    with datamodels.open(rate) as model, pytest.raises(NSCleanInputError,
                                                       match="DETECTOR: rate NRS1, cal NRS2"):
        NSCleanStep.call(model, cal_file=str(other_cal))


@pytest.mark.parametrize("name", ["nsclean", "nsclean.jwst_step.NSCleanStep"])
def test_strun_by_alias_or_class_name(exposure, tmp_path, name):
    _, _, cal, pipeline_rate = exposure
    strun = Path(sys.executable).with_name("strun")
    env = dict(os.environ, STPIPE_DISABLE_CRDS_STEPPARS="true")
    result = subprocess.run([str(strun), name, str(pipeline_rate), f"--cal_file={cal}",
                             f"--output_dir={tmp_path}"], env=env, capture_output=True,
                            text=True, timeout=300, check=False, cwd=tmp_path)
    # (cwd: strun takes an existing path "nsclean", like the package folder, for a config)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / pipeline_rate.name.replace("_rate.fits", "_nsclean.fits")
    assert fits.getval(output, "S_CLNFNS") == "COMPLETE"
    with datamodels.open(output) as model:
        assert model.meta.instrument.name == "NIRSPEC"


def test_spec2pipeline_runs_the_step_as_a_hook(exposure):
    from jwst.pipeline import Spec2Pipeline

    _, rate, cal, _ = exposure
    # Offline there are no reference files: every step is skipped, and the hooks of
    # assign_wcs (run even when it is skipped) clean the rate and hand it on.
    steps = {name: {"skip": True} for name in Spec2Pipeline.step_defs}
    steps["assign_wcs"]["post_hooks"] = [NSCleanStep(cal_file=str(cal)),
                                         "test_jwst_step.capture"]
    CAPTURED.clear()
    with datamodels.open(rate) as model:
        Spec2Pipeline.call(model, steps=steps, save_results=False)
        original = model.data.copy()
    (cleaned,) = CAPTURED
    assert cleaned.meta.cal_step.clean_flicker_noise == "COMPLETE"
    with datamodels.open(rate) as model:
        expected = NSCleanStep.call(model, cal_file=str(cal))
    np.testing.assert_allclose(cleaned.data, expected.data, atol=1e-6)
    assert not np.allclose(np.nan_to_num(cleaned.data), np.nan_to_num(original))


def test_jwst_clean_flicker_noise_takes_our_mask_as_user_mask(exposure, tmp_path):
    from jwst.clean_flicker_noise import CleanFlickerNoiseStep

    _, rate, cal, _ = exposure
    mask_path = tmp_path / "mask.fits"
    ex.make_mask(cal, rate, mask_path)
    everything = tmp_path / "everything.fits"
    with fits.open(mask_path) as hdul:
        hdul["SCI"].data[:] = 1.0
        hdul.writeto(everything)
    results = []
    for user_mask in (mask_path, everything):
        with datamodels.open(rate) as model:
            result = CleanFlickerNoiseStep.call(model, user_mask=str(user_mask),
                                                fit_method="fft", background_method=None)
            results.append(result.data.copy())
            assert result.meta.cal_step.clean_flicker_noise == "COMPLETE"
    # our mask was read and used: with every pixel as background the fit differs
    assert not np.allclose(np.nan_to_num(results[0]), np.nan_to_num(results[1]))
