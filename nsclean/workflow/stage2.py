"""Stage 2 again, on the cleaned rates: the workflow's optional last steps.

:func:`prepare_associations` (rule ``stage2_associations``) fetches a program's spec2
association files (MAST or the local directory), and writes copies whose members
(science, background, imprint ...) are the cleaned files
(:func:`nsclean.archive.associations.rewrite_spec2_association`); an association with
a member that was not cleaned is refused and listed with the reason.
:func:`run_spec2` (rule ``stage2_run``, opt-in) runs ``calwebb_spec2`` on each with
``clean_flicker_noise`` skipped: the rates are cleaned already.

Each association is handled on its own: one that cannot be fetched, rewritten or run is
recorded as failed with its reason, the others go on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io.atomic import atomic_write_text

__all__ = ["cleaned_files", "prepare_associations", "run_spec2"]


def cleaned_files(qa_paths, results_dir) -> dict[str, Path]:
    """Exposure stem (and, for time series, each segment's rateints name) -> cleaned file,
    from the QA records of the exposures that were cleaned."""
    from ..io.tso import cleaned_name, parse_product_name
    from ..report.report import load_records

    cleaned: dict[str, Path] = {}
    for record in load_records(list(qa_paths)):
        if record["status"] != "cleaned" or not record["cleaned_file"]:
            continue
        path = Path(results_dir) / record["cleaned_file"]
        if path.is_dir():  # a time series: one cleaned file per rateints segment
            for name in record.get("inputs") or {}:
                if name.endswith("_rateints.fits") and parse_product_name(name):
                    cleaned[name] = path / cleaned_name(name)
        else:
            cleaned[record["stem"]] = path
    return cleaned


def _write_status(path, entries) -> None:
    text = json.dumps({"associations": entries}, indent=1, sort_keys=True)
    atomic_write_text(path, text + "\n")


def prepare_associations(program: str, qa_paths, results_dir, output_dir, status_path, *,
                         archive_settings: dict, logger) -> list[dict]:
    """Fetch a program's spec2 associations and write copies pointing at cleaned files.

    Returns the status entries (also written to ``status_path``): ``file``, ``status``
    (``ok``, ``refused`` or ``failed``) and ``reason``.
    """
    from ..archive import archive
    from ..archive.associations import (
        AssociationError,
        find_spec2_associations,
        read_association,
        rewrite_spec2_association,
        write_association,
    )

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    source = archive_settings.get("source") or "mast"
    url = archive_settings.get("url") or archive.DEFAULT_ARCHIVE_URL
    if source == "mast":
        archive.configure_mast_server(url)  # before astroquery.mast is imported
    cleaned = cleaned_files(qa_paths, results_dir)
    found = find_spec2_associations(
        [program], source=source, local_dir=archive_settings.get("local_dir") or None,
        archive_url=url, retries=int(archive_settings.get("retries", 3)),
        timeout=float(archive_settings.get("timeout", 120.0)))
    logger.info("program %s: %d spec2 associations", program, len(found))
    download_dir = Path(results_dir) / program / "archive" / "associations"
    entries = []
    for product in found:
        name = product["productFilename"]
        try:
            local = archive.download_file(product["dataURI"], download_dir / name,
                                          expected_size=product["size"], archive_url=url,
                                          retries=int(archive_settings.get("retries", 4)))
            rewritten = rewrite_spec2_association(read_association(local.path), cleaned,
                                                  output_dir, source=name)
            write_association(rewritten, output_dir / name)
            entries.append({"file": name, "status": "ok", "reason": ""})
        except AssociationError as error:
            logger.warning("%s", error)
            entries.append({"file": name, "status": "refused", "reason": str(error)})
        except archive.DownloadError as error:
            logger.error("%s", error)
            entries.append({"file": name, "status": "failed", "reason": str(error)})
    _write_status(status_path, entries)
    return entries


def run_spec2(associations_dir, status_in, output_dir, status_path, *, crds: dict,
              logger) -> list[dict]:
    """Run ``calwebb_spec2`` on every association that was prepared (status ``ok``).

    ``clean_flicker_noise`` is skipped: the rates are cleaned already.  ``crds`` gives
    ``crds_path`` and ``crds_server_url`` (else the environment's ``CRDS_PATH`` and
    ``CRDS_SERVER_URL``); without a CRDS cache or server the job stops with a message.
    """
    path = crds.get("crds_path") or os.environ.get("CRDS_PATH", "")
    server = crds.get("crds_server_url") or os.environ.get("CRDS_SERVER_URL", "")
    if not path:
        raise RuntimeError("stage2.run needs a CRDS cache: set stage2.crds_path (and "
                           "stage2.crds_server_url, or a complete offline cache)")
    os.environ["CRDS_PATH"] = str(path)
    if server:
        os.environ["CRDS_SERVER_URL"] = server
    try:
        from jwst.pipeline import Spec2Pipeline
    except ImportError:
        raise RuntimeError("stage2.run needs the jwst pipeline: pip install "
                           "'nsclean[jwst]'") from None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prepared = json.loads(Path(status_in).read_text())["associations"]
    entries = []
    for entry in prepared:
        if entry["status"] != "ok":
            entries.append(entry)
            continue
        asn = Path(associations_dir) / entry["file"]
        try:
            Spec2Pipeline.call(str(asn), output_dir=str(output_dir), save_results=True,
                               steps={"clean_flicker_noise": {"skip": True}})
            entries.append({"file": entry["file"], "status": "ok", "reason": ""})
        except Exception as error:  # one association's failure must not stop the others
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            logger.error("%s: calwebb_spec2 failed: %s", entry["file"], reason)
            entries.append({"file": entry["file"], "status": "failed", "reason": reason})
    _write_status(status_path, entries)
    return entries
