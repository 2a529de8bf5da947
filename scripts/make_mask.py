"""Rule ``mask``: the background mask of one exposure (``nsclean.workflow.steps.mask``).

input:  rate, cal -- the exposure's ``_rate.fits`` and ``_cal.fits``
        rate_status, cal_status -- optional status records of their downloads
output: mask      -- FITS mask, 1 = background (empty placeholder if the exposure failed)
        status    -- JSON status record: ok/failed, reason, mask summary, input checksums
params: options   -- the ``mask`` section of the config (nsclean.algorithm.masks.MaskOptions)
Run by the rule's shell command as ``python make_mask.py JOB --log LOG``: JOB is the
job's files and settings as JSON (``step_command`` in workflow/rules/common.smk).
The step (``nsclean.workflow.steps.mask``) runs in a warm worker when one can be used
(``nsclean.workflow.warm``).
"""

import os
import sys

# As for a Snakemake script: the workflow's own nsclean is importable when none is
# installed (an installed one comes first).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nsclean.workflow.warm import run_command_step  # noqa: E402

run_command_step("mask")
