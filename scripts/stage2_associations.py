"""Rule ``stage2_associations``: a program's spec2 associations, pointing at cleaned rates.

input:  manifest -- the program's manifest
        qa       -- the QA records of its exposures (which were cleaned, and where to)
output: associations -- folder of rewritten ``*_spec2_*_asn.json`` (every member cleaned)
        status       -- JSON: per association ok, refused (a member not cleaned) or failed
params: archive      -- the ``archive`` section of the config (MAST or the local directory)
Runs in its own process: astroquery's URLs are fixed when it is imported.
"""

from pathlib import Path

from nsclean.workflow.pipeline import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
log = script_logging(smk.log[0])

from nsclean.workflow.stage2 import prepare_associations  # noqa: E402

prepare_associations(smk.wildcards.program, smk.input.qa,
                     Path(smk.output.associations).parents[2], smk.output.associations,
                     smk.output.status, archive_settings=dict(smk.params.archive), logger=log)
