"""nsclean as a jwst pipeline step: :class:`NSCleanStep` (alias ``nsclean``).

Needs the ``[jwst]`` extra (``pip install 'nsclean[jwst]'``).  The step is a thin
wrapper in the manner of jwst's own steps: it opens the data model, builds the
background mask with :mod:`nsclean.algorithm.masks`, calls :func:`nsclean.fit` on the
image (or on every integration of a rateints cube), subtracts the model and sets the
status keywords.  Usable as::

    strun nsclean jw..._rate.fits --cal_file=jw..._cal.fits
    NSCleanStep.call(model, cal_file="jw..._cal.fits", cutoff=1 / 256)
    Spec2Pipeline.call(asn, steps={"assign_wcs": {"pre_hooks": ["nsclean"]}})

Design decisions
----------------
One source for the options
    The step's ``spec`` is generated from the library's defaults: every option of
    :func:`nsclean.fit` (``nsclean.algorithm.core._DEFAULTS``) and of the automatic mask
    (:class:`nsclean.algorithm.masks.MaskOptions`), the same defaults the CLI and the
    workflow's config schema use (a test compares them).  A new fit option appears here
    by itself.
Not cleaning twice
    A file whose ``S_CLNFNS`` is already ``COMPLETE`` (cleaned by nsclean or by jwst's
    ``clean_flicker_noise``) is returned unchanged with a warning.
The mask
    ``user_mask`` (any FITS mask, e.g. one written by ``nsclean mask``: 1 = background)
    is used as it is, else the mask is built automatically from the model's SCI and DQ
    and, with ``cal_file``, the science footprint of the cal (or calints) product,
    checked against the exposure first.  Without either (a pre-hook of stage 2, before
    any cal exists) the mask comes from the rate alone: DQ, NaN, the fixed-slit band and
    the bright-pixel clip.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from jwst.stpipe import Step

from .algorithm import core
from .algorithm import masks as masklib
from .io import exposure as expo
from .io.errors import NSCleanInputError

__all__ = ["NSCleanStep", "get_steps", "step_spec"]

log = logging.getLogger(__name__)

# Options of the step itself (not of the fit or the mask).
_STEP_OPTIONS = """
        cal_file = string(default=None)  # cal or calints file of the exposure: science footprint
        user_mask = string(default=None)  # mask file (1 = background) used instead of the automatic one
        user_mask_mode = option('and', 'replace', default='replace')  # with cal_file: combine or replace
        save_mask = boolean(default=False)  # also save the mask used (suffix mask)
        save_noise = boolean(default=False)  # also save the fitted noise (suffix flicker_noise)
