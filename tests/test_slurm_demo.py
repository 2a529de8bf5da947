"""The demo program through a real Slurm with ``--profile profiles/slurm``.

`python -m nsclean.testing.demo` (the offline demo: a simulated program served by the loopback
MAST and fetched through astroquery) runs twice on the same two exposures: once on
this machine, once submitting its jobs to the single-node test Slurm
(tests/system/slurm.sh, fixture ``slurm_cluster``) through
snakemake-executor-plugin-slurm.  The Slurm run must leave sbatch job records for its
rules, and its products must equal the local run's bit for bit.

Each exposure's downloads, mask and clean (with QA) form one Slurm job: the rules'
``group: "exposure"`` with the profile's ``group-components``, as a user runs it (snakemake
takes 15-20 s to start inside every job on the 2-core test machine); the manifest query is
a Slurm job of its own, and the report rules are local rules.  Every process is bounded by
``timeout -s KILL``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_fixture import slurm_cluster  # noqa: F401  (fixture, see tests/slurm_fixture.py)
from workflow_helpers import assert_same_fits, read_report

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
EXPOSURES = 2
PROGRAM = "09999"
LOCAL_TIMEOUT = 600
SLURM_TIMEOUT = 600
GROUPED_RULES = ("fetch_file", "mask", "clean")


def demo_command(workdir, cores, *snakemake_args):
    return [sys.executable, "-m", "nsclean.testing.demo", "--workdir", str(workdir), "--exposures",
            str(EXPOSURES), "--cores", str(cores), "--timeout", str(SLURM_TIMEOUT - 30),
            "--snakefile", str(REPO / "Snakefile"),
            "--", *snakemake_args]


def test_demo_through_slurm_equals_a_local_run(slurm_cluster, tmp_path):  # noqa: F811
    from nsclean.testing.demo import simulate_program

    local, remote = tmp_path / "local", tmp_path / "slurm"
    # One simulated program for both runs (the demo reuses what is in its archive/).
    simulate_program(tmp_path / "archive", EXPOSURES)
    for workdir in (local, remote):
        shutil.copytree(tmp_path / "archive", workdir / "archive")

    # The local run goes on while the Slurm run waits for its jobs.
    started = time.monotonic()
    with open(tmp_path / "local.log", "w", encoding="utf-8") as log:
        local_run = subprocess.Popen(["timeout", "-s", "KILL", str(LOCAL_TIMEOUT),
                                      *demo_command(local, 2)], cwd=tmp_path, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # --cores 1: each exposure's group job asks Slurm for one CPU, so that the
            # two run side by side on the 2-CPU test node.
            proc = slurm_cluster.run(
                demo_command(remote, 1, *slurm_cluster.snakemake_cmd[3:], "--profile",
                             PROFILE, "--retries", "0", "--latency-wait", "10",
                             "--slurm-keep-successful-logs"),
                cwd=tmp_path, timeout=SLURM_TIMEOUT)
            slurm_seconds = time.monotonic() - started
            local_status = local_run.wait(timeout=LOCAL_TIMEOUT + 30)
        finally:
            if local_run.poll() is None:  # the whole process group: demo, snakemake, jobs
                os.killpg(local_run.pid, signal.SIGKILL)
                local_run.wait(timeout=30)
    print(f"demo of {EXPOSURES} exposures: through Slurm {slurm_seconds:.0f} s, both runs "
          f"{time.monotonic() - started:.0f} s")
    assert local_status == 0, (tmp_path / "local.log").read_text()[-5000:]
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert "workflow finished" in proc.stdout and "exit status 0" in proc.stdout

    # The jobs went through Slurm: sbatch records, with the rules they ran.
    job_ids = sorted(set(re.findall(r"SLURM jobid (\d+)", proc.stdout)), key=int)
    assert len(job_ids) == 1 + EXPOSURES, proc.stdout[-5000:]
    infos = {job: slurm_cluster.job_info(job) for job in job_ids}
    for info in infos.values():
        assert info.get("JobState") == "COMPLETED", info
        assert info.get("Partition") == slurm_cluster.partition, info
        assert info.get("WorkDir") == str(remote), info
    # The job comment names the rule, or the group and the rules it ran.
    comments = sorted(info.get("Comment", "") for info in infos.values())
    manifest_jobs = [c for c in comments if c.startswith("rule_fetch_manifest")]
    group_jobs = [c for c in comments if c.startswith("rule_exposure")]
    assert len(manifest_jobs) == 1 and len(group_jobs) == EXPOSURES, comments
    for comment in group_jobs:
        assert all(rule in comment for rule in GROUPED_RULES), comment
    completed = {r.get("JobId") for r in slurm_cluster.jobcomp_records()}
    assert set(job_ids) <= completed

    # Inside each exposure's job, its downloads, mask and clean ran (Slurm logs).
    stems = sorted(row["stem"] for row in read_report(remote / "results"))
    logs = {job: next((remote / ".snakemake" / "slurm_logs").rglob(f"{job}.log"))
            for job in job_ids}
    ran = {}
    for log in logs.values():
        text = log.read_text(errors="replace")
        for stem in stems:
            if f"{stem}_qa.json" in text:
                ran[stem] = {rule for rule in GROUPED_RULES
                             if re.search(rf"^\s*(local)?rule {rule}:", text, re.MULTILINE)}
    assert ran == {stem: set(GROUPED_RULES) for stem in stems}, ran

    # Same products as the local run, bit for bit.
    local_results, results = local / "results", remote / "results"
    assert read_report(results) == read_report(local_results)
    assert {row["status"] for row in read_report(results)} == {"cleaned"}
    assert len(stems) == EXPOSURES
    for stem in stems:
        folder = Path(PROGRAM) / stem
        assert_same_fits(results / folder / f"{stem}_nsclean_rate.fits",
                         local_results / folder / f"{stem}_nsclean_rate.fits")
        assert (results / folder / f"{stem}_mask.fits").read_bytes() == \
            (local_results / folder / f"{stem}_mask.fits").read_bytes()
        # The records name the files by the path the config gives (the demo's results
        # directory is absolute): the same once the working directory is swapped.
        for name in (f"{stem}_mask.json", f"{stem}_clean.json", f"{stem}_qa.json"):
            text = (results / folder / name).read_text().replace(str(remote), str(local))
            assert text == (local_results / folder / name).read_text(), name
    assert json.loads((results / "run_status.json").read_text()) == \
        json.loads((local_results / "run_status.json").read_text())
