# Fit and subtract the correlated read noise of one exposure (nsclean.fit).


rule clean:
    input:
        rate=rate_inputs,
        mask=results_path("{program}", "{stem}", "{stem}_mask.fits"),
        mask_status=results_path("{program}", "{stem}", "{stem}_mask.json"),
    # With save_noise_model: true, also model: <stem>_flicker_noise.fits.
    output:
        **NOISE_MODEL_OUTPUT,
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


# A time series (BOTS _rateints, one file per segment): every integration is cleaned
# with the exposure's one mask; the cleaned segments go into one folder.
rule clean_timeseries:
    input:
        rate=rate_inputs,
        mask=results_path("{program}", "{stem}", "{stem}_mask.fits"),
        mask_status=results_path("{program}", "{stem}", "{stem}_mask.json"),
    output:
        cleaned=directory(results_path("{program}", "{stem}", "nsclean_rateints")),
        status=results_path("{program}", "{stem}", "{stem}_clean_timeseries.json"),
    log:
        log_path("clean_timeseries", "{program}", "{stem}"),
    benchmark:
        benchmark_path("clean_timeseries", "{program}", "{stem}")
    conda:
        "../../envs/nsclean.yaml"
    # Integrations are fitted in this process: the results do not depend on --cores.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        options=CLEAN_OPTIONS,
        software=NSCLEAN_VERSION,
        save_noise_model=config["save_noise_model"],
        command=step_command(
            "clean_timeseries.py",
            options=CLEAN_OPTIONS,
            software=NSCLEAN_VERSION,
            save_noise_model=config["save_noise_model"],
        ),
    shell:
        "{params.command} --log {log:q}"
