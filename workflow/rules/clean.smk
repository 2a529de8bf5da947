# Fit and subtract the correlated read noise of one exposure (nsclean.fit).


rule clean:
    input:
        rate=results_path("{program}", "archive", "{stem}_rate.fits"),
        mask=results_path("{program}", "{stem}", "{stem}_mask.fits"),
        mask_status=results_path("{program}", "{stem}", "{stem}_mask.json"),
    output:
        cleaned=results_path("{program}", "{stem}", "{stem}_nsclean_rate.fits"),
        status=results_path("{program}", "{stem}", "{stem}_clean.json"),
    log:
        log_path("clean", "{program}", "{stem}"),
    benchmark:
        benchmark_path("clean", "{program}", "{stem}")
    conda:
        "../../envs/nsclean.yaml"
    # One thread per exposure: the fit is vectorised numpy, and pinning the
    # thread count keeps the results bit-identical whatever --cores is.
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    params:
        options=CLEAN_OPTIONS,
        software=NSCLEAN_VERSION,
        # The job for the script (the same options; not itself a rerun trigger).
        command=step_command(
            "clean_exposure.py", options=CLEAN_OPTIONS, software=NSCLEAN_VERSION
        ),
    shell:
        "{params.command} --log {log:q}"
