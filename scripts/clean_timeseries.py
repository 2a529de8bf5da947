"""Rule ``clean_timeseries``: clean every integration of one time series (BOTS rateints),
and measure the first integration (QA) (``nsclean.workflow.steps.clean_timeseries``).

input:  rate        -- every ``_rateints.fits`` segment of the exposure
        mask        -- its one background mask (from rule ``mask``)
        mask_status -- the mask step's status record
output: cleaned     -- folder of ``<file stem>_nsclean_rateints.fits`` (empty if it failed)
        status      -- JSON status record: ok/failed, reason, fit summary, provenance
        metrics     -- the exposure's final record (as for rule ``clean``)
        figures     -- directory of the PNG figures of the first integration
params: options     -- the ``clean`` section of the config (options of nsclean.fit)
        qa_options  -- the ``qa`` section of the config
        save_noise_model -- also write each segment's noise model
Logs to the rule's log file.
"""

from nsclean.workflow.steps import clean_timeseries, snakemake_job

clean_timeseries(**snakemake_job(snakemake))  # noqa: F821 (injected by Snakemake)
