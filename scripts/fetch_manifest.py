"""Snakemake rule script: build the exposure manifest from MAST or a local directory.

output:  manifest -- CSV (.tsv: tab-separated), one row per exposure, columns
                    nsclean.archive.MANIFEST_COLUMNS; skipped exposures have status
                    "skipped" and a reason
log:     [0]      -- log file
Each setting below is taken from params, else from config["archive"], else the default:
  programs     list of program IDs (default: the {program} wildcard)
  source       "mast" (default) or "local"
  url          MAST base URL (default https://mast.stsci.edu)
  local_dir    directory of *_rate.fits / *_cal.fits (source "local")
  observations, modes, detectors, gratings, filters   optional selections
  missing_cal  "skip" (default), "user_mask" or "error"
  retries, timeout   query retries (3) and per-request timeout in seconds (120)
The token for exclusive-access data comes from MAST_API_TOKEN in the environment only.
"""

import logging

from nsclean import archive

smk = snakemake  # noqa: F821
logging.basicConfig(filename=smk.log[0], level=logging.INFO, force=True,
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")


def setting(name, default=None):
    value = smk.params.get(name, None)
    return smk.config.get("archive", {}).get(name, default) if value is None else value


source = setting("source", "mast")
url = setting("url", archive.DEFAULT_ARCHIVE_URL)
if source == "mast":  # before anything imports astroquery.mast: its URLs are fixed at import
    archive.configure_mast_server(url)
selections = {k: setting(k) for k in ("observations", "modes", "detectors", "gratings",
                                      "filters")}
try:
    manifest = archive.fetch_manifest(
        setting("programs") or [smk.wildcards.program], source=source,
        local_dir=setting("local_dir") or None, archive_url=url,
        missing_cal=setting("missing_cal", "skip"), retries=int(setting("retries", 3)),
        timeout=float(setting("timeout", 120.0)), **selections)
except (archive.ArchiveError, ValueError) as error:  # the reason belongs in the log too
    logging.error("%s", error)
    raise
archive.write_manifest(manifest, smk.output.manifest)
logging.info("%d exposures to process; without cal: %s", len(manifest.to_process),
             ", ".join(manifest.without_cal) or "none")
