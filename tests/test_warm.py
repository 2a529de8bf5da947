"""Warm workers (nsclean.workflow.warm): the same products as in-process steps, and no surprises.

The steps run for real (mask, clean, QA of simulated exposures) through a real server
process on a Unix socket in a private temporary directory; each test's servers exit
after a short idle time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from workflow_helpers import assert_same_fits

from nsclean.testing import simulate
from nsclean.workflow import warm
from nsclean.workflow.pipeline import read_status

# Steps run in this process take over stdout, stderr and logging (conftest.py).
pytestmark = pytest.mark.usefixtures("restore_streams")

IDLE = 3.0  # seconds: the test servers go away soon after each test


@pytest.fixture(scope="module")
def exposures(tmp_path_factory):
    """A full-frame IFU exposure (QA takes a while) and a small fixed-slit one."""
    directory = tmp_path_factory.mktemp("warm-sim")
    out = {}
    for name, kind, subarray in (("ifu", "ifu", None), ("fs", "fs", "SUB512")):
        sim = simulate.simulate_exposure(kind, "NRS1", readout="NRS", subarray=subarray,
                                         seed=7, observation=2 if kind == "fs" else 1)
        out[name] = simulate.write_exposure(sim, directory)
    return out


@pytest.fixture
def sockets():
    """A private socket directory with a short path (Unix socket paths are limited)."""
    directory = tempfile.mkdtemp(prefix="nscw-", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def step_arguments(rate, cal, out):
    """Arguments of the mask, clean and QA steps of one exposure, outputs under ``out``."""
    stem = Path(rate).name.removesuffix("_rate.fits")
    base = Path(out) / "09999" / stem
    logs = Path(out) / "logs"
    mask = {"input": {"rate": str(rate), "cal": str(cal)},
            "output": {"mask": f"{base}/{stem}_mask.fits", "status": f"{base}/{stem}_mask.json"},
            "params": {"options": {}}, "log": f"{logs}/mask.log",
            "wildcards": {"program": "09999", "stem": stem}}
    clean = {"input": {"rate": str(rate), "mask": f"{base}/{stem}_mask.fits",
                       "mask_status": f"{base}/{stem}_mask.json"},
             "output": {"cleaned": f"{base}/{stem}_nsclean_rate.fits",
                        "status": f"{base}/{stem}_clean.json"},
             "params": {"options": {}}, "log": f"{logs}/clean.log",
             "wildcards": {"program": "09999", "stem": stem}}
    qa = {"input": {"rate": str(rate), "cleaned": f"{base}/{stem}_nsclean_rate.fits",
                    "mask": f"{base}/{stem}_mask.fits",
                    "clean_status": f"{base}/{stem}_clean.json"},
          "output": {"metrics": f"{base}/{stem}_qa.json", "figures": f"{base}/figures"},
          "params": {"options": {"figures": True}}, "log": f"{logs}/qa.log",
          "wildcards": {"program": "09999", "stem": stem}}
    return {"mask": mask, "clean": clean, "qa": qa}


def run_all(arguments, *, warm_workers, sockets, steps=("mask", "clean", "qa")):
    for name in steps:
        warm.run_step(name, arguments[name], warm=warm_workers, socket_dir=sockets, idle=IDLE)


def server_pids(sockets):
    """PIDs of the servers that logged their start in the socket directory."""
    pids = []
    for log in Path(sockets).glob("*.log"):
        for line in log.read_text().splitlines():
            if " server " in line and " on " in line:
                pids.append(int(line.split(" server ")[1].split()[0]))
    return pids


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def children_of(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().split(")")[-1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"no {what} after {timeout} s")


# ------------------------------------------------------------------------------------
# when warm workers are used
# ------------------------------------------------------------------------------------
def test_auto_uses_warm_workers_except_in_slurm_jobs():
    assert warm.use_warm_workers("auto", {}) is True
    assert warm.use_warm_workers("auto", {"SLURM_JOB_ID": "17"}) is False
    assert warm.use_warm_workers(True, {"SLURM_JOB_ID": "17"}) is True
    assert warm.use_warm_workers(False, {}) is False
    with pytest.raises(ValueError, match="warm_workers"):
        warm.use_warm_workers("sometimes", {})


def test_server_key_follows_code_path_and_import_environment(tmp_path):
    base = {"HOME": "/home/a", "OMP_NUM_THREADS": "1"}
    key = warm.server_key(["/a"], base)
    assert warm.server_key(["/a"], base) == key
    # A token or a working directory does not change how the libraries import ...
    assert warm.server_key(["/a"], {**base, "MAST_API_TOKEN": "x", "PWD": "/b"}) == key
    # ... thread counts, matplotlib settings and the module path do.
    assert warm.server_key(["/a"], {**base, "OMP_NUM_THREADS": "2"}) != key
    assert warm.server_key(["/a"], {**base, "MPLBACKEND": "pdf"}) != key
    assert warm.server_key(["/b"], base) != key


# ------------------------------------------------------------------------------------
# same products
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["ifu", "fs"])
def test_worker_products_equal_in_process_products(exposures, case, tmp_path, sockets):
    rate, cal = exposures[case]
    cold, hot = tmp_path / "cold", tmp_path / "warm"
    run_all(step_arguments(rate, cal, cold), warm_workers=False, sockets=sockets)
    assert not os.listdir(sockets), "an in-process run started a server"
    run_all(step_arguments(rate, cal, hot), warm_workers=True, sockets=sockets)

    worker_lines = [line for line in (hot / "logs" / "qa.log").read_text().splitlines()
                    if "ran in warm worker" in line]
    assert len(worker_lines) == 1, (hot / "logs" / "qa.log").read_text()
    assert "ran in warm worker" not in (cold / "logs" / "qa.log").read_text()

    files = sorted(p.relative_to(cold) for p in cold.rglob("*")
                   if p.is_file() and p.parent.name != "logs")
    assert files == sorted(p.relative_to(hot) for p in hot.rglob("*")
                           if p.is_file() and p.parent.name != "logs")
    assert any(p.suffix == ".png" for p in files)
    for relative in files:
        if relative.suffix == ".fits":
            assert_same_fits(hot / relative, cold / relative)
        else:  # records name their files: the same but for the run's directory
            assert ((hot / relative).read_bytes().replace(bytes(hot), bytes(cold))
                    == (cold / relative).read_bytes()), relative
    assert read_status(next(hot.rglob("*_qa.json")))["status"] == "cleaned"


def test_an_input_failure_is_recorded_the_same_way(exposures, tmp_path, sockets):
    rate, cal = exposures["fs"]
    broken = tmp_path / Path(rate).name
    broken.write_bytes(Path(rate).read_bytes()[:20000])  # truncated rate file
    records = []
    for where, use in (("cold", False), ("warm", True)):
        arguments = step_arguments(broken, cal, tmp_path / where)
        warm.run_step("mask", arguments["mask"], warm=use, socket_dir=sockets, idle=IDLE)
        records.append(read_status(arguments["mask"]["output"]["status"]))
        assert Path(arguments["mask"]["output"]["mask"]).stat().st_size == 0
    assert records[0]["status"] == "failed"
    assert str(broken) in records[0]["reason"] or broken.name in records[0]["reason"]
    assert records[0] == records[1]


def test_a_bug_in_a_step_fails_the_job_with_its_traceback_in_the_log(exposures, tmp_path,
                                                                     sockets):
    rate, cal = exposures["fs"]
    arguments = step_arguments(rate, cal, tmp_path)["clean"]
    # The mask status record the clean step reads does not exist: a bug, not bad data.
    with pytest.raises(SystemExit) as stop:
        warm.run_step("clean", arguments, warm=True, socket_dir=sockets, idle=IDLE)
    assert stop.value.code == 1
    # Where a rule script's uncaught exception goes: the step's stderr, the rule's log.
    log = Path(arguments["log"]).read_text()
    assert "Traceback" in log and "FileNotFoundError" in log and "_mask.json" in log
    assert not Path(arguments["output"]["status"]).exists()


# ------------------------------------------------------------------------------------
# servers: one at a time, idle exit, stale sockets, failures
# ------------------------------------------------------------------------------------
CLIENT = """
import json, sys
from nsclean.workflow import warm
warm.run_step(sys.argv[1], json.loads(sys.argv[2]), warm=True, socket_dir=sys.argv[3],
              idle=float(sys.argv[4]))
