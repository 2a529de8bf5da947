"""Snakemake rule script: download (or, for the local source, link/copy) one file.

input:   manifest -- the manifest written by fetch_manifest.py
output:  [0]      -- the file; its base name must be a rate_file or cal_file of the manifest
         status   -- JSON status record: ok, or failed with the archive's reason when it
                     refuses the file (HTTP 401/403/404) or never delivers it whole;
                     the file is then an empty placeholder and the exposure fails alone
log:     [0]      -- log file
Each setting is taken from params, else from config["archive"], else the default:
  url       MAST base URL (default https://mast.stsci.edu); unused for file:// URIs
  retries   extra attempts after server errors / timeouts / short bodies (default 4)
  timeout   read timeout in seconds (default 60)
  backoff   first retry delay in seconds, doubling (default 1)
An existing file of the manifest size is not fetched again; the file appears only when
complete. MAST_API_TOKEN in the environment is used for exclusive-access files.
"""

import logging
from pathlib import Path

from nsclean import archive
from nsclean.pipeline import FAILED, OK, write_placeholders, write_status

smk = snakemake  # noqa: F821
logging.basicConfig(filename=smk.log[0], level=logging.INFO, force=True,
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")


def setting(name, default=None):
    value = smk.params.get(name, None)
    return smk.config.get("archive", {}).get(name, default) if value is None else value


target = Path(smk.output[0])
rows = archive.read_manifest(smk.input.manifest)
files = {r.rate_file: (r.rate_uri, r.rate_size) for r in rows if r.rate_file}
files.update({r.cal_file: (r.cal_uri, r.cal_size) for r in rows if r.cal_file})
if target.name not in files:
    raise archive.ArchiveError(f"{target.name} is not listed in {smk.input.manifest}")
uri, size = files[target.name]
try:
    result = archive.download_file(
        uri, target, expected_size=size,
        archive_url=setting("url", archive.DEFAULT_ARCHIVE_URL),
        retries=int(setting("retries", 4)), backoff=float(setting("backoff", 1.0)),
        timeout=(10.0, float(setting("timeout", 60.0))))
except archive.DownloadError as error:
    # Refused, or not delivered whole after the retries: this exposure fails (rule mask
    # reads the record), the others go on.  No partial data is ever left in place.
    logging.error("%s", error)
    write_placeholders([target])
    write_status(smk.output.status, FAILED, str(error), file=target.name)
else:
    logging.info("%s: %s, %d bytes, %d attempts, %.2f s", target.name,
                 "fetched" if result.fetched else "cached", result.nbytes, result.attempts,
                 result.seconds)
    write_status(smk.output.status, OK, file=target.name, bytes=result.nbytes)
