# Background mask per exposure: True where a pixel is dark sky usable for the fit.


rule mask:
    input:
        rate=results_path("{program}", "archive", "{stem}_rate.fits"),
        cal=results_path("{program}", "archive", "{stem}_cal.fits"),
        rate_status=results_path("{program}", "downloads", "{stem}_rate.fits.json"),
        cal_status=results_path("{program}", "downloads", "{stem}_cal.fits.json"),
    output:
        mask=results_path("{program}", "{stem}", "{stem}_mask.fits"),
        status=results_path("{program}", "{stem}", "{stem}_mask.json"),
    log:
        log_path("mask", "{program}", "{stem}"),
    benchmark:
        benchmark_path("mask", "{program}", "{stem}")
    group:
        "exposure"
    conda:
        "../../envs/nsclean.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        options=MASK_OPTIONS,
        software=NSCLEAN_VERSION,
    script:
        "../../scripts/make_mask.py"