"""


def start_client(name, arguments, sockets, idle=IDLE):
    return subprocess.Popen([sys.executable, "-c", CLIENT, name, json.dumps(arguments),
                             sockets, str(idle)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_concurrent_clients_share_one_server_that_exits_when_idle(exposures, tmp_path,
                                                                  sockets):
    rate, cal = exposures["fs"]
    # A longer idle time than the other tests: a client that starts late on a busy
    # machine must still find the server.
    clients = [start_client("mask", step_arguments(rate, cal, tmp_path / f"run{i}")["mask"],
                            sockets, idle=10.0) for i in range(3)]
    for client in clients:
        output, _ = client.communicate(timeout=300)
        assert client.returncode == 0, output
    (pid,) = server_pids(sockets)  # exactly one server started
    for i in range(3):
        assert read_status(tmp_path / f"run{i}/09999" / Path(rate).name.removesuffix(
            "_rate.fits") / f"{Path(rate).name.removesuffix('_rate.fits')}_mask.json"
        )["status"] == "ok"
    wait_for(lambda: not alive(pid), timeout=10.0 + 30, what="idle server exit")
    assert not list(Path(sockets).glob("*.sock")), "the idle server left its socket"


def test_a_server_started_ahead_is_the_one_the_steps_use(exposures, tmp_path, sockets):
    """start_server (what the manifest job calls) returns once the socket is bound; the
    steps after it connect to that server instead of starting their own."""
    rate, cal = exposures["fs"]
    pid = warm.start_server(socket_dir=sockets, idle=IDLE)
    assert pid is not None and alive(pid)
    assert list(Path(sockets).glob("*.sock")), "start_server returned before the bind"
    assert warm.start_server(socket_dir=sockets, idle=IDLE) is None  # already there
    arguments = step_arguments(rate, cal, tmp_path)["mask"]
    warm.run_step("mask", arguments, warm=True, socket_dir=sockets, idle=IDLE)
    assert f"(server {pid})" in Path(arguments["log"]).read_text()
    assert server_pids(sockets) == [pid]  # no second server
    wait_for(lambda: not alive(pid), timeout=IDLE + 30, what="idle server exit")


def test_start_server_respects_a_recent_failure(sockets):
    failed = Path(sockets) / f"{warm.server_key()}.failed"
    failed.write_text("Traceback: the last start failed\n")
    with pytest.raises(warm.WarmUnavailable, match="failed to start recently"):
        warm.start_server(socket_dir=sockets, idle=IDLE)
    assert not list(Path(sockets).glob("*.sock"))


def test_a_stale_socket_file_is_replaced(exposures, tmp_path, sockets):
    rate, cal = exposures["fs"]
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(sockets, f"{warm.server_key()}.sock"))
    stale.close()  # the file stays, nobody listens: a killed server's leftover
    arguments = step_arguments(rate, cal, tmp_path)["mask"]
    warm.run_step("mask", arguments, warm=True, socket_dir=sockets, idle=IDLE)
    assert "ran in warm worker" in Path(arguments["log"]).read_text()


def test_no_worker_means_the_step_runs_here(exposures, tmp_path, sockets):
    rate, cal = exposures["fs"]
    os.chmod(sockets, 0o755)  # not private: never used
    arguments = step_arguments(rate, cal, tmp_path)["mask"]
    warm.run_step("mask", arguments, warm=True, socket_dir=sockets, idle=IDLE)
    log = Path(arguments["log"]).read_text()
    assert "no warm worker" in log and "not private" in log
    assert read_status(arguments["output"]["status"])["status"] == "ok"
    assert not server_pids(sockets)


def test_a_recent_server_failure_is_not_retried_at_every_job(exposures, tmp_path, sockets):
    rate, cal = exposures["fs"]
    failed = Path(sockets) / f"{warm.server_key()}.failed"
    failed.write_text("Traceback: ImportError (test)\n")
    arguments = step_arguments(rate, cal, tmp_path / "first")["mask"]
    warm.run_step("mask", arguments, warm=True, socket_dir=sockets, idle=IDLE)
    assert "failed to start recently" in Path(arguments["log"]).read_text()
    assert not server_pids(sockets)
    # Once the failure is old, a server is tried again.
    old = time.time() - warm.RETRY_FAILED_SECONDS - 10
    os.utime(failed, (old, old))
    arguments = step_arguments(rate, cal, tmp_path / "later")["mask"]
    warm.run_step("mask", arguments, warm=True, socket_dir=sockets, idle=IDLE)
    assert "ran in warm worker" in Path(arguments["log"]).read_text()


# ------------------------------------------------------------------------------------
# signals: the client is the job as Snakemake sees it
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_worker_stops_with_its_client(exposures, tmp_path, sockets, how):
    """Killing the client (as Snakemake or a user would) stops the step in the worker:
    no product appears afterwards."""
    rate, cal = exposures["ifu"]
    arguments = step_arguments(rate, cal, tmp_path)
    run_all(arguments, warm_workers=True, sockets=sockets, steps=("mask", "clean"))
    client = start_client("qa", arguments["qa"], sockets)
    try:
        # (The client's module path differs from this process's: its own server.)
        (worker,) = wait_for(lambda: [pid for server in server_pids(sockets)
                                      for pid in children_of(server)], what="worker process")
        # The step has begun once it opened its log; then it reads and measures (~2 s).
        wait_for(lambda: Path(arguments["qa"]["log"]).exists(), what="QA log")
        time.sleep(0.2)
        client.send_signal(how)
        client.wait(timeout=60)
        wait_for(lambda: not alive(worker), timeout=30, what="worker exit")
    finally:
        client.kill()
        client.wait()
    assert client.returncode != 0
    if how == signal.SIGTERM:
        assert client.returncode == 128 + signal.SIGTERM, client.stdout.read()
    metrics = Path(arguments["qa"]["output"]["metrics"])
    time.sleep(0.5)
    assert not metrics.exists(), "the step went on after its client was gone"
    assert not list(metrics.parent.rglob(".*.tmp")), "a temporary file was left"


def test_an_unusable_socket_directory_means_the_step_runs_here(exposures, tmp_path):
    rate, cal = exposures["fs"]
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for directory, why in ((str(blocker / "sockets"), "Not a directory"),
                           ("/tmp/" + "d" * 120, "too long")):
        arguments = step_arguments(rate, cal, tmp_path / why.split()[-1])["mask"]
        warm.run_step("mask", arguments, warm=True, socket_dir=directory, idle=IDLE)
        log = Path(arguments["log"]).read_text()
        assert "no warm worker" in log and why in log, log
        assert read_status(arguments["output"]["status"])["status"] == "ok"
    assert not os.path.exists("/tmp/" + "d" * 120)


LIMITED_CLIENT = """
import json, resource, sys
from nsclean.workflow import warm
# A file size limit below the size of a cleaned full frame (~84 MB): as with ulimit -f.
resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, resource.getrlimit(
    resource.RLIMIT_FSIZE)[1]))
