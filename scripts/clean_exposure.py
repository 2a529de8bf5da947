"""Rule ``clean``: fit and subtract the correlated read noise of one exposure, and measure
the result (QA) from the arrays in memory (``nsclean.workflow.steps.clean``).

input:  rate        -- the exposure's ``_rate.fits``
        mask        -- its background mask (from rule ``mask``)
        mask_status -- the mask step's status record
output: cleaned     -- cleaned rate file (empty placeholder if the exposure failed)
        status      -- JSON status record: ok/failed, reason, fit summary, provenance
        metrics     -- the exposure's final record, in the layout of
                       ``nsclean.report.report.write_record`` (program, stem, status
                       cleaned/failed, reason, cleaned_file relative to the results
                       directory, metrics of ``nsclean.algorithm.qa.exposure_metrics``,
                       figures) plus the fit summary and the provenance
        figures     -- directory of the PNG figures (``nsclean.report.figures``; empty if
                       failed or turned off)
params: options     -- the ``clean`` section of the config (options of nsclean.fit)
        qa_options  -- the ``qa`` section of the config
Logs to the rule's log file.
"""

from nsclean.workflow.steps import clean, snakemake_job

clean(**snakemake_job(snakemake))  # noqa: F821 (injected by Snakemake)
