#!/usr/bin/env bash
# Install the Debian packages that the optional integration tests need:
#   - slurm-wlm (slurmctld, slurmd, client tools) and munge: tests/test_slurm.py
#     starts a private single-node Slurm with tests/system/slurm.sh
#   - chromium: headless browser for the HTML report test
#
# Idempotent and quick when everything is already installed (no apt-get at
# all in that case). Never fails the caller: a package that cannot be
# installed is reported as a warning and the script exits 0, so the tests that
# need it skip with a reason instead of the whole CI failing.
#
# Usage: bash tests/system/install-system-packages.sh
# Env:   NSCLEAN_SKIP_SYSTEM_PACKAGES=1 to do nothing.
set -euo pipefail

if [ "${NSCLEAN_SKIP_SYSTEM_PACKAGES:-0}" = 1 ]; then
    echo "install-system-packages: NSCLEAN_SKIP_SYSTEM_PACKAGES=1, nothing done"
    exit 0
fi

# package name -> a command it provides (used to detect "already installed")
PACKAGES=(slurmctld slurmd slurm-client munge chromium)
declare -A PROVIDES=(
    [slurmctld]=slurmctld
    [slurmd]=slurmd
    [slurm-client]=sbatch
    [munge]=munged
    [chromium]=chromium
)

have() {
    # munged/slurmd/slurmctld live in /usr/sbin, which is not always in PATH
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]
}

absent() {
    # the packages among the arguments whose program is not installed
    local pkg
    for pkg in "$@"; do
        have "${PROVIDES[$pkg]}" || echo "$pkg"
    done
}

mapfile -t missing < <(absent "${PACKAGES[@]}")

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-system-packages: all present (${PACKAGES[*]})"
    exit 0
fi

warn() { echo "install-system-packages: WARNING: $*" >&2; }

if ! command -v apt-get >/dev/null 2>&1; then
    warn "no apt-get on this machine; missing: ${missing[*]}; the tests that need them will skip"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        warn "not root and no password-less sudo; missing: ${missing[*]}; the tests that need them will skip"
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

echo "install-system-packages: installing ${missing[*]}"
# Refresh the index only if it has never been fetched (fresh containers ship
# without lists) or when the first attempt fails.
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
    timeout 300 "${SUDO[@]}" apt-get update -q || warn "apt-get update failed"
fi

install() {
    timeout 900 "${SUDO[@]}" apt-get install "${APT_OPTS[@]}" "$@"
}

if ! install "${missing[@]}"; then
    # Maybe a stale index: refresh once and retry, then fall back to one
    # package at a time so one unavailable package does not block the others.
    timeout 300 "${SUDO[@]}" apt-get update -q || warn "apt-get update failed"
    if ! install "${missing[@]}"; then
        for pkg in "${missing[@]}"; do
            install "$pkg" || warn "could not install $pkg"
        done
    fi
fi

mapfile -t still < <(absent "${missing[@]}")
if [ "${#still[@]}" -gt 0 ]; then
    warn "still missing: ${still[*]}; the tests that need them will skip"
else
    echo "install-system-packages: done"
fi
exit 0
