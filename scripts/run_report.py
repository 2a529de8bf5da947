"""Rule ``run_report``: the HTML report and CSV table of the whole run.

input:  qa        -- the per-exposure records of every program
        programs  -- the per-program reports (made first, so that a failure shows there)
output: html, csv -- ``<results>/report.html`` and ``<results>/report.csv``
"""

from pathlib import Path

from nsclean.pipeline import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
log = script_logging(smk.log[0])

from nsclean import report  # noqa: E402

records = report.load_records(smk.input.qa)
report.write_report(records, smk.output.html, smk.output.csv, title="nsclean: run report",
                    config=smk.config, results_dir=Path(smk.output.csv).parent)
log.info("%d exposures reported", len(records))
