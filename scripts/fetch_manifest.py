"""Checkpoint ``fetch_manifest``: list a program's exposures, from MAST or a directory.

output:  manifest -- CSV, one row per exposure, columns nsclean.archive.archive.MANIFEST_COLUMNS;
                    skipped exposures have status "skipped" and a reason
params:  source, local_dir, observations, modes, detectors, gratings, filters, missing_cal
                  -- the settings that decide the list (the rerun trigger)
config:  archive  -- the whole ``archive`` section, ``url``, ``retries`` and ``timeout``
                    included (read here, not params: a mirror triggers no rerun)
The program is the {program} wildcard.  The token for exclusive-access data comes from
MAST_API_TOKEN in the environment only.  Logs to the rule's log file.
"""

from nsclean.workflow.steps import fetch_manifest, snakemake_job

smk = snakemake  # noqa: F821 (injected by Snakemake)
job = snakemake_job(smk)
job["params"]["archive"] = smk.config["archive"]
fetch_manifest(**job)
