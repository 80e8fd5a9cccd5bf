"""The SLURM launcher plugin against a real SLURM: a one-node slurmctld + slurmd + munged on
localhost (tests/slurm_cluster.sh, Debian's slurm-wlm, installed when missing), the demo pipeline
submitted through hydra-submitit-launcher as a multirun, and a pre-empted job that checkpoints,
requeues itself and resumes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.slurm
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]' (hydra-submitit-launcher)")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "slurm_cluster.sh"
# The demo, cut down for 2 shared CPU cores (two array tasks run side by side).
SMALL = ["+experiment=demo", "data_blend.datasets.0.max_records=400",
         "stage.sft.max_steps=3", "stage.sft.per_device_train_batch_size=8",
         "stage.rm.max_steps=3", "stage.rm.per_device_train_batch_size=8",
         "stage.ppo.max_steps=2", "stage.ppo.per_device_generation_batch_size=4",
         "stage.ppo.per_device_training_batch_size=4", "stage.ppo.generation.max_new_tokens=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict[str, str]:
    """Environment for SLURM's clients pointing at a fresh one-node cluster; stopped afterwards."""
    installed = all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and os.geteuid() != 0:
        pytest.skip("SLURM (slurmctld, slurmd, munge) is not installed, and installing it needs root")
    if not installed and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install Debian's slurm-wlm")
    base = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(base), "SLURM_LOCAL_CTLD_PORT": str(_free_port()),
           "SLURM_LOCAL_SLURMD_PORT": str(_free_port())}
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
    if started.returncode == 3:
        pytest.skip(f"SLURM could not be installed here: {started.stderr.strip()[-800:]}")
    assert started.returncode == 0, f"SLURM bring-up failed:\n{started.stdout}\n{started.stderr}"
    client_env = {**os.environ, "SLURM_CONF": str(base / "etc" / "slurm.conf"),
                  "PATH": f"{base / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    try:
        yield client_env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)


def submit(slurm: dict, sweep: Path, name: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "-m", "hydra/launcher=slurm", f"hydra.launcher.name={name}",
            f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=30", *overrides]


def jobs(slurm: dict, name: str) -> dict[str, str]:
    """{job id: state} of this test's jobs, finished ones included (MinJobAge keeps them)."""
    out = subprocess.run(["squeue", "--states=all", "--noheader", "--name", name, "--format=%i|%T"],
                         env=slurm, capture_output=True, text=True, timeout=60).stdout
    return dict(line.split("|") for line in out.split())


def finished_jobs(slurm: dict, name: str, timeout: float = 60) -> dict[str, str]:
    """jobs() once none is running any more (submitit's result file lands just before the task exits)."""
    deadline = time.time() + timeout
    while True:
        states = jobs(slurm, name)
        if time.time() > deadline or not set(states.values()) & {"PENDING", "RUNNING", "COMPLETING", "REQUEUED"}:
            return states
        time.sleep(0.5)


def job_logs(sweep: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((sweep / ".submitit").glob("*/*_log.*")))


def test_demo_multirun_of_two_values_runs_as_two_slurm_jobs(slurm, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    sweep, name = tmp_path / "sweep", f"pl-sweep-{uuid.uuid4().hex[:6]}"
    started = time.time()
    proc = subprocess.run(submit(slurm, sweep, name, *SMALL, "stage.ppo.actor.optim.learning_rate=1e-4,2e-4"),
                          cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + job_logs(sweep)[-5000:]
    # One array job, two tasks, both finished in SLURM.
    states = finished_jobs(slurm, name)
    assert len(states) == 2 and set(states.values()) == {"COMPLETED"}, states
    assert len({job.split("_")[0] for job in states}) == 1, states
    script = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --requeue" in script and "srun" in script
    # Each job in its own run folder, with its own value, every stage done and the models written.
    for num, lr in ((0, 1e-4), (1, 2e-4)):
        run = sweep / str(num)
        assert OmegaConf.load(run / "config.yaml").stage.ppo.actor.optim.learning_rate == pytest.approx(lr)
        results = json.loads((run / "results.json").read_text())
        assert set(results) == {"sft", "rm", "ppo", "truth"}  # truth: held-out ground truth of the built-in task
        for stage in ("sft", "rm", "ppo"):
            assert (run / stage / "manifest.json").exists()
        model = AutoModelForCausalLM.from_pretrained(run / "ppo" / "final" / "actor")
        assert model.config.model_type == "opt"
    print(f"two-job SLURM multirun: {time.time() - started:.0f} s")


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path: Path):
    sweep, name = tmp_path / "sweep", f"pl-preempt-{uuid.uuid4().hex[:6]}"
    steps = 120
    cmd = submit(slurm, sweep, name, *SMALL, f"stage.sft.max_steps={steps}", "stage.sft.num_train_epochs=100",
                 "stage.ppo.actor.optim.learning_rate=1e-4")
    driver = subprocess.Popen(cmd, cwd=ROOT, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = sweep / "0" / "sft" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
            assert driver.poll() is None, driver.stdout.read()[-3000:] + job_logs(sweep)[-3000:]
            time.sleep(0.5)
        (job,) = jobs(slurm, name)
        # What SLURM sends signal_delay_s before the time limit (sbatch --signal=USR1@...).
        subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True, timeout=60)
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    logs = job_logs(sweep)
    assert driver.returncode == 0, out[-3000:] + logs[-5000:]
    assert "received SIGUSR1: saving a checkpoint" in logs
    assert f"SLURM job {job}: checkpoint saved, requeued (restart 1)" in logs
    assert "[sft] resumed from" in logs and "/sft/checkpoints/step_" in logs
    assert finished_jobs(slurm, name) == {job: "COMPLETED"}
    run = sweep / "0"
    assert json.loads((run / "results.json").read_text())["sft"]["steps"] == steps
    train_steps = [r["step"] for r in map(json.loads, (run / "sft" / "metrics.jsonl").read_text().splitlines())
                   if r["split"] == "train"]
    assert train_steps == list(range(1, steps + 1))  # resumed where it stopped: no step lost or repeated
    assert (run / "ppo" / "final" / "actor" / "config.json").exists()
