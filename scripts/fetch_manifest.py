"""Checkpoint ``fetch_manifest``: list a program's exposures, from MAST or a directory.

output:  manifest -- CSV, one row per exposure, columns nsclean.archive.archive.MANIFEST_COLUMNS;
                    skipped exposures have status "skipped" and a reason
params:  archive  -- the ``archive`` section of the config; used here:
  source       "mast" (default) or "local"
  url          MAST base URL (default https://mast.stsci.edu)
  local_dir    directory of *_rate.fits / *_cal.fits (source "local")
  observations, modes, detectors, gratings, filters   optional selections
  missing_cal  "skip" (default), "user_mask" or "error"
  retries, timeout   query retries (3) and per-request timeout in seconds (120)
The program is the {program} wildcard.  The token for exclusive-access data comes from
MAST_API_TOKEN in the environment only.
Run by the rule's shell command as ``python fetch_manifest.py JOB --log LOG``: JOB is
the job's files and settings as JSON (``step_command`` in workflow/rules/common.smk).
The step (``nsclean.workflow.steps.fetch_manifest``) runs in this process (astroquery is
imported once per run); with warm workers on, it first starts the warm-worker server in
the background, so that the downloads and the steps after them find it ready.
"""

import os
import sys

# As for a Snakemake script: the workflow's own nsclean is importable when none is
# installed (an installed one comes first).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nsclean.workflow.warm import run_command_step  # noqa: E402

run_command_step("fetch_manifest", in_process=True)
