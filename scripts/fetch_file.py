"""Rule ``fetch_file``: download (local source: link or copy) one file of a manifest.

input:   manifest -- the manifest written by fetch_manifest.py
output:  file     -- the file; its base name must be a rate_file or cal_file of the manifest
         status   -- JSON status record: ok, or failed with the archive's reason when it
                     refuses the file (HTTP 401/403/404) or never delivers it whole;
                     the file is then an empty placeholder and the exposure fails alone
params:  archive  -- the ``archive`` section of the config; used here:
  url       MAST base URL (default https://mast.stsci.edu); unused for file:// URIs
  retries   extra attempts after server errors / timeouts / short bodies (default 4)
  timeout   read timeout in seconds (default 60)
  backoff   first retry delay in seconds, doubling (default 1)
An existing file of the manifest size is not fetched again; the file appears only when
complete. MAST_API_TOKEN in the environment is used for exclusive-access files.
Run by the rule's shell command as ``python fetch_file.py JOB --log LOG``: JOB is the
job's files and settings as JSON (``step_command`` in workflow/rules/common.smk).
The step (``nsclean.workflow.steps.fetch_file``) runs in a warm worker when one can be used
(``nsclean.workflow.warm``).
"""

import os
import sys

# As for a Snakemake script: the workflow's own nsclean is importable when none is
# installed (an installed one comes first).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nsclean.workflow.warm import run_command_step  # noqa: E402

run_command_step("fetch_file")
