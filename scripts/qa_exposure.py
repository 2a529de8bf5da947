"""Rule ``qa``: metrics before and after cleaning, and the figures, of one exposure.

input:  rate, cleaned, mask -- the original and cleaned rate files and the mask
        clean_status        -- the clean step's status record
output: metrics -- the exposure's final record, in the layout of
                   ``nsclean.report.write_record`` (program, stem, status cleaned/failed,
                   reason, cleaned_file relative to the results directory, metrics of
                   ``nsclean.qa.exposure_metrics``, figures) plus the fit summary and
                   the provenance (software version, options, input checksums)
        figures -- directory of the PNG figures (``nsclean.figures``; empty if failed)
params: options -- the ``qa`` section of the config
"""

import os
from pathlib import Path

from nsclean.pipeline import CLEANED, require_ok, script_logging, step, write_status

smk = snakemake  # noqa: F821 (injected by Snakemake)
log = script_logging(smk.log[0])
metrics_path = Path(smk.output.metrics)
figure_dir = Path(smk.output.figures)
figure_dir.mkdir(parents=True, exist_ok=True)
# <results>/<program>/<stem>/<stem>_qa.json: the results directory is three levels up.
results_dir = metrics_path.parents[2]

with step(metrics_path, [], log) as record:
    record.update(program=smk.wildcards.program, stem=smk.wildcards.stem, cleaned_file=None)
    (clean_record,) = require_ok([smk.input.clean_status])
    record.update(inputs=clean_record["inputs"], mask_options=clean_record["mask_options"],
                  clean=clean_record["clean"])
    import numpy as np

    from nsclean import figures, qa
    from nsclean.exposure import read_mask, read_rate

    before = read_rate(smk.input.rate)
    after = read_rate(smk.input.cleaned)
    mask, _ = read_mask(smk.input.mask, before)
    # FITS data are big-endian; every numpy operation on them would convert on the fly,
    # so convert once (the same values).
    before_sci, after_sci = (exposure.sci.astype(exposure.sci.dtype.newbyteorder("="))
                             for exposure in (before, after))
    # The subtracted model, where it is observable: NaN rate pixels stay NaN in the
    # cleaned file and carry no model (0 there, so the model metrics stay finite).
    model = np.nan_to_num(before_sci.astype(np.float64) - after_sci, nan=0.0)
    spectra = {}  # the banding spectra the metrics are measured from, for the figure
    metrics = qa.exposure_metrics(before_sci, after_sci, model, mask,
                                  fit_info=clean_record["clean"]["fit"], spectra=spectra)
    pngs = {}
    if smk.params.options["figures"]:
        pngs = figures.write_figures(before_sci, after_sci, model, mask, figure_dir,
                                     before.stem, spectra=spectra)
    log.info("QA of %s: flags %s", before.stem, metrics["flags"] or "none")
    record["cleaned_file"] = os.path.relpath(smk.input.cleaned, results_dir)
    # Figure paths relative to the record's folder, as nsclean.report expects.
    record["figures"] = {kind: os.path.relpath(path, metrics_path.parent)
                         for kind, path in pngs.items()}
    write_status(metrics_path, CLEANED, metrics=metrics, **record)
