"""Rule ``stage2_run`` (opt-in, ``stage2.run: true``): calwebb_spec2 on the cleaned rates.

input:  associations -- the folder of rewritten associations (rule stage2_associations)
        status       -- their status record
output: products     -- folder of stage-2 products (``clean_flicker_noise`` skipped)
        status       -- JSON: per association ok or failed, with the reason
params: crds         -- ``stage2.crds_path`` and ``stage2.crds_server_url``
        steps        -- ``stage2.steps``: Spec2Pipeline step parameters

The job succeeds when some associations fail (their products and the status record are
kept); one console line names them.
"""

from nsclean.workflow.pipeline import script_logging, to_console

smk = snakemake  # noqa: F821 (injected by Snakemake)
log = script_logging(smk.log[0])

from nsclean.workflow.stage2 import run_spec2  # noqa: E402

entries = run_spec2(smk.input.associations, smk.input.status, smk.output.products,
                    smk.output.status, crds=dict(smk.params.crds),
                    steps=dict(smk.params.steps), logger=log)
not_ok = [entry for entry in entries if entry["status"] != "ok"]
if not_ok:
    to_console(f"stage 2: {len(not_ok)} of {len(entries)} associations not run (see "
               f"{smk.output.status}): "
               + "; ".join(f"{e['status']}: {e['reason']}" for e in not_ok[:5]))
