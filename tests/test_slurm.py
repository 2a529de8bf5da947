"""Snakemake's Slurm executor against a real single-node Slurm (tests/system/slurm.sh).

Skips when Slurm/munge are not installed or the cluster cannot start
(NSCLEAN_REQUIRE_SLURM=1 turns that into a failure).
"""

from __future__ import annotations

import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
from slurm_fixture import slurm_cluster  # noqa: F401  (fixture, see tests/slurm_fixture.py)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
WORKFLOW_TIMEOUT = 300

# Three rules, three kinds of job: shell:, script: and run:. Each writes the
# Slurm job id it ran under, so the test can check the job with scontrol.
SNAKEFILE = """\
localrules: all

rule all:
    input: "out/c.txt"

rule make_a:
    output: "out/a.txt"
    shell: 'echo "job=${{SLURM_JOB_ID:-none}} host=$(hostname)" > {output}'

rule make_b:
    input: "out/a.txt"
    output: "out/b.txt"
    script: "b.py"

rule make_c:
    input: "out/b.txt"
    output: "out/c.txt"
    run:
        import os
        with open(output[0], "w") as f:
            f.write(f"job={os.environ.get('SLURM_JOB_ID', 'none')}\\n")
"""

SCRIPT_B = """\
import os
import sys

with open(snakemake.output[0], "w") as f:
    f.write(f"job={os.environ.get('SLURM_JOB_ID', 'none')}\\n")
    f.write(f"python={sys.executable}\\n")
"""

FAILING_SNAKEFILE = """\
rule broken:
    output: "never.txt"
    shell: "echo about to fail; exit 3"
"""


def _job_id(path: Path) -> str:
    match = re.search(r"job=(\S+)", path.read_text())
    assert match, f"{path} has no job= line: {path.read_text()!r}"
    return match.group(1)


def test_tiny_workflow_runs_through_slurm(slurm_cluster, tmp_path):  # noqa: F811
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    (tmp_path / "b.py").write_text(SCRIPT_B)
    cmd = [
        *slurm_cluster.snakemake_cmd,
        "--profile",
        PROFILE,
        "--directory",
        tmp_path,
        "--jobs",
        "3",
        "--default-resources",
        "runtime=5",
        "mem_mb=200",
        "--retries",
        "0",
        "--latency-wait",
        "10",
        "--slurm-keep-successful-logs",
    ]
    start = time.monotonic()
    proc = slurm_cluster.run(cmd, cwd=tmp_path, timeout=WORKFLOW_TIMEOUT)
    elapsed = time.monotonic() - start
    print(f"tiny workflow through Slurm: {elapsed:.1f} s")
    assert proc.returncode == 0, (
        f"snakemake exit {proc.returncode} after {elapsed:.0f} s:\n{proc.stdout}"
    )

    rules = ("make_a", "make_b", "make_c")
    outputs = {rule: tmp_path / "out" / f"{rule[-1]}.txt" for rule in rules}
    for path in outputs.values():
        assert path.exists(), f"missing {path}\n{proc.stdout}"

    job_ids = {rule: _job_id(path) for rule, path in outputs.items()}
    # every rule ran in its own Slurm job
    assert all(j.isdigit() for j in job_ids.values()), job_ids
    assert len(set(job_ids.values())) == 3, job_ids

    # ... which slurmctld knows: completed, submitted by snakemake for that rule
    run_names = set()
    for rule, job_id in job_ids.items():
        info = slurm_cluster.job_info(job_id)
        assert info.get("JobState") == "COMPLETED", info
        assert info.get("Comment") == f"rule_{rule}", info
        assert info.get("Partition") == slurm_cluster.partition, info
        run_names.add(info.get("JobName"))
        log = tmp_path / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{job_id}.log"
        assert log.exists(), f"no Slurm log {log}"
    assert len(run_names) == 1, f"jobs of one run should share the run id as name: {run_names}"
    assert run_names.pop() in proc.stdout  # "SLURM run ID: ..." in the snakemake log

    completed = {r.get("JobId") for r in slurm_cluster.jobcomp_records()}
    assert set(job_ids.values()) <= completed

    # the job ran this very Python environment
    python_line = outputs["make_b"].read_text().splitlines()[1]
    assert Path(python_line.removeprefix("python=")).parent == Path(sys.executable).parent


def test_failing_job_is_reported_not_waited_for(slurm_cluster, tmp_path):  # noqa: F811
    """A job that exits non-zero must make snakemake fail, promptly (no hang)."""
    (tmp_path / "Snakefile").write_text(textwrap.dedent(FAILING_SNAKEFILE))
    cmd = [
        *slurm_cluster.snakemake_cmd,
        "--directory",
        tmp_path,
        "--jobs",
        "1",
        "--default-resources",
        "runtime=5",
        "mem_mb=200",
        "--retries",
        "0",
    ]
    start = time.monotonic()
    proc = slurm_cluster.run(cmd, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode not in (0, -9, 137), f"exit {proc.returncode}:\n{proc.stdout}"
    assert "Error in rule broken" in proc.stdout, proc.stdout
    assert "FAILED" in proc.stdout, proc.stdout
    assert not (tmp_path / "never.txt").exists()
    print(f"failing job reported after {elapsed:.1f} s")
