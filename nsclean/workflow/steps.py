"""The steps of the workflow (manifest, download, mask, clean with QA) as plain functions.

Each step takes the job's files and settings as plain dictionaries, writes every
declared output and returns nothing; :mod:`nsclean.workflow.pipeline` describes the
status records and how an exposure's failure is recorded.  The rule scripts
(``scripts/*.py``, run by Snakemake's ``script:``) call them with
:func:`snakemake_job`: rule, script, library, nothing in between.

The clean step also measures the cleaned exposure (the QA metrics and figures) from the
arrays it holds, instead of a QA job reading the rate, cleaned and mask files again:
one process per exposure fewer and about 170 MB less to read for a full frame.

All heavy imports (numpy, astropy, matplotlib, requests) happen inside the steps, so
that importing this module is cheap.

Arguments common to every step
------------------------------
input, output : dict
    The rule's named input and output files.
params : dict
    The rule's params (``options``: the config section of the step; ``archive`` for
    the download) and ``fsync`` (flush written files to disk before renaming them
    into place).
log : str
    The rule's log file.
wildcards : dict
    The rule's wildcards (``program``, ``stem``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .pipeline import (
    CLEANED,
    FAILED,
    OK,
    StepFailed,
    checksum_cards,
    file_checksum,
    input_checksums,
    require_product,
    script_logging,
    step,
    storage_full_reason,
    write_placeholders,
    write_status,
)

__all__ = ["clean", "clean_timeseries", "fetch_file", "fetch_manifest", "mask",
           "snakemake_job"]


def fetch_manifest(input: dict, output: dict, params: dict, log: str,
                   wildcards: dict) -> None:
    """Checkpoint ``fetch_manifest``: list a program's exposures (MAST or a directory).

    output: ``manifest`` (CSV, one row per exposure; skipped exposures have status
    ``skipped`` and a reason).  ``params["archive"]`` is the ``archive`` section of the
    config: ``source`` (``mast`` or ``local``), ``url``, ``local_dir``, the selections
    ``observations``, ``modes``, ``detectors``, ``gratings``, ``filters``,
    ``missing_cal``, and ``retries``, ``timeout`` of the queries; ``params["programs"]``
    (default: the ``program`` wildcard).  The token for exclusive-access data comes from
    ``MAST_API_TOKEN`` only.  Runs in its own process: astroquery's URLs are fixed when
    it is imported, after :func:`nsclean.archive.archive.configure_mast_server`.
    """
    from ..archive import archive

    logger = script_logging(log)
    settings = params.get("archive") or {}
    source = settings.get("source") or "mast"
    url = settings.get("url") or archive.DEFAULT_ARCHIVE_URL
    if source == "mast":  # before anything imports astroquery.mast
        archive.configure_mast_server(url)
    selections = {key: settings.get(key) for key in ("observations", "modes", "detectors",
                                                     "gratings", "filters")}
    try:
        manifest = archive.fetch_manifest(
            params.get("programs") or [wildcards["program"]], source=source,
            local_dir=settings.get("local_dir") or None, archive_url=url,
            missing_cal=settings.get("missing_cal") or "skip",
            retries=int(settings.get("retries", 3)),
            timeout=float(settings.get("timeout", 120.0)), **selections)
    except (archive.ArchiveError, ValueError) as error:  # the reason belongs in the log
        logger.error("%s", error)
        raise
    archive.write_manifest(manifest, output["manifest"])
    logger.info("%d exposures to process; without cal: %s", len(manifest.to_process),
                ", ".join(manifest.without_cal) or "none")


def _step_logging(log: str, params: dict):
    """The step's logger (see :func:`script_logging`); notes the fsync setting."""
    logger = script_logging(log)
    if params.get("fsync"):
        logger.info("fsync on: written files are flushed to disk before they are renamed "
                    "into place")
    return logger


