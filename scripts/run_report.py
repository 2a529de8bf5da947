"""Rule ``run_report``: the HTML report and CSV table of the whole run.

input:  manifests -- every program's manifest (``<results>/<program>/manifest.csv``)
        qa        -- the per-exposure records of every program
        programs  -- the per-program tables (made first)
        benchmarks -- the mask, clean and QA benchmark files (the time taken per exposure)
output: html, csv -- ``<results>/report.html`` and ``<results>/report.csv``
"""

from pathlib import Path

from nsclean.workflow.pipeline import program_records, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
log = script_logging(smk.log[0])

from nsclean.report import report  # noqa: E402

records = []
for manifest in smk.input.manifests:
    program_dir = Path(manifest).parent
    qa = [path for path in smk.input.qa if program_dir in Path(path).parents]
    # <results>/benchmarks/<rule>/<program>/<stem>.tsv
    benchmarks = [path for path in smk.input.benchmarks
                  if Path(path).parent.name == program_dir.name]
    records += program_records(program_dir.name, manifest, qa, benchmarks)
report.write_report(records, smk.output.html, smk.output.csv, title="nsclean: run report",
                    config=smk.config, results_dir=Path(smk.output.csv).parent)
log.info("%d exposures reported", len(records))
