"""Rule ``clean``: fit and subtract the correlated read noise of one exposure.

input:  rate        -- the exposure's ``_rate.fits``
        mask        -- its background mask (from rule ``mask``)
        mask_status -- the mask step's status record
output: cleaned     -- cleaned rate file (empty placeholder if the exposure failed)
        status      -- JSON status record: ok/failed, reason, fit summary, provenance
params: options     -- the ``clean`` section of the config (options of nsclean.fit)
The step (``nsclean.steps.clean``) runs in a warm worker when one can be used
(``nsclean.warm``).
"""

from nsclean.warm import run_rule_step

run_rule_step("clean", snakemake)  # noqa: F821 (injected by Snakemake)