def fetch_file(input: dict, output: dict, params: dict, log: str, wildcards: dict) -> None:
    """Rule ``fetch_file``: download (local source: link or copy) one file of a manifest.

    input: ``manifest``; output: ``file`` (its base name must be a rate or cal file of
    the manifest) and ``status`` (JSON record: ok, or failed with the archive's reason
    when it refuses the file or never delivers it whole; the file is then an empty
    placeholder and the exposure fails alone).  ``params["archive"]`` is the
    ``archive`` section of the config: ``url`` (MAST base URL), ``retries``,
    ``timeout``, ``backoff``, ``deadline`` and ``min_rate``
    (:func:`nsclean.archive.archive.download_file`).  An existing
    file of the manifest's size is not fetched again; the file appears only when
    complete.  ``MAST_API_TOKEN`` in the environment is used for exclusive-access files.
    """
    from ..archive import archive

    logger = _step_logging(log, params)
    settings = params.get("archive") or {}
    target = Path(output["file"])
    rows = archive.read_manifest(input["manifest"])
    # only rows to process have files to fetch (a skipped or failed row may name a file
    # that cannot be one, e.g. a "... (1)_rate.fits" copy)
    files = {name: (uri, size) for r in rows if r.status == "ok"
             for name, uri, size in r.files()}
    if target.name not in files:
        raise archive.ArchiveError(f"{target.name} is not listed in {input['manifest']}")
    uri, size = files[target.name]
    try:
        result = archive.download_file(
            uri, target, expected_size=size,
            archive_url=settings.get("url") or archive.DEFAULT_ARCHIVE_URL,
            retries=int(settings.get("retries", 4)),
            backoff=float(settings.get("backoff", 1.0)),
            timeout=(10.0, float(settings.get("timeout", 60.0))),
            deadline=settings.get("deadline"),
            min_rate=float(settings.get("min_rate") or archive.MIN_RATE),
            fsync=bool(params.get("fsync")))
    except (archive.DownloadError, OSError) as error:
        # Refused, or not delivered whole after the retries, or no room on the disk:
        # this exposure fails (rule mask reads the record), the others go on.  No
        # partial data is left in place.
        reason = str(error) if isinstance(error, archive.DownloadError) \
            else storage_full_reason(error)
        if reason is None:
            raise
        logger.error("%s", reason)
        write_placeholders([target])
        write_status(output["status"], FAILED, reason, file=target.name)
    else:
        logger.info("%s: %s, %d bytes, %d attempts, %.2f s", target.name,
                    "fetched" if result.fetched else "cached", result.nbytes,
                    result.attempts, result.seconds)
        write_status(output["status"], OK, file=target.name, bytes=result.nbytes)


def mask(input: dict, output: dict, params: dict, log: str, wildcards: dict) -> None:
    """Rule ``mask``: the background mask of one exposure.

    input: ``rate``, ``cal`` (lists: every segment of a time series; ``cal`` empty
    without cal file), optionally the download status records (``rate_status``,
    ``cal_status``) and ``user_mask`` (the configured mask of an exposure without cal
    file, used as it is); output: ``mask`` (FITS, 1 = background; empty if
    the exposure failed) and ``status`` (JSON record with the mask summary, input
    checksums and the mask file's size).
    """
    logger = _step_logging(log, params)
    options = dict(params["options"])
    with step(output["status"], [output["mask"]], logger) as record:
        # Status records of the downloads (an archive refusal fails this exposure with
        # the archive's reason), and the files the size they were downloaded with.
        rates, cals = _paths(input["rate"]), _paths(input.get("cal"))
        for key, files in (("rate", rates), ("cal", cals)):
            for status_file, path in zip(_paths(input.get(f"{key}_status")), files,
                                         strict=False):
                require_product(status_file, path, "its download")
        user_mask = input.get("user_mask") or None
        if not cals and user_mask is None:
            raise StepFailed(f"{rates[0]}: no cal file (so no automatic mask) and no user "
                             f"mask in the config for exposure {wildcards['stem']} "
                             "(user_masks.exposures, or user_masks.modes by mode and detector)")
        record["inputs"] = input_checksums(rates + cals + ([user_mask] if user_mask else []))
        # A user mask stands in for a missing cal file: used as it is.
        mask_args = {"user_mask_path": user_mask, "user_mask_mode": "replace",
                     "options": options, "overwrite": True,
                     "fsync": bool(params.get("fsync"))}
        if _time_series(rates):
            from ..io.tso import make_rateints_mask

            summary = make_rateints_mask(cals or None, rates, output["mask"], **mask_args)
        else:
            from ..io.exposure import make_mask

            summary = make_mask(cals[0] if cals else None, rates[0], output["mask"],
                                **mask_args)
        logger.info("mask of %s: %d background pixels (%.1f %%), %d weak columns",
                    summary["stem"], summary["n_background"],
                    100 * summary["background_fraction"], summary["n_weak_columns"])
        write_status(output["status"], OK, mask=summary, mask_options=options,
                     bytes=os.path.getsize(output["mask"]), **record)


