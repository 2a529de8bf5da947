# Configuration validation, output paths and input functions shared by all rules.
import functools
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

from nsclean.workflow import rundir

# One line naming the key, instead of a traceback from deep in Snakemake.
if rundir.check_results_dir(config["results"]):
    raise WorkflowError(rundir.check_results_dir(config["results"]))


# Runs started in different directories with the same results are not locked against
# each other by Snakemake: this lock is (nsclean.workflow.rundir).
onstart:
    try:
        rundir.acquire_results_lock(config["results"])
    except rundir.ResultsLocked as error:
        raise WorkflowError(str(error)) from None


onsuccess:
    rundir.release_results_lock(config["results"])


onerror:
    rundir.release_results_lock(config["results"])


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


# The noise model is an output of rule clean only when asked for.
NOISE_MODEL_OUTPUT = (
    {"model": results_path("{program}", "{stem}", "{stem}_flicker_noise.fits")}
    if config["save_noise_model"]
    else {}
)


@functools.lru_cache(maxsize=None)
def _processed_by_stem(manifest, inode, mtime_ns, size):
    """The rows to process of a manifest, by stem (read once per version of the file:
    the checkpoint writes a new file, with a new inode, each time it runs)."""
    from nsclean.archive.archive import read_manifest

    return {row.stem: row for row in read_manifest(manifest) if row.status == "ok"}


def processed_by_stem(program):
    """Manifest rows of the exposures a program lists for processing, by stem.

    Evaluated after the fetch_manifest checkpoint has run.  The input functions of
    every job ask for it: the manifest is read once, not once per job (a dry run of
    1000 exposures spent about three quarters of its 32 s reading it 3000 times).
    """
    manifest = checkpoints.fetch_manifest.get(program=program).output.manifest
    status = os.stat(manifest)
    return _processed_by_stem(
        manifest, status.st_ino, status.st_mtime_ns, status.st_size
    )


def processed_rows(program):
    """Manifest rows of the exposures a program lists for processing."""
    return list(processed_by_stem(program).values())


def processed_stems(program):
    """Stems of the exposures a program's manifest lists for processing."""
    return list(processed_by_stem(program))


def manifest_row(program, stem):
    row = processed_by_stem(program).get(stem)
    if row is None:
        raise WorkflowError(
            f"exposure {stem} is not to be processed in program {program}"
        )
    return row


def exposure_inputs(wildcards):
    """The archive files of one exposure and their download records, from the manifest:
    ``rate`` and ``cal`` are lists (one file each, or every segment of a time series;
    ``cal`` is empty for an exposure without cal file)."""
    row = manifest_row(wildcards.program, wildcards.stem)
    inputs = {}
    for kind, names in (("rate", row.rate_files), ("cal", row.cal_files)):
        inputs[kind] = [
            results_path(wildcards.program, "archive", name) for name in names
        ]
        inputs[f"{kind}_status"] = [
            results_path(wildcards.program, "downloads", f"{name}.json")
            for name in names
        ]
    return inputs


USER_MASKS = config["user_masks"]


def user_mask_for(row):
    """The configured user mask of an exposure without cal file, or None: by stem, else
    by mode and detector (user_masks in the config)."""
    from nsclean.archive.archive import MODES

    if row.stem in USER_MASKS.get("exposures", {}):
        return USER_MASKS["exposures"][row.stem]
    mode = next((m for m, e in MODES.items() if e == row.exp_type), None)
    return USER_MASKS.get("modes", {}).get(mode, {}).get(row.detector.upper())


def mask_inputs(wildcards):
    """exposure_inputs, plus ``user_mask`` for an exposure without cal file."""
    inputs = exposure_inputs(wildcards)
    row = manifest_row(wildcards.program, wildcards.stem)
    if not row.cal_files and user_mask_for(row):
        inputs["user_mask"] = user_mask_for(row)
    return inputs


def rate_inputs(wildcards):
    """The rate file(s) of one exposure, from the manifest."""
    return exposure_inputs(wildcards)["rate"]


def clean_step(row):
    """Name of the cleaning step of an exposure (a time series is cleaned per integration)."""
    return "clean_timeseries" if row.time_series else "clean"


def qa_record(program, row):
    """The QA record of an exposure (rule clean, or clean_timeseries for a time series)."""
    if row.time_series:
        return results_path(program, row.stem, "timeseries_qa", f"{row.stem}_qa.json")
    return results_path(program, row.stem, f"{row.stem}_qa.json")


def figure_dir(program, row):
    """The folder of an exposure's QA figures."""
    if row.time_series:
        return results_path(program, row.stem, "timeseries_qa", "figures")
    return results_path(program, row.stem, "figures")


def program_qa_records(wildcards):
    """QA records of every exposure of a program that is not skipped."""
    return [
        qa_record(wildcards.program, row) for row in processed_rows(wildcards.program)
    ]


def step_benchmarks(program):
    """Benchmark files of the mask and clean (with QA) jobs of a program's exposures:
    the reports show their wall times (the QA records themselves carry no time)."""
    return [
        benchmark_path(step, program, row.stem)
        for row in processed_rows(program)
        for step in ("mask", clean_step(row))
    ]


def program_step_benchmarks(wildcards):
    return step_benchmarks(wildcards.program)


def run_step_benchmarks(wildcards):
    return [path for program in PROGRAMS for path in step_benchmarks(program)]


def run_qa_records(wildcards):
    """QA records of every exposure of every configured program."""
    return [
        qa_record(program, row)
        for program in PROGRAMS
        for row in processed_rows(program)
    ]


def program_figure_dirs(wildcards):
    return [
        figure_dir(wildcards.program, row) for row in processed_rows(wildcards.program)
    ]


def final_targets():
    targets = [
        results_path("report.html"),
        results_path("report.csv"),
        results_path("run_status.json"),
    ]
    stage2 = config["stage2"]
    if stage2["associations"] or stage2["run"]:
        step = "products" if stage2["run"] else "associations"
        targets += [results_path(p, "stage2", f"{step}.json") for p in PROGRAMS]
    return targets
