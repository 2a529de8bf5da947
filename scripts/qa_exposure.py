"""Rule ``qa``: metrics before and after cleaning, and the figures, of one exposure.

input:  rate, cleaned, mask -- the original and cleaned rate files and the mask
        clean_status        -- the clean step's status record
output: metrics -- the exposure's final record, in the layout of
                   ``nsclean.report.write_record`` (program, stem, status cleaned/failed,
                   reason, cleaned_file relative to the results directory, metrics of
                   ``nsclean.qa.exposure_metrics``, figures) plus the fit summary and
                   the provenance (software version, options, input checksums)
        figures -- directory of the PNG figures (``nsclean.figures``; empty if failed)
params: options -- the ``qa`` section of the config
The step (``nsclean.steps.qa``) runs in a warm worker when one can be used
(``nsclean.warm``).
"""

from nsclean.warm import run_rule_step

run_rule_step("qa", snakemake)  # noqa: F821 (injected by Snakemake)