def _paths(value) -> list[str]:
    """A rule's named input as a list (one file, or a list of files, or none)."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


def _time_series(rates: list[str]) -> bool:
    return any(str(path).endswith("_rateints.fits") for path in rates)


def clean(input: dict, output: dict, params: dict, log: str, wildcards: dict) -> None:
    """Rule ``clean``: fit and subtract the correlated read noise of one exposure, then
    measure the result (QA) from the arrays already in memory.

    input: ``rate``, ``mask``, ``mask_status``; output: ``cleaned`` (the cleaned rate
    file; empty if the exposure failed), optionally ``model`` (the fitted noise,
    ``<stem>_flicker_noise.fits``, with ``save_noise_model: true``), ``status`` (JSON
    record with the fit summary, provenance and the cleaned file's size), ``metrics``
    (the exposure's final record in the layout of
    :func:`nsclean.report.report.write_record`, with the fit summary and provenance) and
    ``figures`` (a directory of PNGs, empty if the exposure failed).
    ``params["options"]`` are options of :func:`nsclean.fit`; ``params["qa_options"]``
    the ``qa`` section of the config (``figures`` turns the figures off).  The mask
    options the mask step recorded decide the weak-column guard of the summary.
    """
    logger = _step_logging(log, params)
    arrays: dict = {}
    model = output.get("model")  # the noise model, with save_noise_model: true
    with step(output["status"], [output["cleaned"]] + ([model] if model else []),
              logger) as record:
        mask_record = require_product(input["mask_status"], input["mask"], "the mask step")
        record["inputs"] = {**mask_record.get("inputs", {}),
                            "mask": file_checksum(input["mask"])}
        record["mask_options"] = mask_record.get("mask_options", {})
        from ..io.exposure import clean_exposure

        (rate,) = _paths(input["rate"])
        summary = clean_exposure(rate, output["cleaned"], mask_path=input["mask"],
                                 mask_options=record["mask_options"],
                                 fit_options=dict(params["options"]), overwrite=True,
                                 save_model=bool(model),
                                 fsync=bool(params.get("fsync")),
                                 extra_cards=checksum_cards(record["inputs"]),
                                 arrays=arrays)
        logger.info("cleaned %s: %s", summary["stem"], summary["fit"])
        write_status(output["status"], OK, clean=summary,
                     bytes=os.path.getsize(output["cleaned"]), **record)
    _quality(output, params.get("qa_options") or {}, wildcards, logger, arrays)


def clean_timeseries(input: dict, output: dict, params: dict, log: str,
                     wildcards: dict) -> None:
    """Rule ``clean_timeseries``: clean every integration of one time series.

    input: ``rate`` (every ``_rateints.fits`` segment), ``mask``, ``mask_status``;
    output: ``cleaned`` (a folder of ``<file stem>_nsclean_rateints.fits``, one per
    segment; empty if the exposure failed), ``status`` (JSON record with the fit
    summary, provenance and the size of every cleaned file, ``files``), and ``metrics``
    and ``figures`` as in :func:`clean`, measured on the first integration.
    ``params["options"]`` are options of :func:`nsclean.fit`.  The integrations are
    fitted in the job's process (:func:`nsclean.io.tso.clean_rateints` with one worker).
    """
    logger = _step_logging(log, params)
    arrays: dict = {}
    folder = Path(output["cleaned"])
    folder.mkdir(parents=True, exist_ok=True)
    with step(output["status"], [], logger) as record:
        mask_record = require_product(input["mask_status"], input["mask"], "the mask step")
        record["inputs"] = {**mask_record.get("inputs", {}),
                            "mask": file_checksum(input["mask"])}
        record["mask_options"] = mask_record.get("mask_options", {})
        from ..io.tso import clean_rateints

        summary = clean_rateints(_paths(input["rate"]), folder, mask_path=input["mask"],
                                 fit_options=dict(params["options"]), overwrite=True,
                                 save_model=bool(params.get("save_noise_model")),
                                 fsync=bool(params.get("fsync")),
                                 extra_cards=checksum_cards(record["inputs"]), workers=1)
        logger.info("cleaned %s: %d integrations in %d files, %s", summary["stem"],
                    summary["n_integrations"], summary["segments"], summary["fit"])
        write_status(output["status"], OK, clean=summary, **record,
                     files={Path(p).name: os.path.getsize(p) for p in summary["outputs"]})
        arrays.update(_first_integration(_paths(input["rate"]), folder, input["mask"]))
    _quality(output, params.get("qa_options") or {}, wildcards, logger, arrays)


def _first_integration(rates: list[str], folder: Path, mask_path: str) -> dict:
    """The arrays QA measures of a time series: its first integration, before and after,
    the exposure's mask and the header (as :func:`clean_exposure` fills ``arrays``)."""
    from ..io.exposure import RateExposure, read_mask
    from ..io.tso import cleaned_name, read_rateints, read_segment

    exposure = read_rateints(rates)
    first = exposure.segments[0]
    sci, dq = first.read()
    after, _ = read_segment(folder / cleaned_name(first.path)).read()
    before = RateExposure(path=first.path, stem=exposure.stem, header=first.header,
                          sci=sci[0], dq=dq[0])
    mask, _ = read_mask(mask_path, before)
    # FITS data are big-endian: convert once (the same values).
    native = sci.dtype.newbyteorder("=")
    return {"sci": sci[0].astype(native), "cleaned": after[0].astype(native),
            "mask": mask, "header": first.header}


def _quality(output: dict, options: dict, wildcards: dict, logger, arrays: dict) -> None:
    """QA of the exposure just cleaned: metrics and figures from the arrays in memory
    (``arrays`` as filled by :func:`nsclean.io.exposure.clean_exposure`), or a failed
    record with the clean step's reason."""
    metrics_path = Path(output["metrics"])
    figure_dir = Path(output["figures"])
    figure_dir.mkdir(parents=True, exist_ok=True)
    # <results>/<program>/<stem>/<stem>_clean.json: the results directory is three up.
    results_dir = Path(output["status"]).parents[2]
    with step(metrics_path, [], logger) as record:
        record.update(program=wildcards["program"], stem=wildcards["stem"],
                      cleaned_file=None)
        clean_record = require_product(output["status"], output["cleaned"],
                                       "the clean step")
        record.update(inputs=clean_record["inputs"],
                      mask_options=clean_record["mask_options"], clean=clean_record["clean"])
        import numpy as np

        from ..algorithm import qa as qa_metrics
        from ..report import figures

        before_sci, after_sci = arrays["sci"], arrays["cleaned"]
        header = arrays.get("header") or {}
        record["setup"] = {key.lower(): str(header[key]).strip() for key in
                           ("EXP_TYPE", "DETECTOR", "GRATING", "FILTER", "READPATT",
                            "SUBARRAY") if key in header}
        # The subtracted model, where it is observable: NaN rate pixels stay NaN in the
        # cleaned file and carry no model (0 there, so the model metrics stay finite).
        model = np.nan_to_num(before_sci.astype(np.float64) - after_sci, nan=0.0)
        spectra = {}  # the banding spectra the metrics are measured from, for the figure
        metrics = qa_metrics.exposure_metrics(before_sci, after_sci, model, arrays["mask"],
                                              fit_info=clean_record["clean"]["fit"],
                                              spectra=spectra)
        pngs = {}
        if options.get("figures", True):
            pngs = figures.write_figures(before_sci, after_sci, model, arrays["mask"],
                                         figure_dir, wildcards["stem"], spectra=spectra)
        logger.info("QA of %s: flags %s", wildcards["stem"], metrics["flags"] or "none")
        record["cleaned_file"] = os.path.relpath(output["cleaned"], results_dir)
        # Figure paths relative to the record's folder, as nsclean.report.report expects.
        record["figures"] = {kind: os.path.relpath(path, metrics_path.parent)
                             for kind, path in pngs.items()}
        write_status(metrics_path, CLEANED, metrics=metrics, **record)


def snakemake_job(smk) -> dict:
    """The arguments of a step from a rule script's ``snakemake`` object.

    ``input``, ``output`` and ``wildcards`` as dictionaries, ``log`` (the rule's first
    log file) and ``params``: the rule's params plus the config's ``fsync`` (how files
    are written, not what is in them, so it is not a rule param and no rerun trigger).
    """
    params = {**dict(smk.params.items()), "fsync": bool(smk.config.get("fsync", False))}
    return {"input": dict(smk.input.items()), "output": dict(smk.output.items()),
            "params": params, "log": smk.log[0], "wildcards": dict(smk.wildcards.items())}
