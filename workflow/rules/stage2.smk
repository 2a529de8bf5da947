# Optional: stage 2 again on the cleaned rates (stage2 section of the config).
# The associations' members all point at cleaned files; calwebb_spec2 then runs
# with clean_flicker_noise skipped (stage2.run, needs jwst and a CRDS cache).


rule stage2_associations:
    input:
        manifest=results_path("{program}", "manifest.csv"),
        qa=program_qa_records,
    output:
        associations=directory(results_path("{program}", "stage2", "associations")),
        status=results_path("{program}", "stage2", "associations.json"),
    log:
        log_path("stage2_associations", "{program}"),
    conda:
        "../../envs/nsclean.yaml"
    resources:
        mem_mb=500,
        runtime=30,
        mast_connections=1,
    params:
        archive=ARCHIVE,
    script:
        "../../scripts/stage2_associations.py"


rule stage2_run:
    input:
        associations=results_path("{program}", "stage2", "associations"),
        status=results_path("{program}", "stage2", "associations.json"),
    output:
        products=directory(results_path("{program}", "stage2", "products")),
        status=results_path("{program}", "stage2", "products.json"),
    log:
        log_path("stage2_run", "{program}"),
    conda:
        "../../envs/stage2.yaml"
    resources:
        mem_mb=8000,
        runtime=600,
    params:
        crds={key: config["stage2"][key] for key in ("crds_path", "crds_server_url")},
        steps=config["stage2"]["steps"],
    script:
        "../../scripts/stage2_run.py"