"""  # noqa: E501


def _spec_type(value) -> str:
    if isinstance(value, bool):
        return f"boolean(default={value})"
    if isinstance(value, int):
        return f"integer(default={value})"
    if isinstance(value, float):
        return f"float(default={value!r})"
    if isinstance(value, str):
        return f"string(default='{value}')"
    return "string(default=None)"


def step_spec() -> str:
    """The stpipe ``spec`` of :class:`NSCleanStep`, from the library's defaults.

    Fit options come from :func:`nsclean.fit`'s defaults, mask options from
    :class:`nsclean.algorithm.masks.MaskOptions` (``fixed_slit_rows`` as two
    integers); options whose default is None are floats that accept None.
    """
    lines = [_STEP_OPTIONS.rstrip("\n")]
    for name, value in core._DEFAULTS.items():
        lines.append(f"        {name} = {_spec_type(value)}  # nsclean.fit option")
    for field in dataclasses.fields(masklib.MaskOptions):
        value = getattr(masklib.MaskOptions(), field.name)
        if field.name == "fixed_slit_rows":
            spec = f"int_list(min=2, max=2, default=list({value[0]}, {value[1]}))"
        elif value is None or field.name == "clip_sigma":
            spec = f"float(default={value!r})"
        else:
            spec = _spec_type(value)
        lines.append(f"        {field.name} = {spec}  # automatic mask option")
    return "\n".join(lines) + "\n"


class NSCleanStep(Step):
    """Remove correlated read noise from a NIRSpec rate or rateints model (NSClean).

    Parameters are those of :func:`nsclean.fit` and of the automatic background mask
    (:class:`nsclean.algorithm.masks.MaskOptions`), plus ``cal_file``, ``user_mask``,
    ``user_mask_mode``, ``save_mask`` and ``save_noise``; see the module notes.
    """

    class_alias = "nsclean"
    spec = step_spec()

    def default_suffix(self):
        """Outputs are named ``<stem>_nsclean.fits`` (as a hook too)."""
        return "nsclean"

    def process(self, input_data):
        """Clean the model; return a new model with SCI cleaned.

        Parameters
        ----------
        input_data : str or ImageModel or CubeModel
            A NIRSpec ``_rate`` or ``_rateints`` product.

        Returns
        -------
        ImageModel or CubeModel
            The cleaned model, ``S_CLNFNS = 'COMPLETE'`` (and ``S_NSCLEN``).

        Raises
        ------
        nsclean.io.errors.NSCleanInputError
            For a non-NIRSpec model, a model without 2-D or 3-D SCI, a cal file or mask
            that does not match.
        """
        output = self.prepare_output(input_data)
        name = output.meta.filename or "input model"
        instrument = str(output.meta.instrument.name or "").upper()
        if instrument != "NIRSPEC":
            raise NSCleanInputError(name, f"not a NIRSpec exposure (INSTRUME = "
                                          f"{instrument or '(missing)'}): the nsclean step "
                                          "cleans NIRSpec rate and rateints files")
        if output.meta.cal_step.clean_flicker_noise == "COMPLETE":
            log.warning("%s: already cleaned (S_CLNFNS = COMPLETE): not cleaning twice", name)
            return output
        data = np.asarray(output.data)
        if data.ndim not in (2, 3):
            raise NSCleanInputError(name, f"SCI is {data.ndim}-D, expected a rate image "
                                          "(2-D) or rateints cube (3-D)")
        rate = self._rate_stand_in(output, name, data)
        mask = self._mask(rate)
        fit_options = {key: getattr(self, key) for key in core._DEFAULTS}
        planes = data[None] if data.ndim == 2 else data
        dq = np.asarray(output.dq, dtype=np.uint32)
        dq = np.broadcast_to(dq if dq.ndim == 3 else dq[None], planes.shape)
        from .io.tso import _fit_planes

        try:
            model, totals, _ = _fit_planes(planes.astype(np.float32), dq, mask,
                                           rate.detector, fit_options, workers=1)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, NSCleanInputError):
                raise
            raise NSCleanInputError(name, str(exc)) from None
        model = model.reshape(data.shape)
        log.info("%s: cleaned %d plane(s); background %.1f %% of pixels; %s", name,
                 planes.shape[0], 100 * mask.mean(), totals)
        if self.save_noise:
            noise = output.copy()
            noise.data = model.astype(np.float32)
            self.save_model(noise, suffix="flicker_noise", force=True)
            noise.close()
        if self.save_mask:
            from stdatamodels.jwst import datamodels

            with datamodels.ImageModel(mask.astype(np.float32)) as mask_model:
                mask_model.update(output, only="PRIMARY")
                self.save_model(mask_model, suffix="mask", force=True)
        output.data = (data - model).astype(output.data.dtype)
        output.meta.cal_step.clean_flicker_noise = "COMPLETE"
        for status in ("nsclean",):  # the old step's keyword (S_NSCLEN), where the schema has it
            try:
                setattr(output.meta.cal_step, status, "COMPLETE")
            except (AttributeError, KeyError, ValueError):
                pass
        return output

    def _rate_stand_in(self, model, name, data) -> expo.RateExposure:
        """The model as the I/O layer's RateExposure (2-D: a median of the integrations)."""
        from astropy.io import fits

        meta = model.meta
        values = {
            "TELESCOP": meta.telescope, "INSTRUME": meta.instrument.name,
            "DETECTOR": meta.instrument.detector, "EXP_TYPE": meta.exposure.type,
            "SUBARRAY": meta.subarray.name, "SUBSTRT1": meta.subarray.xstart,
            "SUBSTRT2": meta.subarray.ystart, "SUBSIZE1": meta.subarray.xsize,
            "SUBSIZE2": meta.subarray.ysize, "PROGRAM": meta.observation.program_number,
            "OBSERVTN": meta.observation.observation_number,
            "VISIT": meta.observation.visit_number, "VISITGRP": meta.observation.visit_group,
            "SEQ_ID": meta.observation.sequence_id, "ACT_ID": meta.observation.activity_id,
            "EXPOSURE": meta.observation.exposure_number,
        }
        header = fits.Header()
        for key, value in values.items():
            if value is not None:
                header[key] = value
        if str(header.get("DETECTOR", "")).upper() not in ("NRS1", "NRS2"):
            raise NSCleanInputError(name, f"DETECTOR = {header.get('DETECTOR', '(missing)')}, "
                                          "expected NRS1 or NRS2")
        image = data
        dq = np.asarray(model.dq, dtype=np.uint32)
        if data.ndim == 3:
            with np.errstate(all="ignore"):
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    image = np.nanmedian(data, axis=0).astype(np.float32)
            if dq.ndim == 3:
                dq = np.bitwise_and.reduce(dq, axis=0)
        try:
            stem = expo.exposure_stem(name, header)
        except ValueError:
            stem = str(name)
        from pathlib import Path

        return expo.RateExposure(path=Path(str(name)), stem=stem, header=header,
                                 sci=np.asarray(image, dtype=np.float32), dq=dq)

    def _mask(self, rate: expo.RateExposure) -> np.ndarray:
        options = {field.name: getattr(self, field.name)
                   for field in dataclasses.fields(masklib.MaskOptions)}
        options["fixed_slit_rows"] = tuple(options["fixed_slit_rows"])
        user_mask = None
        if self.user_mask not in (None, "", "None"):
            user_mask = expo._read_user_mask(self.user_mask, rate)
            if self.cal_file in (None, "", "None") or self.user_mask_mode == "replace":
                return user_mask
        cal = None
        if self.cal_file not in (None, "", "None"):
            cal = expo.read_cal(self.cal_file)
        try:
            mask, _ = expo.build_exposure_mask(rate, cal, user_mask=user_mask,
                                               user_mask_mode="and", options=options)
        except NSCleanInputError:
            raise
        except ValueError as exc:
            raise NSCleanInputError(rate.path, str(exc)) from None
        return mask


def get_steps():
    """The stpipe ``stpipe.steps`` entry point: ``(class, alias, is_pipeline)`` tuples."""
    return [("nsclean.jwst_step.NSCleanStep", "nsclean", False)]