warm.run_step("clean", json.loads(sys.argv[1]), warm=True, socket_dir=sys.argv[2],
              idle=float(sys.argv[3]))
"""


def test_the_worker_takes_over_the_clients_limits(exposures, tmp_path, sockets):
    """ulimit of the job applies to its step in the worker, as it would in process."""
    rate, cal = exposures["ifu"]
    arguments = step_arguments(rate, cal, tmp_path)
    # The server is started by a client without the limit (same module path, so the
    # same server as the limited client's below).
    first = start_client("mask", arguments["mask"], sockets)
    assert first.wait(timeout=300) == 0, first.stdout.read()
    client = subprocess.run(
        [sys.executable, "-c", LIMITED_CLIENT, json.dumps(arguments["clean"]), sockets,
         str(IDLE)], capture_output=True, text=True, timeout=300, check=False)
    log = Path(arguments["clean"]["log"]).read_text()
    assert "ran in warm worker" in log, log
    # Writing the 84 MB cleaned file hit the 20 MB limit: the step failed there.
    assert client.returncode == 1, (client.stdout, client.stderr, log)
    assert "File too large" in log, log
    assert not Path(arguments["clean"]["output"]["cleaned"]).exists()
    assert len(server_pids(sockets)) == 1  # the limited client did not start its own


COPY_CLIENT = """
import json, sys
sys.path.insert(0, sys.argv[1])  # as a workflow checkout ahead of an installed nsclean
from nsclean.workflow import warm
assert warm.__file__.startswith(sys.argv[1]), warm.__file__
warm.run_step("mask", json.loads(sys.argv[2]), warm=True, socket_dir=sys.argv[3],
              idle=float(sys.argv[4]))
