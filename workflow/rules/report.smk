# Reports per program and for the whole run, and the run's final verdict.


# Small jobs: on a cluster they run where Snakemake runs, not as batch jobs.
localrules:
    all,
    program_report,
    run_report,
    verify_run,


rule program_report:
    input:
        manifest=results_path("{program}", "manifest.csv"),
        qa=program_qa_records,
        figures=program_figure_dirs,
        benchmarks=program_step_benchmarks,
    output:
        html=report(
            results_path("{program}", "report.html"),
            caption="../report/program_report.rst",
            category="Programs",
            labels={"program": "{program}", "file": "report.html"},
        ),
        csv=report(
            results_path("{program}", "report.csv"),
            caption="../report/program_table.rst",
            category="Programs",
            labels={"program": "{program}", "file": "report.csv"},
        ),
    log:
        log_path("program_report", "{program}"),
    benchmark:
        benchmark_path("program_report", "{program}")
    conda:
        "../../envs/nsclean.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../../scripts/program_report.py"


rule run_report:
    input:
        manifests=expand(results_path("{program}", "manifest.csv"), program=PROGRAMS),
        qa=run_qa_records,
        programs=expand(results_path("{program}", "report.csv"), program=PROGRAMS),
        benchmarks=run_step_benchmarks,
    output:
        html=report(
            results_path("report.html"),
            caption="../report/run_report.rst",
            category="Run",
            labels={"file": "report.html"},
        ),
        csv=report(
            results_path("report.csv"),
            caption="../report/run_table.rst",
            category="Run",
            labels={"file": "report.csv"},
        ),
    log:
        log_path("run_report", "all"),
    benchmark:
        benchmark_path("run_report", "all")
    conda:
        "../../envs/nsclean.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../../scripts/run_report.py"


# The last job: writes run_status.json when every exposure was cleaned or
# skipped, and fails (naming the failed exposures) otherwise, so that the exit
# status of snakemake tells whether the run was clean.  The reports above are
# complete in both cases.
rule verify_run:
    input:
        csv=results_path("report.csv"),
    output:
        status=results_path("run_status.json"),
    log:
        log_path("verify_run", "all"),
    benchmark:
        benchmark_path("verify_run", "all")
    conda:
        "../../envs/nsclean.yaml"
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../../scripts/verify_run.py"
