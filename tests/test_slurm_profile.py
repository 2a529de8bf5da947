"""profiles/slurm/config.yaml: valid for snakemake, avoids the sacct hang, and its
per-rule template names rules that exist. No Slurm needed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
WORKFLOW_PROFILE = REPO / "profiles" / "default" / "config.yaml"


def _profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


def _set_resources_template() -> dict:
    """The commented `# set-resources:` block, uncommented as a user would."""
    lines = PROFILE.read_text().splitlines()
    start = lines.index("# set-resources:")
    block = [lines[start][2:]]
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        block.append(line[2:])
    return yaml.safe_load("\n".join(block))["set-resources"]


def _workflow_rules() -> tuple[set[str], set[str]]:
    """(all rules, local rules) of the workflow, read from its sources."""
    sources = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    rules: set[str] = set()
    local: set[str] = set()
    for path in sources:
        if not path.exists():
            continue
        text = path.read_text()
        rules |= set(re.findall(r"^(?:rule|checkpoint)\s+(\w+)\s*:", text, re.M))
        # `localrules: a, b` or one name per indented line below it
        for block in re.findall(r"^localrules:(.*\n(?:[ \t]+\S.*\n)*)", text, re.M):
            local |= set(re.findall(r"\w+", block))
    return rules, local


def test_profile_settings():
    profile = _profile()
    assert profile["executor"] == "slurm"
    # sacct without an accounting database makes plugin 2.8.0 wait forever
    assert profile["slurm-status-command"] == "squeue"
    assert profile["latency-wait"] >= 30
    assert profile["keep-going"] is True
    assert {"mem_mb", "runtime"} <= set(profile["default-resources"])
    # cpus_per_task would override every rule's threads:
    assert "cpus_per_task" not in profile["default-resources"]


def test_set_resources_template_names_existing_rules():
    rules, local = _workflow_rules()
    if not rules:
        return  # no workflow in this checkout
    rules -= local  # local rules run where snakemake runs, not as Slurm jobs
    template = _set_resources_template()
    unknown = sorted(set(template) - rules)
    # snakemake silently ignores set-resources for rules that do not exist
    assert not unknown, (
        f"profiles/slurm set-resources names unknown or local rules {unknown}; Slurm rules: {rules}"
    )
    missing = sorted(rules - set(template))
    assert not missing, f"rules without an entry in the profiles/slurm template: {missing}"


def test_workflow_profile_does_not_replace_cluster_default_resources():
    """A `default-resources:` in the workflow profile (applied automatically)
    replaces the one of --profile profiles/slurm as a whole, so a user's
    slurm_account / slurm_partition would silently be dropped."""
    if not WORKFLOW_PROFILE.exists():
        return
    workflow_profile = yaml.safe_load(WORKFLOW_PROFILE.read_text()) or {}
    assert "default-resources" not in workflow_profile, (
        "profiles/default/config.yaml sets default-resources, which overrides "
        "profiles/slurm's default-resources (slurm_account, slurm_partition) entirely"
    )


def test_snakemake_accepts_the_profile(tmp_path):
    """Every key is a real snakemake option (a dry run parses them all)."""
    (tmp_path / "Snakefile").write_text(
        'rule a:\n    output: "a.txt"\n    shell: "touch {output}"\n'
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--profile",
            str(PROFILE.parent),
            "--workflow-profile",
            "none",
            "--executor",
            "dryrun",
            "--directory",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mem_mb=2000" in proc.stdout + proc.stderr
