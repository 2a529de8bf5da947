"""Rule ``clean_timeseries``: clean every integration of one time series (BOTS rateints).

input:  rate        -- every ``_rateints.fits`` segment of the exposure
        mask        -- its one background mask (from rule ``mask``)
        mask_status -- the mask step's status record
output: cleaned     -- folder of ``<file stem>_nsclean_rateints.fits`` (empty if it failed)
        status      -- JSON status record: ok/failed, reason, fit summary, provenance
params: options     -- the ``clean`` section of the config (options of nsclean.fit)
Run by the rule's shell command as ``python clean_timeseries.py JOB --log LOG``: JOB is the
job's files and settings as JSON (``step_command`` in workflow/rules/common.smk).
The step (``nsclean.workflow.steps.clean_timeseries``) runs in a warm worker when one
can be used (``nsclean.workflow.warm``).
"""

import os
import sys

# As for a Snakemake script: the workflow's own nsclean is importable when none is
# installed (an installed one comes first).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nsclean.workflow.warm import run_command_step  # noqa: E402

run_command_step("clean_timeseries")
