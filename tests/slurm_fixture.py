"""Pytest fixture: a real single-node Slurm cluster for integration tests.

`slurm_cluster` (module scope) starts munged + slurmctld + slurmd with
tests/system/slurm.sh, yields a `SlurmCluster`, and stops the daemons after the
last test of the module. It skips (with the reason) when Slurm is not
installed, when not running as root, or when the cluster does not come up;
set NSCLEAN_REQUIRE_SLURM=1 to make those a test failure instead.

Register it for every test module in tests/conftest.py:

    from slurm_fixture import slurm_cluster  # noqa: F401

(tests/ is on sys.path under pytest's default import mode, as tests/ has no
__init__.py), or import it the same way in a single test module.

Use in a test:

    @pytest.mark.slurm
    def test_x(slurm_cluster, tmp_path):
        cmd = [*slurm_cluster.snakemake_cmd, "--jobs", "4", "--directory", str(tmp_path)]
        proc = slurm_cluster.run(cmd, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stdout
        info = slurm_cluster.job_info(42)   # scontrol show job 42, as a dict
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "system" / "slurm.sh"
# Default state directory, shared with manual use of tests/system/slurm.sh.
DEFAULT_DIR = os.environ.get("NSCLEAN_SLURM_DIR", "/tmp/nsclean-slurm")
START_TIMEOUT = 240  # slurm.sh waits at most 60 s per daemon itself
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _skip_or_fail(reason: str):
    if os.environ.get("NSCLEAN_REQUIRE_SLURM") == "1":
        pytest.fail(f"NSCLEAN_REQUIRE_SLURM=1 but: {reason}", pytrace=False)
    print(f"slurm_cluster: skipping: {reason}", file=sys.stderr)
    pytest.skip(reason)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for client commands and snakemake: the running Python's
    bin directory first in PATH (jobs re-run snakemake from PATH/this Python),
    no SLURM_* variables from an enclosing job, SLURM_CONF set by the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", ""), "/usr/sbin", "/usr/bin"])
    env.update(extra or {})
    return env


@dataclass
class SlurmCluster:
    directory: Path
    conf: Path
    partition: str = "debug"

    @property
    def env(self) -> dict[str, str]:
        return clean_env({"SLURM_CONF": str(self.conf)})

    @property
    def log_dir(self) -> Path:
        return self.directory / "log"

    @property
    def snakemake_cmd(self) -> list[str]:
        """snakemake with this Python and the options this cluster needs: no
        accounting database, so job status comes from squeue, not sacct
        (sacct makes the slurm executor plugin wait forever). The first status
        check after 1 s instead of 40 s keeps tests short."""
        return [
            sys.executable,
            "-m",
            "snakemake",
            "--executor",
            "slurm",
            "--slurm-status-command",
            "squeue",
            "--slurm-init-seconds-before-status-checks",
            "1",
        ]

    def run(self, cmd, *, cwd=None, timeout=300) -> subprocess.CompletedProcess:
        """Run cmd under `timeout -s KILL` (a hung plugin cannot hang the
        test) with stdout+stderr merged into proc.stdout."""
        full = ["timeout", "-s", "KILL", str(int(timeout)), *map(str, cmd)]
        return subprocess.run(
            full,
            cwd=cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout + 30,
        )

    def scontrol(self, *args: str) -> str:
        proc = subprocess.run(
            ["scontrol", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def job_info(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobName, JobState, Comment, ...).
        Finished jobs stay visible for MinJobAge (600 s) on this cluster."""
        out = self.scontrol("show", "job", "-o", str(job_id)).strip()
        info: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def jobcomp_records(self) -> list[dict[str, str]]:
        """Completed jobs since the cluster started (jobcomp/filetxt)."""
        path = self.log_dir / "jobcomp.log"
        records = []
        if path.exists():
            for line in path.read_text().splitlines():
                rec = {}
                for token in line.split():
                    key, sep, value = token.partition("=")
                    if sep:
                        rec[key] = value
                if rec:
                    records.append(rec)
        return records


def _slurm_sh(action: str, directory: str, timeout: float) -> subprocess.CompletedProcess:
    env = clean_env({"NSCLEAN_SLURM_LEASE": str(os.getpid())})
    return subprocess.run(
        ["bash", str(SCRIPT), action, directory],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def slurm_cluster():
    missing = [name for name in NEEDED if _which(name) is None]
    if missing:
        _skip_or_fail(
            f"Slurm/munge not installed (missing {', '.join(missing)}); "
            "run: bash tests/system/install-system-packages.sh"
        )
    if os.geteuid() != 0:
        _skip_or_fail("the test Slurm cluster must be started as root (slurmd runs the jobs)")

    directory = DEFAULT_DIR
    try:
        proc = _slurm_sh("start", directory, START_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        _skip_or_fail(f"tests/system/slurm.sh start did not finish in {START_TIMEOUT} s: {exc}")
    print(proc.stdout, file=sys.stderr)
    if proc.returncode != 0:
        _skip_or_fail(
            f"tests/system/slurm.sh start failed (exit {proc.returncode}):\n{proc.stdout}"
        )

    cluster = SlurmCluster(directory=Path(directory), conf=Path(directory) / "slurm.conf")
    try:
        yield cluster
    finally:
        # stops the daemons unless another live process holds a lease on them
        stop = _slurm_sh("stop", directory, 120)
        print(stop.stdout, file=sys.stderr)
