# Fit and subtract the correlated read noise of one exposure (nsclean.fit), and
# measure the result (QA metrics and figures) from the arrays the job holds.


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
        metrics=results_path("{program}", "{stem}", "{stem}_qa.json"),
        figures=report(
            directory(results_path("{program}", "{stem}", "figures")),
            patterns=["{figure}.png"],
            caption="../report/exposure_figures.rst",
            category="Exposures",
            subcategory="{program}",
            labels={"exposure": "{stem}", "figure": "{figure}"},
        ),
    log:
        log_path("clean", "{program}", "{stem}"),
    benchmark:
        benchmark_path("clean", "{program}", "{stem}")
    # On a cluster, one submission per exposure: its downloads, mask and clean.
    group:
        "exposure"
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
        qa_options=QA_OPTIONS,
        software=NSCLEAN_VERSION,
    script:
        "../../scripts/clean_exposure.py"


# A time series (BOTS _rateints, one file per segment): every integration is cleaned
# with the exposure's one mask; the cleaned segments go into one folder.  Its QA
# (first integration) goes into a folder of its own, so that no file name is shared
# with rule clean.
rule clean_timeseries:
    input:
        rate=rate_inputs,
        mask=results_path("{program}", "{stem}", "{stem}_mask.fits"),
        mask_status=results_path("{program}", "{stem}", "{stem}_mask.json"),
    output:
        cleaned=directory(results_path("{program}", "{stem}", "nsclean_rateints")),
        status=results_path("{program}", "{stem}", "{stem}_clean_timeseries.json"),
        metrics=results_path("{program}", "{stem}", "timeseries_qa", "{stem}_qa.json"),
        figures=report(
            directory(results_path("{program}", "{stem}", "timeseries_qa", "figures")),
            patterns=["{figure}.png"],
            caption="../report/exposure_figures.rst",
            category="Exposures",
            subcategory="{program}",
            labels={"exposure": "{stem}", "figure": "{figure}"},
        ),
    log:
        log_path("clean_timeseries", "{program}", "{stem}"),
    benchmark:
        benchmark_path("clean_timeseries", "{program}", "{stem}")
    group:
        "exposure"
    conda:
        "../../envs/nsclean.yaml"
    # Integrations are fitted in this process: the results do not depend on --cores.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        options=CLEAN_OPTIONS,
        qa_options=QA_OPTIONS,
        software=NSCLEAN_VERSION,
        save_noise_model=config["save_noise_model"],
    script:
        "../../scripts/clean_timeseries.py"