"""


def test_the_server_imports_the_same_nsclean_as_its_client(exposures, tmp_path, sockets):
    """A client that imports nsclean from another place (a workflow checkout before the
    installed package) gets a server with that same code, not a fallback."""
    rate, cal = exposures["fs"]
    copy = tmp_path / "checkout"
    shutil.copytree(Path(warm.__file__).parents[1], copy / "nsclean",
                    ignore=shutil.ignore_patterns("__pycache__"))
    arguments = step_arguments(rate, cal, tmp_path / "run")["mask"]
    client = subprocess.run(
        [sys.executable, "-c", COPY_CLIENT, str(copy), json.dumps(arguments), sockets,
         str(IDLE)], capture_output=True, text=True, timeout=300, check=False)
    assert client.returncode == 0, client.stdout + client.stderr
    log = Path(arguments["log"]).read_text()
    assert "ran in warm worker" in log, log
    assert not list(Path(sockets).glob("*.failed"))


# ------------------------------------------------------------------------------------
# the rule scripts' command line
# ------------------------------------------------------------------------------------
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("job", ["{not json", json.dumps({"input": {}, "output": {}}),
                                 json.dumps(["input", "output"])])
def test_a_rule_script_rejects_a_malformed_job_with_a_usage_error(job, tmp_path):
    log = tmp_path / "mask.log"
    done = subprocess.run([sys.executable, str(SCRIPTS / "make_mask.py"), job, "--log",
                           str(log)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert "JOB is not a JSON object with input, output, params and wildcards" in done.stderr
    assert "make_mask.py" in done.stderr  # the usage line names the script
    assert not log.exists()


def test_a_rule_script_runs_its_step_from_the_job_json(exposures, tmp_path, sockets):
    """The command rule ``mask`` runs: the mask and its record, the same as in process;
    with warm_workers true, the log says the step ran in a warm worker."""
    rate, cal = exposures["fs"]
    products = {}
    for warm_workers in (False, True):
        out = tmp_path / str(warm_workers)
        job = {"input": {"rate": str(rate), "cal": str(cal)},
               "output": {"mask": str(out / "m.fits"), "status": str(out / "m.json")},
               "params": {"options": {}, "software": "test"}, "wildcards": {},
               "warm_workers": warm_workers}
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / "make_mask.py"), json.dumps(job), "--log",
             str(out / "mask.log")], capture_output=True, text=True, timeout=300,
            check=False, env={**os.environ, "XDG_RUNTIME_DIR": sockets})
        assert done.returncode == 0, done.stderr + (out / "mask.log").read_text()
        log = (out / "mask.log").read_text()
        assert ("ran in warm worker" in log) is warm_workers, log
        products[warm_workers] = out
    cold, hot = products[False], products[True]
    assert_same_fits(hot / "m.fits", cold / "m.fits")
    # The record names its files: the same but for the run's directory.
    assert (hot / "m.json").read_bytes().replace(bytes(hot), bytes(cold)) == \
        (cold / "m.json").read_bytes()
    assert read_status(hot / "m.json")["status"] == "ok"
