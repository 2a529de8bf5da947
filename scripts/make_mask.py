"""Rule ``mask``: the background mask of one exposure (``nsclean.workflow.steps.mask``).

input:  rate, cal -- the exposure's ``_rate.fits`` and ``_cal.fits``
        rate_status, cal_status -- status records of their downloads
output: mask      -- FITS mask, 1 = background (empty placeholder if the exposure failed)
        status    -- JSON status record: ok/failed, reason, mask summary, input checksums
params: options   -- the ``mask`` section of the config (nsclean.algorithm.masks.MaskOptions)
Logs to the rule's log file.
"""

from nsclean.workflow.steps import mask, snakemake_job

mask(**snakemake_job(snakemake))  # noqa: F821 (injected by Snakemake)
