"""Rule ``fetch_file``: download (local source: link or copy) one file of a manifest.

input:   manifest -- the manifest written by fetch_manifest.py
output:  file     -- the file; its base name must be a rate_file or cal_file of the manifest
         status   -- JSON status record: ok, or failed with the archive's reason when it
                     refuses the file (HTTP 401/403/404) or never delivers it whole;
                     the file is then an empty placeholder and the exposure fails alone
config:  archive  -- the ``archive`` section; used here (not params: a mirror or a
                     loopback server on another port triggers no rerun):
  url       MAST base URL (default https://mast.stsci.edu); unused for file:// URIs
  retries   extra attempts after server errors / timeouts / short bodies (default 4)
  timeout   read timeout in seconds (default 60)
An existing file of the manifest size is not fetched again; the file appears only when
complete. MAST_API_TOKEN in the environment is used for exclusive-access files.
Logs to the rule's log file.
"""

from nsclean.workflow.steps import fetch_file, snakemake_job

smk = snakemake  # noqa: F821 (injected by Snakemake)
job = snakemake_job(smk)
job["params"]["archive"] = smk.config["archive"]
fetch_file(**job)
