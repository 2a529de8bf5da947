# Configuration validation, output paths and input functions shared by all rules.
import os

from snakemake.utils import validate


def config_error(error):
    """One message naming the offending config key and what is allowed there."""
    # snakemake.utils.validate raises while handling jsonschema's ValidationError.
    cause = error.__context__
    if not hasattr(cause, "absolute_path"):
        return str(error)
    path = ".".join(str(part) for part in cause.absolute_path) or "(top level)"
    allowed = ""
    if cause.validator == "enum":
        allowed = f"; allowed: {', '.join(map(str, cause.validator_value))}"
    elif cause.validator == "additionalProperties":
        allowed = f"; allowed keys: {', '.join(cause.schema.get('properties', {}))}"
    elif "description" in cause.schema:
        allowed = f" ({' '.join(cause.schema['description'].split())})"
    return f"invalid configuration at {path}: {cause.message}{allowed}"


try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as error:
    raise WorkflowError(config_error(error)) from None


def package_version():
    """The installed nsclean's version, read without importing the package."""
    import importlib.util
    import re

    init = importlib.util.find_spec("nsclean").origin
    with open(init, encoding="utf-8") as handle:
        return re.search(r"__version__\s*=\s*[\"']([^\"']+)", handle.read()).group(1)


# In the params of every per-exposure rule: a new release of the package
# rebuilds the products (Snakemake's code trigger sees only the rule scripts).
NSCLEAN_VERSION = package_version()
RESULTS = os.path.normpath(config["results"])
# Program IDs as the FITS PROGRAM keyword writes them: five digits, zero-padded.
PROGRAMS = [f"{int(program):05d}" for program in config["programs"]]
# Only the options a rule uses go into its params, so that Snakemake's params
# rerun trigger rebuilds exactly the outputs an option change affects.
ARCHIVE = config["archive"]
MANIFEST_SETTINGS = {
    key: ARCHIVE[key]
    for key in (
        "source",
        "local_dir",
        "observations",
        "modes",
        "detectors",
        "gratings",
        "filters",
        "missing_cal",
    )
}
MASK_OPTIONS = config["mask"]
CLEAN_OPTIONS = config["clean"]
QA_OPTIONS = config["qa"]


wildcard_constraints:
    program=r"\d{5}",
    stem=r"[A-Za-z0-9][A-Za-z0-9_\-]*",
    filename=r"[A-Za-z0-9][A-Za-z0-9_\-.]*\.fits",


def results_path(*parts):
    """Path under the results directory (the argument of every output pattern)."""
    return os.path.join(RESULTS, *parts)


def log_path(rule_name, *parts):
    return results_path("logs", rule_name, *parts) + ".log"


def benchmark_path(rule_name, *parts):
    return results_path("benchmarks", rule_name, *parts) + ".tsv"


def processed_stems(program):
    """Stems of the exposures a program's manifest lists for processing.

    Evaluated after the fetch_manifest checkpoint has run.
    """
    from nsclean.archive.archive import read_manifest

    manifest = checkpoints.fetch_manifest.get(program=program).output.manifest
    return [row.stem for row in read_manifest(manifest) if row.status == "ok"]


def program_qa_records(wildcards):
    """QA records of every exposure of a program that is not skipped."""
    return expand(
        results_path("{program}", "{stem}", "{stem}_qa.json"),
        program=wildcards.program,
        stem=processed_stems(wildcards.program),
    )


def step_benchmarks(program):
    """Benchmark files of the mask and clean (with QA) jobs of a program's exposures:
    the reports show their wall times (the QA records themselves carry no time)."""
    return expand(
        benchmark_path("{step}", "{program}", "{stem}"),
        step=("mask", "clean"),
        program=program,
        stem=processed_stems(program),
    )


def program_step_benchmarks(wildcards):
    return step_benchmarks(wildcards.program)


def run_step_benchmarks(wildcards):
    return [path for program in PROGRAMS for path in step_benchmarks(program)]


def run_qa_records(wildcards):
    """QA records of every exposure of every configured program."""
    return [
        path
        for program in PROGRAMS
        for path in expand(
            results_path("{program}", "{stem}", "{stem}_qa.json"),
            program=program,
            stem=processed_stems(program),
        )
    ]


def program_figure_dirs(wildcards):
    return expand(
        results_path("{program}", "{stem}", "figures"),
        program=wildcards.program,
        stem=processed_stems(wildcards.program),
    )


def final_targets():
    return [
        results_path("report.html"),
        results_path("report.csv"),
        results_path("run_status.json"),
    ]
