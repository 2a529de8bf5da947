# Fit and subtract the correlated read noise of one exposure (nsclean.fit), and
# measure the result (QA metrics and figures) from the arrays the job holds.


rule clean:
    input:
        rate=results_path("{program}", "archive", "{stem}_rate.fits"),
        mask=results_path("{program}", "{stem}", "{stem}_mask.fits"),
        mask_status=results_path("{program}", "{stem}", "{stem}_mask.json"),
    output:
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
