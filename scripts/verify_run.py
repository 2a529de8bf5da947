"""Rule ``verify_run``: the run's verdict, so that snakemake's exit status tells it.

input:  csv    -- ``<results>/report.csv``
output: status -- ``<results>/run_status.json``, written only when no exposure failed;
                  otherwise the job fails with the failed exposures and their reasons
                  (the reports are complete either way).
"""

import csv
from collections import Counter

from nsclean.workflow.pipeline import FAILED, OK, script_logging, to_console, write_status

smk = snakemake  # noqa: F821 (injected by Snakemake)
log = script_logging(smk.log[0])

with open(smk.input.csv, newline="", encoding="utf-8") as handle:
    rows = list(csv.DictReader(handle))
counts = Counter(row["status"] for row in rows)
failed = [row for row in rows if row["status"] == FAILED]
for row in failed:
    log.error("%s %s failed: %s", row["program"], row["stem"], row["reason"])
if failed:
    verdict = (f"{len(failed)} of {len(rows)} exposures failed (see {smk.input.csv}): "
               + "; ".join(f"{r['stem']}: {r['reason']}" for r in failed[:5]))
    to_console(verdict)  # the default profile's quiet console shows no job error
    raise SystemExit(verdict)
write_status(smk.output.status, OK, counts=dict(sorted(counts.items())),
             exposures=len(rows))
log.info("run clean: %s", dict(counts))
