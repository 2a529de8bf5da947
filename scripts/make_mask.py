"""Rule ``mask``: the background mask of one exposure (``nsclean.steps.mask``).

input:  rate, cal -- the exposure's ``_rate.fits`` and ``_cal.fits``
        rate_status, cal_status -- optional status records of their downloads
output: mask      -- FITS mask, 1 = background (empty placeholder if the exposure failed)
        status    -- JSON status record: ok/failed, reason, mask summary, input checksums
params: options   -- the ``mask`` section of the config (nsclean.masks.MaskOptions)
The step runs in a warm worker when one can be used (``nsclean.warm``).
"""

from nsclean.warm import run_rule_step

run_rule_step("mask", snakemake)  # noqa: F821 (injected by Snakemake)
