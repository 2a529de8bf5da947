"""Rule ``program_report``: the HTML report and CSV table of one program.

input:  manifest -- the program's manifest (every exposure, skipped ones included)
        qa       -- the per-exposure records of rule ``qa`` (nsclean.report.report layout)
        figures  -- the per-exposure figure directories (linked from the report)
        benchmarks -- the mask, clean and QA benchmark files (the time taken per exposure)
output: html, csv -- ``<results>/<program>/report.html`` and ``report.csv``
"""

from pathlib import Path

from nsclean.workflow.pipeline import program_records, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
log = script_logging(smk.log[0])

from nsclean.report import report  # noqa: E402

program = smk.wildcards.program
records = program_records(program, smk.input.manifest, smk.input.qa, smk.input.benchmarks)
report.write_report(records, smk.output.html, smk.output.csv,
                    title=f"nsclean: program {program}", config=smk.config,
                    results_dir=Path(smk.output.csv).parents[1])
log.info("program %s: %d exposures reported", program, len(records))
