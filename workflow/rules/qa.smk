# Metrics before and after cleaning, and the figures, per exposure.


rule qa:
    input:
        # rate, cleaned and clean_status: those of rule clean, or clean_timeseries.
        unpack(qa_inputs),
        mask=results_path("{program}", "{stem}", "{stem}_mask.fits"),
    output:
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
        log_path("qa", "{program}", "{stem}"),
    benchmark:
        benchmark_path("qa", "{program}", "{stem}")
    conda:
        "../../envs/nsclean.yaml"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    params:
        options=QA_OPTIONS,
        software=NSCLEAN_VERSION,
        # The job for the script (the same options; not itself a rerun trigger).
        command=step_command(
            "qa_exposure.py", options=QA_OPTIONS, software=NSCLEAN_VERSION
        ),
    shell:
        "{params.command} --log {log:q}"
