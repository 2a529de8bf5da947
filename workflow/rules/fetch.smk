# Archive access: a checkpoint lists a program's exposures (the manifest), then
# one download job per file.  With archive.source "local" the same rules take
# the files from archive.local_dir instead of MAST.  The token for
# exclusive-access data is read from MAST_API_TOKEN by the scripts, never
# passed as a param (params end up in logs and job metadata).


checkpoint fetch_manifest:
    output:
        manifest=results_path("{program}", "manifest.csv"),
    log:
        log_path("fetch_manifest", "{program}"),
    benchmark:
        benchmark_path("fetch_manifest", "{program}")
    conda:
        "../../envs/nsclean.yaml"
    resources:
        mem_mb=500,
        runtime=30,
        mast_connections=1,
    params:
        # What decides the list of exposures (the rerun trigger).
        **MANIFEST_SETTINGS,
        programs=lambda wildcards: [wildcards.program],
    # The script reads the whole archive section (archive.url, retries, timeout)
    # from the config: a mirror or a loopback server on another port does not
    # trigger a rerun.
    script:
        "../../scripts/fetch_manifest.py"


rule fetch_file:
    input:
        # A download depends on which file it is, not on when the manifest was
        # last rewritten: refreshing the manifest must not fetch everything again.
        manifest=ancient(results_path("{program}", "manifest.csv")),
    output:
        file=results_path("{program}", "archive", "{filename}"),
        # ok, or failed with the archive's reason when it refuses the file or never
        # delivers it whole (an empty placeholder is then left above): rule mask
        # fails that exposure alone, and the reports list it.
        status=results_path("{program}", "downloads", "{filename}.json"),
    log:
        log_path("fetch_file", "{program}", "{filename}"),
    benchmark:
        benchmark_path("fetch_file", "{program}", "{filename}")
    group:
        "exposure"
    conda:
        "../../envs/nsclean.yaml"
    resources:
        mem_mb=500,
        runtime=60,
        mast_connections=1,
    # The script reads archive.url, retries, timeout and backoff from the config:
    # a mirror or a loopback server on another port does not trigger a rerun.
    script:
        "../../scripts/fetch_file.py"
