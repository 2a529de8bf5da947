"""Rule ``fetch_exposure``: download (local source: link or copy) every file of one exposure.

input:   manifest -- the manifest written by fetch_manifest.py
output:  files    -- directory of the exposure's rate and cal files (every segment of a
                     time series)
         status   -- JSON status record: ok, or failed with the archive's reason for each
                     file it refused (HTTP 401/403/404) or never delivered whole; the
                     exposure then fails alone
config:  archive  -- the ``archive`` section (url, retries, timeout, backoff); read here,
                     not as params: a mirror or a loopback server on another port
                     triggers no rerun
Files appear only when complete; an interrupted download resumes. MAST_API_TOKEN in the
environment is used for exclusive-access files. Logs to the rule's log file.
"""

from nsclean.workflow.steps import fetch_exposure, snakemake_job

smk = snakemake  # noqa: F821 (injected by Snakemake)
job = snakemake_job(smk)
job["params"]["archive"] = smk.config["archive"]
fetch_exposure(**job)
