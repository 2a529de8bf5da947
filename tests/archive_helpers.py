"""Helpers for the archive and MAST-server tests: tiny FITS exposures and a child runner.

The astroquery client reads its server URL at import time, so every test that runs the
real client does so in a child Python process (``run_child``) that redirects it with
``nsclean.archive.archive.configure_mast_server`` and installs the loopback-only network guard
before anything else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from astropy.io import fits

TESTS_DIR = Path(__file__).resolve().parent

#: (stem, EXP_TYPE, GRATING, FILTER, SUBARRAY) of the small test programme
EXPOSURES = [
    ("jw01345062001_03101_00001_nrs1", "NRS_IFU", "PRISM", "CLEAR", "FULL"),
    ("jw01345062001_03101_00001_nrs2", "NRS_IFU", "PRISM", "CLEAR", "FULL"),
    ("jw01345062001_03101_00002_nrs1", "NRS_IFU", "PRISM", "CLEAR", "FULL"),
    ("jw01345063001_03101_00001_nrs1", "NRS_MSASPEC", "G395M", "F290LP", "FULL"),
    ("jw01345063001_03101_00001_nrs2", "NRS_MSASPEC", "G395M", "F290LP", "FULL"),
    ("jw02222001001_04102_00001_nrs1", "NRS_BRIGHTOBJ", "G395H", "F290LP", "SUB2048"),
]

#: the first exposure of the test programme and its products
STEM = EXPOSURES[0][0]
RATE = f"{STEM}_rate.fits"
CAL = f"{STEM}_cal.fits"

#: download options that keep the tests quick: short timeouts, short back-off
FAST = {"timeout": (2.0, 2.0), "backoff": 0.01, "max_backoff": 0.05}
#: the same with a read timeout (0.5 s) shorter than a ``slow`` fault of the servers
FAST_SHORT_READ = {**FAST, "timeout": (2.0, 0.5)}


def gets(server, name=RATE) -> list:
    """The GET requests for the product ``name`` that a loopback server received."""
    return [r for r in server.requests if r.method == "GET" and r.target == name]


def make_exposure_file(directory: Path, stem: str, kind: str, exp_type: str, grating: str,
                       filt: str, subarray: str, shape=(16, 16)) -> Path:
    """Write a tiny ``<stem>_<kind>.fits`` with a JWST-like primary header and SCI."""
    program, observation, visit = stem[2:7], stem[7:10], stem[10:13]
    primary = fits.PrimaryHDU()
    header = primary.header
    header["TELESCOP"] = "JWST"
    header["INSTRUME"] = "NIRSPEC"
    header["DETECTOR"] = stem.rsplit("_", 1)[1].upper()
    header["EXP_TYPE"] = exp_type
    header["SUBARRAY"] = subarray
    header["GRATING"] = grating
    header["FILTER"] = filt
    header["PROGRAM"] = program
    header["OBSERVTN"] = observation
    header["VISIT"] = visit
    header["EXPOSURE"] = stem.split("_")[2].lstrip("0") or "0"
    header["TARGPROP"] = "LOOPBACK-TARGET"
    seed = sum(stem.encode()) + len(kind)
    science = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    path = Path(directory) / f"{stem}_{kind}.fits"
    fits.HDUList([primary, fits.ImageHDU(science, name="SCI")]).writeto(path)
    return path


def make_program(directory: Path, exposures=EXPOSURES, without_cal=()) -> list[Path]:
    """Write rate and cal files for ``exposures``; stems in ``without_cal`` get no cal."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, exp_type, grating, filt, subarray in exposures:
        kinds = ("rate",) if stem in without_cal else ("rate", "cal")
        for kind in kinds:
            paths.append(make_exposure_file(directory, stem, kind, exp_type, grating, filt,
                                            subarray))
    return paths


def run_child(code: str, *, env_extra: dict | None = None, timeout: float = 60.0,
              drop_token: bool = True) -> dict:
    """Run ``code`` in a child Python with the loopback network guard installed.

    The code must assign a JSON-serialisable ``result``; the child prints it as the last
    line of stdout and this returns it as ``{"result": ..., "stdout", "stderr", "rc"}``.
    """
    env = dict(os.environ)
    if drop_token:
        env.pop("MAST_API_TOKEN", None)
    env.pop("XDG_CONFIG_HOME", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    program = ("import network_guard\nnetwork_guard.install()\nimport json\nresult = None\n"
               + textwrap.dedent(code)
               + "\nprint('RESULT=' + json.dumps(result))\n")
    completed = subprocess.run([sys.executable, "-c", program], capture_output=True,
                               text=True, env=env, timeout=timeout)
    result = None
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT="):
            result = json.loads(line[len("RESULT="):])
    return {"result": result, "stdout": completed.stdout, "stderr": completed.stderr,
            "rc": completed.returncode}
