"""Rule ``mask``: the background mask of one exposure (``nsclean.exposure.make_mask``).

input:  rate, cal -- the exposure's ``_rate.fits`` and ``_cal.fits``
output: mask      -- FITS mask, 1 = background (empty placeholder if the exposure failed)
        status    -- JSON status record: ok/failed, reason, mask summary, input checksums
params: options   -- the ``mask`` section of the config (nsclean.masks.MaskOptions)
Snakemake sets OMP/OPENBLAS_NUM_THREADS to the rule's threads for script jobs.
"""

from nsclean.pipeline import OK, input_checksums, script_logging, step, write_status

smk = snakemake  # noqa: F821 (injected by Snakemake)
log = script_logging(smk.log[0])

with step(smk.output.status, [smk.output.mask], log) as record:
    record["inputs"] = input_checksums([smk.input.rate, smk.input.cal])
    from nsclean.exposure import make_mask

    summary = make_mask(smk.input.cal, smk.input.rate, smk.output.mask,
                        options=dict(smk.params.options), overwrite=True)
    log.info("mask of %s: %d background pixels (%.1f %%), %d weak columns",
             summary["stem"], summary["n_background"],
             100 * summary["background_fraction"], summary["n_weak_columns"])
    write_status(smk.output.status, OK, mask=summary, mask_options=dict(smk.params.options),
                 **record)
