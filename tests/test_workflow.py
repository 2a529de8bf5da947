"""Tests of the Snakemake workflow: lint, formatting, config validation and real runs.

The end-to-end tests run the real workflow in a subprocess, as a user does: the demo
program (8 exposures: IFU on both detectors, MOS, fixed slit) served by the loopback
MAST and fetched through astroquery, and a local-source program of BOTS subarrays
with a corrupt rate file and a mismatched cal, which must fail alone.  Every
subprocess is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_helpers import read_report, write_bots_exposures

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
# Bounds on the subprocesses (a 2-core machine shared with other jobs).
LINT_TIMEOUT = 180
DRY_RUN_TIMEOUT = 120
RUN_TIMEOUT = 900
DEMO_EXPOSURES = 8


def snakemake(*args, cwd, timeout=DRY_RUN_TIMEOUT, env=None):
    """Run Snakemake on the repository's workflow; returns the CompletedProcess."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def job_counts(output):
    """Job counts from the "Job stats" table Snakemake prints before running."""
    table = output.split("Job stats:", 1)[1]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)\s*$", table,
                                                           re.MULTILINE)
            if name != "total"}


# ------------------------------------------------------------------------------------
# static checks
# ------------------------------------------------------------------------------------
def test_lint_is_clean(tmp_path):
    result = snakemake("--lint", "--configfile", str(ROOT / "config.yaml"), cwd=tmp_path,
                       timeout=LINT_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_snakefmt_is_clean():
    snakefmt = shutil.which("snakefmt", path=str(Path(sys.executable).parent)) \
        or shutil.which("snakefmt")
    if snakefmt is None:
        pytest.skip("snakefmt is not installed")
    files = [str(SNAKEFILE), *map(str, sorted((ROOT / "workflow" / "rules").glob("*.smk")))]
    result = subprocess.run([snakefmt, "--check", *files], capture_output=True, text=True,
                            timeout=LINT_TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"archive": {"source": "ftp"}}, ["archive.source", "'ftp'", "mast, local"]),
        ({"archive": {"source": "local"}}, ["archive.local_dir", "required"]),
        ({"clean": {"methd": "fft"}}, ["clean", "'methd' was unexpected", "method"]),
        ({"clean": {"method": "wavelet"}}, ["clean.method", "fft, median"]),
        ({"mask": {"dilation_radius": -2}}, ["mask.dilation_radius", "-2"]),
        ({"result": "out"}, ["'result' was unexpected", "results"]),
        ({"programs": ["13450000"]}, ["programs.0"]),
    ],
)
def test_invalid_config_stops_at_once_naming_the_key(tmp_path, config, expected):
    config = {"programs": ["1345"], **config}
    path = write_yaml(tmp_path / "config.yaml", config)
    result = snakemake("-n", "--configfile", str(path), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "invalid configuration at" in output
    for text in expected:
        assert text in output, output


def test_minimal_config_gets_the_defaults(tmp_path):
    """A config with only the interface keys is valid: a dry run plans the fetch."""
    path = write_yaml(tmp_path / "config.yaml", {"programs": [1345]})
    # --quiet host: the jobs' descriptions, which the default profile leaves out
    result = snakemake("-n", "--quiet", "host", "--configfile", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fetch_manifest" in result.stdout
    assert "results/01345/manifest.csv" in result.stdout


# ------------------------------------------------------------------------------------
# end to end: the demo program through the loopback MAST
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Simulate the demo program, serve it, run the workflow once; yield the run."""
    from nsclean.testing.demo import simulate_program, write_config
    from nsclean.testing.mastserver import MastServer

    workdir = tmp_path_factory.mktemp("demo")
    simulate_program(workdir / "archive", DEMO_EXPOSURES)
    with MastServer(workdir / "archive") as server:
        config = write_config(workdir / "demo.yaml", url=server.url,
                              results=workdir / "results")
        first = snakemake("--cores", "2", "--configfile", str(config), cwd=workdir,
                          timeout=RUN_TIMEOUT)
        yield {"workdir": workdir, "config": config, "first": first, "server": server,
               "results": workdir / "results"}


@pytest.mark.slow
def test_demo_run_cleans_every_exposure(demo_run):
    first, results = demo_run["first"], demo_run["results"]
    assert first.returncode == 0, first.stderr[-5000:]
    rows = read_report(results)
    assert len(rows) == DEMO_EXPOSURES
    assert list(rows[0])[:5] == ["program", "stem", "status", "reason", "cleaned_file"]
    assert {row["status"] for row in rows} == {"cleaned"}
    assert {row["program"] for row in rows} == {"09999"}
    kinds = {json.loads((results / "09999" / r["stem"] / f"{r['stem']}_qa.json").read_text())
             ["clean"]["exp_type"] for r in rows}
    assert kinds == {"NRS_IFU", "NRS_MSASPEC", "NRS_FIXEDSLIT"}
    for row in rows:
        cleaned = results / row["cleaned_file"]
        assert cleaned.is_file() and cleaned.stat().st_size > 0
    assert (results / "report.html").stat().st_size > 0
    assert (results / "09999" / "report.csv").is_file()
    assert json.loads((results / "run_status.json").read_text())["counts"] == {
        "cleaned": DEMO_EXPOSURES}
    # every rule left a benchmark and a log
    for rule in ("fetch_manifest", "fetch_file", "mask", "clean", "program_report",
                 "run_report"):
        assert list((results / "benchmarks" / rule).rglob("*.tsv")), rule
        assert list((results / "logs" / rule).rglob("*.log")), rule
    # the files came through the archive protocol, not from the disk
    assert demo_run["server"].count("Mast.Caom.Filtered") >= 1


@pytest.mark.slow
def test_the_console_shows_progress_not_every_job(demo_run):
    """The default profile is quiet: progress lines, no per-job descriptions."""
    output = demo_run["first"].stdout + demo_run["first"].stderr
    assert "steps (100%) done" in output
    assert "wildcards:" not in output and "output:" not in output
    jobs = 1 + 2 * DEMO_EXPOSURES + 2 * DEMO_EXPOSURES + 4  # + program/run report, verify, all
    assert len(output.splitlines()) < 6 * jobs + 40, len(output.splitlines())


@pytest.mark.slow
def test_report_gives_the_time_taken_per_exposure(demo_run):
    """time_s is the wall time of the exposure's mask and clean (with QA) jobs as
    Snakemake's benchmark files recorded them (first column, ``s``)."""
    results = demo_run["results"]
    for row in read_report(results, timing=True):
        expected = 0.0
        for step in ("mask", "clean"):
            lines = (results / "benchmarks" / step / row["program"] / f"{row['stem']}.tsv"
                     ).read_text().splitlines()
            expected += float(lines[1].split("\t")[0])
        assert float(row["time_s"]) == pytest.approx(expected, abs=2e-3), row["stem"]
        assert float(row["time_s"]) > 0
    assert "time (s)" in (results / "report.html").read_text()


@pytest.mark.slow
def test_benchmark_files_measure_the_whole_job(demo_run):
    """Each mask and clean job runs its step in its own process (Snakemake's script:), so
    its benchmark file counts the step's CPU time and memory: at least the imports of
    numpy and astropy, and for clean the exposure's arrays."""
    results = demo_run["results"]
    for rule, jobs in (("mask", DEMO_EXPOSURES), ("clean", DEMO_EXPOSURES)):
        files = sorted((results / "benchmarks" / rule).rglob("*.tsv"))
        assert len(files) == jobs, rule
        for path in files:
            header, values = (line.split("\t") for line in
                              path.read_text().splitlines()[:2])
            row = dict(zip(header, values, strict=True))
            assert float(row["cpu_time"]) > 0.3, (path, row)
            assert float(row["max_rss"]) > 80, (path, row)
        # The per-exposure QA products are the clean job's: no QA job, no QA log.
    assert not (results / "benchmarks" / "qa").exists()
    assert not (results / "logs" / "qa").exists()


@pytest.mark.slow
def test_cleaned_file_records_provenance(demo_run):
    from astropy.io import fits

    results = demo_run["results"]
    row = read_report(results)[0]
    header = fits.getheader(results / row["cleaned_file"])
    assert header["S_NSCLEN"] == "COMPLETE"
    assert header["NSCVER"]
    record = json.loads((results / "09999" / row["stem"] / f"{row['stem']}_qa.json")
                        .read_text())
    assert record["nsclean_version"] == header["NSCVER"]
    assert set(record["inputs"]) == {f"{row['stem']}_rate.fits", f"{row['stem']}_cal.fits",
                                     "mask"}
    assert record["clean"]["fit_options"]["cutoff"] == pytest.approx(1 / 256)
    # The input checksums are in the cleaned file itself, and match the inputs.
    import hashlib

    archive = results / "09999" / "archive"
    for keyword, name in (("NSCSUMR", f"{row['stem']}_rate.fits"),
                          ("NSCSUMC", f"{row['stem']}_cal.fits")):
        digest = hashlib.sha256((archive / name).read_bytes()).hexdigest()
        assert header[keyword] == digest, keyword
    assert "sha256:" + header["NSCSUMM"] == record["inputs"]["mask"]
    # ... and in the report table.
    assert row["rate_sha256"] == header["NSCSUMR"]
    assert row["cal_sha256"] == header["NSCSUMC"]
    assert row["nsclean_version"] == header["NSCVER"]


@pytest.mark.slow
def test_rerun_does_nothing(demo_run):
    assert demo_run["first"].returncode == 0
    again = snakemake("--cores", "2", "--configfile", str(demo_run["config"]),
                      cwd=demo_run["workdir"], timeout=RUN_TIMEOUT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_changing_a_cleaner_option_reruns_only_what_depends_on_it(demo_run):
    assert demo_run["first"].returncode == 0
    config = yaml.safe_load(demo_run["config"].read_text())
    config["clean"] = {"cutoff": 1 / 200}
    changed = write_yaml(demo_run["workdir"] / "changed.yaml", config)
    plan = snakemake("-n", "--configfile", str(changed), cwd=demo_run["workdir"])
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = job_counts(plan.stdout + plan.stderr)
    assert counts == {"clean": DEMO_EXPOSURES, "program_report": 1, "run_report": 1,
                      "verify_run": 1, "all": 1}


@pytest.mark.slow
@pytest.mark.parametrize(("section", "change", "rebuilt"), [
    ("qa", {"figures": False}, {"clean"}),
    ("mask", {"dilation_radius": 3}, {"mask", "clean"}),
])
def test_a_qa_or_mask_option_reruns_only_what_it_affects(demo_run, section, change,
                                                          rebuilt):
    """The QA is made by the clean job, the mask by its own: a QA option reruns the clean
    jobs, a mask option the masks too; never the downloads."""
    assert demo_run["first"].returncode == 0
    config = yaml.safe_load(demo_run["config"].read_text())
    config[section] = change
    changed = write_yaml(demo_run["workdir"] / f"changed-{section}.yaml", config)
    plan = snakemake("-n", "--configfile", str(changed), cwd=demo_run["workdir"])
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = job_counts(plan.stdout + plan.stderr)
    assert counts == {**{rule: DEMO_EXPOSURES for rule in rebuilt}, "program_report": 1,
                      "run_report": 1, "verify_run": 1, "all": 1}


@pytest.mark.slow
def test_execution_settings_reach_the_steps_without_a_rerun(demo_run):
    """fsync and archive.url change how the steps run, not what they make: no rerun; a
    forced clean job then writes with fsync (its log says so) the same products."""
    assert demo_run["first"].returncode == 0
    config = yaml.safe_load(demo_run["config"].read_text())
    config.update(fsync=True)
    config["archive"]["url"] = "http://127.0.0.1:9"  # a mirror on another port
    changed = write_yaml(demo_run["workdir"] / "execution.yaml", config)
    plan = snakemake("-n", "--configfile", str(changed), cwd=demo_run["workdir"])
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "Nothing to be done" in plan.stdout + plan.stderr
    results = demo_run["results"]
    stem = read_report(results)[0]["stem"]
    cleaned = results / "09999" / stem / f"{stem}_nsclean_rate.fits"
    before = cleaned.read_bytes()
    forced = snakemake(str(cleaned), "--cores", "1", "--force", "--configfile", str(changed),
                       cwd=demo_run["workdir"], timeout=RUN_TIMEOUT)
    assert forced.returncode == 0, forced.stderr[-3000:]
    log = (results / "logs" / "clean" / "09999" / f"{stem}.log").read_text()
    assert "fsync on" in log, log[-2000:]
    assert cleaned.read_bytes() == before


# ------------------------------------------------------------------------------------
# one bad exposure fails alone (local source)
# ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_exposures_fail_alone_and_the_run_says_so(tmp_path):
    """A corrupt rate and a mismatched cal fail alone; an exposure without cal is skipped."""
    local = tmp_path / "local"
    stems, cals = write_bots_exposures(local, "04242", 4, readout="NRS")
    good, corrupt, mismatched, without_cal = stems
    cals[3].unlink()
    # a truncated rate file, and a cal file that belongs to another exposure
    rate = local / f"{corrupt}_rate.fits"
    rate.write_bytes(rate.read_bytes()[: rate.stat().st_size // 3])
    shutil.copyfile(cals[0], cals[2])

    # The same run in two working directories, on 2 cores and on 1.
    runs = {cores: tmp_path / f"run-{cores}-cores" for cores in (2, 1)}
    results = {}
    for cores, workdir in runs.items():
        # Each run its own copy of the inputs: the local source hard-links them into the
        # results, and Snakemake touching one run's link would touch the other's.
        shutil.copytree(local, workdir / "local")
        config = write_yaml(workdir / "config.yaml", {
            "programs": ["4242"], "archive": {"source": "local", "local_dir": "local"},
            "results": "results"})
        results[cores] = snakemake("--cores", str(cores), "--configfile", str(config),
                                   cwd=workdir, timeout=RUN_TIMEOUT)
    result, workdir = results[2], runs[2]
    output = result.stdout + result.stderr
    assert result.returncode != 0, "a run with failed exposures must not exit 0"
    rows = {row["stem"]: row for row in read_report(workdir / "results")}
    assert rows[good]["status"] == "cleaned"
    assert rows[corrupt]["status"] == "failed" and rows[corrupt]["reason"]
    assert rows[mismatched]["status"] == "failed" and rows[mismatched]["reason"]
    assert rows[corrupt]["cleaned_file"] == ""
    assert rows[without_cal]["status"] == "skipped" and rows[without_cal]["reason"]
    assert (workdir / "results" / "report.html").is_file()
    assert "2 of 4 exposures failed" in output

    # Bit-identical products and records whatever --cores.
    for stem, name in ((good, f"{good}_nsclean_rate.fits"), (good, f"{good}_mask.fits"),
                       (good, f"{good}_qa.json"), (corrupt, f"{corrupt}_qa.json"),
                       (mismatched, f"{mismatched}_qa.json")):
        produced = [(run / "results" / "04242" / stem / name).read_bytes()
                    for run in runs.values()]
        assert produced[0] == produced[1], name

    # Nothing is recomputed on a second run; only the verdict is given again.
    again = snakemake("--cores", "2", "--configfile", str(workdir / "config.yaml"),
                      cwd=workdir, timeout=RUN_TIMEOUT)
    assert again.returncode != 0
    assert job_counts(again.stdout + again.stderr) == {"verify_run": 1, "all": 1}


@pytest.mark.parametrize("name, package", [("nsclean.yaml", "-e .."),
                                           ("stage2.yaml", "-e ..[jwst]")])
def test_conda_environment_lists_the_package_dependencies(name, package):
    """envs/nsclean.yaml (every rule) and envs/stage2.yaml (stage2_run: with the [jwst]
    extra) stay in step with pyproject.toml's dependencies."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "envs" / name).read_text())
    (pip,) = [dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict)]
    assert pip == [package]
    conda_names = {re.split(r"[\s<>=]", dep, maxsplit=1)[0]
                   for dep in env["dependencies"] if isinstance(dep, str)}
    # conda-forge names that differ from PyPI's
    aliases = {"matplotlib": "matplotlib-base"}
    for requirement in project["dependencies"]:
        name = re.split(r"[\s<>=\[;]", requirement, maxsplit=1)[0].lower()
        assert aliases.get(name, name) in conda_names, requirement


def test_demo_module_help():
    result = subprocess.run([sys.executable, "-m", "nsclean.testing.demo", "--help"],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0
    assert "--exposures" in result.stdout and "--cores" in result.stdout
