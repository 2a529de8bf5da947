# Background mask per exposure: True where a pixel is dark sky usable for the fit.


rule mask:
    input:
        # From the manifest: a rate and its cal, or every segment of a time series; an
        # exposure without cal file gets its user mask from the config (user_masks).
        unpack(mask_inputs),
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
