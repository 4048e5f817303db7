"""The Ray launch path: ``ray job submit -- python -m nsa_dist.launch.ray --num-workers 2 --gpus-per-worker 0`` on a
Ray head the test starts on loopback (2 CPUs) runs the tiny CP = 2 DeepSpeed job on two Ray Train workers with the
same losses as one process at CP = 1; when a worker is killed mid-run, Ray Train restarts the group from the last
reported checkpoint and the job ends exactly where an uninterrupted run does. Ray keeps the newest
``train.keep_checkpoints`` checkpoints (the default 2 in the killed run, all with ``null`` in the uninterrupted one).

Only the YAML and the DeepSpeed JSON are uploaded (``--working-dir`` of a folder holding just them); nsa-dist comes
from this Python's environment. ``ray stop`` at the end stops every Ray process of this user on the machine."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

from nsa_dist.launch.env import TORCH_VARS
from nsa_dist.launch import free_port

pytestmark = pytest.mark.slow  # starts launchers (mpirun, Ray) and training jobs

HAS_RAY = all(importlib.util.find_spec(m) is not None for m in ("ray", "deepspeed", "psutil"))
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="needs ray[default,train], deepspeed and psutil "
                               "(pip install 'nsa-dist[ray,deepspeed]')")

from tests.helpers.deepspeed_jobs import write_job  # noqa: E402  (the DeepSpeed tests' jobs)

RAY = str(Path(sys.executable).parent / "ray")
STEPS, SAVE_EVERY = 8, 3
JOB_TIMEOUT = 300


def clean_env(token: Optional[Path] = None) -> dict:
    """This environment without any launcher's rank variables, one thread per process; with ``token``, Ray's token
    authentication on, the token read from that file (head, job client and job alike)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith(("OMPI_COMM_", "PMI"))}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    return env


def job_dir(tmp: Path, cp: int, **train) -> Path:
    """A folder with only ``job.yaml`` and ``job.json`` (a float32 ZeRO-2 copy, named relative to the folder);
    the job writes to ``tmp/out`` (metrics.json, DeepSpeed checkpoints), outside the uploaded folder. ``train``:
    further ``train`` settings of the YAML."""
    folder = tmp / "job"
    folder.mkdir()
    config = write_job(folder, "job", "zero2.json", cp=cp, steps=STEPS, save_every=SAVE_EVERY)
    raw = yaml.safe_load(config.read_text())
    raw["train"].update(deepspeed_config="job.json", **train)
    raw["out_dir"] = str(tmp / "out")
    config.write_text(yaml.safe_dump(raw))
    return folder


@dataclass(frozen=True)
class Head:
    address: str  # the job API
    env: dict  # for every Ray command line (token authentication)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on loopback with 2 CPUs: dashboard and job API on 127.0.0.1 only, token authentication on with a
    fresh token (not the user's ~/.ray/auth_token)."""
    if not HAS_RAY:
        pytest.skip("needs ray")
    temp = tmp_path_factory.mktemp("ray")
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = clean_env(token)
    dashboard = free_port()
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port",
           str(free_port()), "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "2", "--num-gpus", "0",
           "--temp-dir", str(temp), "--disable-usage-stats"]
    try:
        start = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        yield Head(f"http://127.0.0.1:{dashboard}", env)
    finally:
        subprocess.run([RAY, "stop"], capture_output=True, timeout=120, env=env)


def submit(head: Head, folder: Path, storage: Path, run_name: str) -> subprocess.Popen:
    """``ray job submit`` (waits for the job, exits non-zero when it fails) of the Ray launch of ``folder``."""
    cmd = [RAY, "job", "submit", "--address", head.address, "--working-dir", str(folder), "--submission-id", run_name,
           "--", sys.executable, "-m", "nsa_dist.launch.ray", "--config", "job.yaml", "--num-workers", "2",
           "--gpus-per-worker", "0", "--storage-path", str(storage), "--run-name", run_name, "--max-failures", "1"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=head.env,
                            start_new_session=True)


