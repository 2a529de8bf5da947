"""Rule ``clean``: fit and subtract the correlated read noise of one exposure.

input:  rate        -- the exposure's ``_rate.fits``
        mask        -- its background mask (from rule ``mask``)
        mask_status -- the mask step's status record
output: cleaned     -- cleaned rate file (empty placeholder if the exposure failed)
        status      -- JSON status record: ok/failed, reason, fit summary, provenance
params: options     -- the ``clean`` section of the config (options of nsclean.fit)
"""

from nsclean.pipeline import (
    OK,
    checksum_cards,
    file_checksum,
    require_ok,
    script_logging,
    step,
    write_status,
)

smk = snakemake  # noqa: F821 (injected by Snakemake)
log = script_logging(smk.log[0])

with step(smk.output.status, [smk.output.cleaned], log) as record:
    (mask_record,) = require_ok([smk.input.mask_status])
    record["inputs"] = {**mask_record.get("inputs", {}),
                        "mask": file_checksum(smk.input.mask)}
    record["mask_options"] = mask_record.get("mask_options", {})
    from nsclean.exposure import clean_exposure

    summary = clean_exposure(smk.input.rate, smk.output.cleaned, mask_path=smk.input.mask,
                             fit_options=dict(smk.params.options), overwrite=True,
                             extra_cards=checksum_cards(record["inputs"]))
    log.info("cleaned %s: %s", summary["stem"], summary["fit"])
    write_status(smk.output.status, OK, clean=summary, **record)
