"""Rule ``qa``: metrics before and after cleaning, and the figures, of one exposure.

input:  rate, cleaned, mask -- the original and cleaned rate files and the mask
        clean_status        -- the clean step's status record
output: metrics -- the exposure's final record, in the layout of
                   ``nsclean.report.report.write_record`` (program, stem, status cleaned/failed,
                   reason, cleaned_file relative to the results directory, metrics of
                   ``nsclean.algorithm.qa.exposure_metrics``, figures) plus the fit summary and
                   the provenance (software version, options, input checksums)
        figures -- directory of the PNG figures (``nsclean.report.figures``; empty if failed)
params: options -- the ``qa`` section of the config
Run by the rule's shell command as ``python qa_exposure.py JOB --log LOG``: JOB is the
job's files and settings as JSON (``step_command`` in workflow/rules/common.smk).
The step (``nsclean.workflow.steps.qa``) runs in a warm worker when one can be used
(``nsclean.workflow.warm``).
"""

import os
import sys

# As for a Snakemake script: the workflow's own nsclean is importable when none is
# installed (an installed one comes first).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nsclean.workflow.warm import run_command_step  # noqa: E402

run_command_step("qa")
