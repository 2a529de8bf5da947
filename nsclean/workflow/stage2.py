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

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

from ..io.atomic import atomic_write_text

__all__ = ["Spec2Error", "cleaned_files", "prepare_associations", "run_spec2", "spec2_steps"]


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


class Spec2Error(RuntimeError):
    """One association cannot be run; the message names the file and the problem."""


def spec2_steps(steps: Mapping | None = None) -> dict:
    """Spec2Pipeline step parameters for a run on cleaned rates.

    ``steps`` (``stage2.steps`` in the config) maps step names to parameters, as
    ``Spec2Pipeline.call(steps=...)`` takes them; ``clean_flicker_noise`` is always
    skipped.

    Raises
    ------
    ValueError
        If ``steps`` turns ``clean_flicker_noise`` on: the rates are cleaned already.
    """
    merged = copy.deepcopy({name: dict(options) for name, options in (steps or {}).items()})
    if merged.get("clean_flicker_noise", {}).get("skip", True) is False:
        raise ValueError("stage2.steps.clean_flicker_noise.skip is false: the rates are "
                         "cleaned already, so jwst's clean_flicker_noise must stay skipped")
    merged.setdefault("clean_flicker_noise", {})["skip"] = True
    return merged


def _configure_crds(crds: Mapping) -> tuple[str, str]:
    path = crds.get("crds_path") or os.environ.get("CRDS_PATH", "")
    server = crds.get("crds_server_url") or os.environ.get("CRDS_SERVER_URL", "")
    if not path:
        raise RuntimeError("stage2.run needs a CRDS cache: set stage2.crds_path (and "
                           "stage2.crds_server_url, or a complete offline cache)")
    os.environ["CRDS_PATH"] = str(path)
    if server:
        os.environ["CRDS_SERVER_URL"] = server
    return str(path), server


def _resolved_association(path: Path, work: Path) -> tuple[Path, int]:
    """Copy of the association in ``work`` with absolute member paths.

    jwst resolves a member name against the association's folder only when it is a bare
    file name; ``../../<stem>/<stem>_nsclean_rate.fits`` would be taken from the current
    directory.  Returns the copy and its number of products.
    """
    from ..archive.associations import AssociationError, read_association, write_association

    try:
        asn = read_association(path)
    except AssociationError as error:
        raise Spec2Error(str(error)) from None
    for product in asn["products"]:
        for member in product["members"]:
            target = (path.parent / member["expname"]).resolve()
            if target.is_file():
                member["expname"] = str(target)
            elif member["expname"].endswith(".fits"):  # an exposure: it must be there
                raise Spec2Error(f"{path.name}: {member.get('exptype', 'member')} "
                                 f"{member['expname']} not found ({target})")
            # (else not a file of ours, such as a source catalogue: left to jwst)
    return write_association(asn, work / path.name), len(asn["products"])


def _one_line(error: BaseException) -> str:
    text = str(error)
    if "Traceback (most recent call last)" in text:
        # Spec2Pipeline joins the tracebacks of failed products: keep the last line
        lines = [line for line in text.splitlines() if line.strip()]
        return " ".join(lines[-1].split())
    return " ".join(f"{type(error).__name__}: {text}".split())


def _run_association(pipeline, path: Path, output_dir: Path, steps: dict,
                     crds: tuple[str, str]) -> dict:
    """Run calwebb_spec2 on one association in a scratch folder; publish its products
    into ``output_dir`` only when every product was made."""
    import shutil

    from ..io.atomic import publish

    work = output_dir / f".{path.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        resolved, n_products = _resolved_association(path, work)
        try:
            # (configure_log=False: jwst's messages go to our log once, not twice)
            results = pipeline.call(str(resolved), output_dir=str(work), save_results=True,
                                    steps=copy.deepcopy(steps), configure_log=False)
        except SystemExit as error:  # CRDS ends the process on a fatal error
            raise Spec2Error(f"{path.name}: CRDS could not be used (CRDS_PATH={crds[0]}, "
                             f"CRDS_SERVER_URL={crds[1] or 'unset'}): "
                             f"{_one_line(error.__context__ or error)}") from None
        except Exception as error:
            raise Spec2Error(f"{path.name}: calwebb_spec2 failed: {_one_line(error)}") \
                from None
        for model in results or []:
            model.close()
        if len(results or []) < n_products:
            raise Spec2Error(f"{path.name}: calwebb_spec2 made {len(results or [])} of "
                             f"{n_products} products (assign_wcs skipped or failed: see "
                             "the log)")
        products = sorted(p.name for p in work.iterdir() if p != resolved)
        for name in products:
            publish(work / name, output_dir / name)
        return {"file": path.name, "status": "ok", "reason": "", "products": products}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_spec2(associations_dir, status_in, output_dir, status_path, *, crds: Mapping,
              steps: Mapping | None = None, logger) -> list[dict]:
    """Run ``calwebb_spec2`` on every association that was prepared (status ``ok``).

    Parameters
    ----------
    associations_dir : path
        Folder of the rewritten associations (:func:`prepare_associations`).
    status_in : path
        Their status record; associations not ``ok`` there are passed on as they are.
    output_dir : path
        Folder for the stage-2 products.  Each association runs in a scratch folder
        inside it; its products are renamed into place only when every product of the
        association was made.
    status_path : path
        JSON written here: per association ``file``, ``status`` (``ok`` or ``failed``),
        a one-line ``reason`` and the ``products`` written.
    crds : mapping
        ``crds_path`` and ``crds_server_url`` (else the environment's ``CRDS_PATH`` and
        ``CRDS_SERVER_URL``).
    steps : mapping, optional
        Spec2Pipeline step parameters (``stage2.steps``); see :func:`spec2_steps`.
        ``clean_flicker_noise`` is always skipped: the rates are cleaned already.
    logger : logging.Logger

    Raises
    ------
    RuntimeError
        One line, when no CRDS cache is configured or jwst is not installed.
    ValueError
        If ``steps`` turns ``clean_flicker_noise`` on.
    """
    steps = spec2_steps(steps)
    settings = _configure_crds(crds)
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
        try:  # one association's failure must not stop the others
            entries.append(_run_association(Spec2Pipeline, Path(associations_dir) /
                                            entry["file"], output_dir, steps, settings))
            logger.info("%s: %s", entry["file"], ", ".join(entries[-1]["products"]))
        except Exception as error:
            reason = str(error) if isinstance(error, Spec2Error) else \
                f"{entry['file']}: {_one_line(error)}"
            logger.error("%s", reason)
            entries.append({"file": entry["file"], "status": "failed", "reason": reason,
                            "products": []})
    _write_status(status_path, entries)
    failed = sum(e["status"] != "ok" for e in entries)
    logger.info("calwebb_spec2: %d of %d associations ok", len(entries) - failed,
                len(entries))
    return entries