def finish(head: Head, proc: subprocess.Popen, run_name: str, out_dir: Path) -> dict:
    """Wait for ``ray job submit``; check that the job SUCCEEDED; the metrics rank 0 wrote."""
    try:
        output, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([RAY, "job", "stop", "--address", head.address, run_name], capture_output=True, timeout=60,
                       env=head.env)
        pytest.fail(f"the Ray job did not finish within {JOB_TIMEOUT} s:\n{proc.communicate()[0][-6000:]}")
    assert proc.returncode == 0, output[-8000:]
    status = subprocess.run([RAY, "job", "status", "--address", head.address, run_name], capture_output=True,
                            text=True, timeout=60, env=head.env)
    assert f"Job '{run_name}' succeeded" in status.stdout, status.stdout + status.stderr  # status SUCCEEDED
    assert "done on Ray: 2 workers (CP 2)" in output, output[-8000:]
    return json.loads((out_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(ray_head, tmp_path_factory):
    """The tiny CP = 2 job on 2 Ray workers, run to the end, keeping every checkpoint: its metrics."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    folder = job_dir(tmp, cp=2, keep_checkpoints=None)
    metrics = finish(ray_head, submit(ray_head, folder, tmp / "storage", "full"), "full", tmp / "out")
    checkpoints = sorted(p.name for p in (tmp / "storage" / "full").glob("step*"))
    assert checkpoints == ["step3", "step6", f"step{STEPS}"], checkpoints  # every DeepSpeed save reached Ray
    return metrics


@needs_ray
def test_ray_job_cp2_equals_one_process(uninterrupted, tmp_path):
    folder = job_dir(tmp_path, cp=1)
    proc = subprocess.run([sys.executable, "-m", "nsa_dist.train", "--config", "job.yaml", "--no-progress"],
                          cwd=folder, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    single = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (single["cp"], single["dp"], uninterrupted["cp"], uninterrupted["dp"]) == (1, 1, 2, 1)
    assert [h["step"] for h in uninterrupted["history"]] == list(range(1, STEPS + 1))
    for a, b in zip(single["history"], uninterrupted["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a, b)
    for key in ("initial_eval", "final_eval"):
        assert abs(single[key]["loss"] - uninterrupted[key]["loss"]) <= 1e-6 * abs(single[key]["loss"]), key
    assert uninterrupted["final_eval"]["loss"] != uninterrupted["initial_eval"]["loss"]  # the run did train


def train_worker_pids() -> list:
    """PIDs of the Ray Train worker processes on this machine (Ray titles them ``ray::RayTrainWorker...``)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
            pids.append(proc.info["pid"])
    return pids


def wait_for_checkpoint(run_dir: Path, name: str, proc: subprocess.Popen, timeout: float = JOB_TIMEOUT) -> None:
    """Until Ray Train's controller has registered checkpoint ``name`` of the run (its snapshot in ``run_dir``
    lists it; the controller takes reports in every ~2 s, and a report it has not taken in when the worker group
    fails is lost)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
            results = []
        if any(r["checkpoint_dir_name"] == name for r in results):
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended before checkpoint {name} was registered:\n{proc.communicate()[0][-6000:]}")
        time.sleep(0.1)
    pytest.fail(f"checkpoint {name} was not registered within {timeout} s")


@needs_ray
def test_killed_worker_resumes_from_last_checkpoint(ray_head, uninterrupted, tmp_path):
    folder = job_dir(tmp_path, cp=2)
    proc = submit(ray_head, folder, tmp_path / "storage", "fault")
    wait_for_checkpoint(tmp_path / "storage" / "fault", f"step{SAVE_EVERY}", proc)
    workers = train_worker_pids()
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    resumed = finish(ray_head, proc, "fault", tmp_path / "out")
    # the restarted group continued from a Ray checkpoint (step 3, or step 6 had the kill landed after its save)
    assert resumed["start_step"] in (SAVE_EVERY, 2 * SAVE_EVERY), resumed["start_step"]
    start = resumed["start_step"]
    assert [h["step"] for h in resumed["history"]] == list(range(start + 1, STEPS + 1))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in uninterrupted["history"][start:]]
    assert resumed["final_eval"] == uninterrupted["final_eval"]
    # train.keep_checkpoints (default 2): Ray deleted the older checkpoints from the storage path
    checkpoints = sorted(p.name for p in (tmp_path / "storage" / "fault").glob("step*"))
    assert checkpoints == [f"step{2 * SAVE_EVERY}", f"step{STEPS}"], checkpoints


def test_import_without_ray_names_the_extra():
    code = "import sys; sys.modules['ray'] = None; import nsa_dist.launch.ray"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode != 0 and "ImportError: nsa_dist.launch.ray needs Ray Train: pip install 'nsa-dist[ray]'" \
        in proc.stderr, proc.stderr[-3000:]


@needs_ray
@pytest.mark.parametrize("extra,message", [(["--backend", "megatron"], "--backend megatron is not supported"),
                                           (["--num-workers", "3"], "train.cp=2 does not divide --num-workers 3"),
                                           (["--num-workers", "0"], "--num-workers 0 must be at least 1"),
                                           (["--keep-checkpoints", "0"],
                                            "train.keep_checkpoints must be a positive int or null, got 0")])
def test_bad_arguments_are_refused_before_ray_starts(tmp_path, extra, message):
    from nsa_dist.launch.ray import build_config, parse_args

    folder = job_dir(tmp_path, cp=2)
    args = parse_args(["--config", str(folder / "job.yaml"), "--num-workers", "2", "--gpus-per-worker", "0",
                       "--deepspeed_config", str(folder / "job.json"), *extra])
    with pytest.raises(ValueError, match=re.escape(message)):
        build_config(args)


@needs_ray
@pytest.mark.parametrize("yaml_value,extra,expected", [("unset", [], 2), (5, [], 5), (None, [], None),
                                                       (5, ["--keep-checkpoints", "3"], 3),
                                                       (5, ["--keep-checkpoints", "all"], None)])
def test_keep_checkpoints_reaches_ray_checkpoint_config(tmp_path, yaml_value, extra, expected):
    """``train.keep_checkpoints`` (default 2), overridden by ``--keep-checkpoints N|all``, is the job's
    ``CheckpointConfig.num_to_keep`` (None: Ray keeps every checkpoint)."""
    from nsa_dist.launch.ray import build_config, make_trainer, parse_args

    folder = job_dir(tmp_path, cp=2, **({} if yaml_value == "unset" else {"keep_checkpoints": yaml_value}))
    args = parse_args(["--config", str(folder / "job.yaml"), "--num-workers", "2", "--gpus-per-worker", "0",
                       "--deepspeed_config", str(folder / "job.json"), *extra])
    trainer = make_trainer(args, build_config(args))
    assert trainer.run_config.checkpoint_config.num_to_keep == expected


@needs_ray
def test_keep_checkpoints_must_be_a_count_or_all(capsys):
    from nsa_dist.launch.ray import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--config", "job.yaml", "--num-workers", "2", "--keep-checkpoints", "two"])
    assert "expected a positive whole number or 'all', got 'two'" in capsys.readouterr().err
