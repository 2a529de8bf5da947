"""Rule ``mask``: the background mask of one exposure (``nsclean.exposure.make_mask``).

input:  rate, cal -- the exposure's ``_rate.fits`` and ``_cal.fits``
        rate_status, cal_status -- optional status records of their downloads
output: mask      -- FITS mask, 1 = background (empty placeholder if the exposure failed)
        status    -- JSON status record: ok/failed, reason, mask summary, input checksums
params: options   -- the ``mask`` section of the config (nsclean.masks.MaskOptions)
Snakemake sets OMP/OPENBLAS_NUM_THREADS to the rule's threads for script jobs.
"""

from nsclean.pipeline import OK, input_checksums, require_ok, script_logging, step, write_status

smk = snakemake  # noqa: F821 (injected by Snakemake)
log = script_logging(smk.log[0])

with step(smk.output.status, [smk.output.mask], log) as record:
    # Status records of the downloads, when the fetch rule provides them (an archive
    # refusal then fails this exposure with the archive's reason).
    require_ok([path for key, path in smk.input.items() if key.endswith("_status")])
    record["inputs"] = input_checksums([smk.input.rate, smk.input.cal])
    from nsclean.exposure import make_mask

    summary = make_mask(smk.input.cal, smk.input.rate, smk.output.mask,
                        options=dict(smk.params.options), overwrite=True)
    log.info("mask of %s: %d background pixels (%.1f %%), %d weak columns",
             summary["stem"], summary["n_background"],
             100 * summary["background_fraction"], summary["n_weak_columns"])
    write_status(smk.output.status, OK, mask=summary, mask_options=dict(smk.params.options),
                 **record)
