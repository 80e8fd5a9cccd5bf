"""Resume equals continuous: SIGKILL in the middle of each stage and once during a checkpoint
save; running the same command again must give the same per-step metrics after the resume
point and the same final weights as an uninterrupted run (exactly, on CPU in fp32)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

from pipeline.tracking import read_metrics

ARGS = [
    "+experiment=demo", "run.log_interval=1",
    "stage.sft.max_steps=30", "stage.sft.checkpoint.every_steps=10",
    "stage.rm.max_steps=30", "stage.rm.checkpoint.every_steps=10",
    "stage.ppo.max_steps=12", "stage.ppo.checkpoint.every_steps=4", "stage.ppo.enable_ema=true", "stage.ppo.ema_beta=0.9",
]


def start(out: Path, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """The pipeline in its own process group; output to a pipe, or to `log` when nobody reads it."""
    stdout = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "pipeline", *ARGS, f"run.output_dir={out}"], cwd=ROOT,
                            stdout=stdout, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)


def kill_when(proc: subprocess.Popen, marker: str, timeout: float = 600) -> str:
    """Read the child's output until `marker` appears, then SIGKILL it; return what it printed."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "".join(seen)
        assert time.time() < deadline, "marker never came"
    proc.wait()
    raise AssertionError(f"finished before {marker!r}:\n" + "".join(seen[-30:]))


def kill_during_save(proc: subprocess.Popen, tmp_dir: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not (tmp_dir / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "never reached the save"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def train_rows(path: Path) -> list[dict]:
    return [r for r in read_metrics(path) if r["split"] == "train"]


def timing_free(rows: list[dict]) -> list[dict]:
    """Drop wall-clock figures (seconds, rates, TFLOPs): they differ between any two runs."""
    return [{k: v for k, v in r.items() if not (k.endswith(("_s", "per_s")) or "tflops" in k)} for r in rows]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert tensors, f"no weights in {folder}"
    return tensors


@pytest.fixture(scope="module")
def continuous(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("continuous") / "run"
    proc = run_cli(*ARGS, f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_sigkill_in_each_stage_and_during_a_save_resumes_to_the_same_result(continuous: Path, tmp_path: Path):
    out = tmp_path / "run"
    # 1. killed in SFT after its step-10 checkpoint
    kill_when(start(out), "[sft] train step 15")
    assert (out / "sft" / "checkpoints" / "latest").read_text() == "step_000010"
    # 2. resumed; killed in RM after its step-20 checkpoint
    printed = kill_when(start(out), "[rm] train step 23")
    assert "[sft] resumed from" in printed and "at step 10" in printed
    # 3. resumed; killed while PPO writes its step-8 checkpoint (after step 4's was complete)
    log = tmp_path / "third.log"
    proc = start(out, env={"PIPELINE_CHECKPOINT_PAUSE_AT": "ppo/step_000008"}, log=log)
    kill_during_save(proc, out / "ppo" / "checkpoints" / ".tmp_step_000008")
    assert "[rm] resumed from" in log.read_text() and "at step 20" in log.read_text()
    assert (out / "ppo" / "checkpoints" / "latest").read_text() == "step_000004"
    # 4. resumed from the last complete checkpoint (step 4); runs to the end
    proc = run_cli(*ARGS, f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[ppo] resumed from" in proc.stdout and "at step 4" in proc.stdout
    assert "[sft] already done" in proc.stdout and "[rm] already done" in proc.stdout

    for stage in ("sft", "rm", "ppo"):
        assert timing_free(train_rows(out / stage / "metrics.jsonl")) == \
            timing_free(train_rows(continuous / stage / "metrics.jsonl")), stage
    for final in ("sft/final", "rm/final", "ppo/final/actor", "ppo/final/critic", "ppo/final/actor_ema"):
        a, b = weights(out / final), weights(continuous / final)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{final} {key}"
    assert json.loads((out / "ppo" / "manifest.json").read_text())["status"] == "done"


def test_sigterm_saves_a_checkpoint_and_exits_resumable(tmp_path: Path):
    out = tmp_path / "run"
    proc = start(out)
    for line in proc.stdout:
        if "[sft] train step 3" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait() == 75, rest[-2000:]
    latest = (out / "sft" / "checkpoints" / "latest").read_text()
    state = json.loads((out / "sft" / "checkpoints" / latest / "state.json").read_text())
    assert 3 <= state["step"] < 10  # saved at the step after the signal, not at a scheduled one
    assert not (out / "sft" / "manifest.json").exists()


def test_resume_never_starts_over(continuous: Path, tmp_path: Path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(continuous, out)
    (out / "sft" / "manifest.json").unlink()
    proc = run_cli(*ARGS, f"run.output_dir={out}", "run.resume=never", "run.stages=[sft]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed" not in proc.stdout
    assert timing_free(train_rows(out / "sft" / "metrics.jsonl")) == timing_free(train_rows(continuous / "sft" / "metrics.jsonl"))


def test_non_finite_losses_are_skipped_then_stop_the_stage(tmp_path: Path):
    from pipeline.training import NonFiniteGuard, NonFiniteLossError

    guard = NonFiniteGuard(limit=3)
    assert guard.ok(torch.tensor(1.0), "x") and not guard.ok(torch.tensor(float("nan")), "x")
    assert guard.ok(torch.tensor(2.0), "x") and guard.skipped == 1 and guard.in_a_row == 0
    assert not guard.ok(torch.tensor(float("inf")), "x") and not guard.ok(torch.tensor(float("nan")), "x")
    with pytest.raises(NonFiniteLossError, match="3 updates in a row"):
        guard.ok(torch.tensor(float("nan")), "x")

    # A learning rate that blows the weights up after one step: skipped steps, then a clear stop.
    out = tmp_path / "run"
    proc = run_cli("+experiment=demo", f"run.output_dir={out}", "run.stages=[sft]", "stage.sft.optim.learning_rate=1e12",
                   "stage.sft.optim.gradient_clipping=0", "stage.sft.optim.num_warmup_steps=0",
                   "stage.sft.checkpoint.every_steps=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: sft step 1: loss was not finite 5 updates in a row")
    assert (out / "sft" / "checkpoints" / "latest").read_text() == "step_000001"
    assert not (out / "sft" / "manifest.json").exists()


def test_rng_state_round_trips_without_pickle(tmp_path: Path):
    import random

    import numpy as np

    from pipeline.checkpoint import load_rng_state, save_rng_state

    torch.manual_seed(3), np.random.seed(4), random.seed(5), np.random.normal()
    save_rng_state(tmp_path)
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    load_rng_state(tmp_path)
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all() and first[2:] == again[2:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng_rank0.json", "rng_rank0.safetensors"]


def test_ema_checkpoint_serves_another_world_size_only_when_it_is_replicated(tmp_path: Path, monkeypatch):
    """Without ZeRO-3 every rank holds the same EMA, so a run with more ranks than the checkpoint
    reads rank 0's file; a partitioned (ZeRO-3) EMA or another set of trainable parameters is
    refused with a message naming run.resume, and the checkpoint stays."""
    import pipeline.checkpoint as ckpt
    from pipeline.checkpoint import Checkpointer
    from pipeline.rlhf import ActorEMA

    torch.manual_seed(0)
    actor = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = ActorEMA(actor, 0.9, "cpu")
    with torch.no_grad():
        actor[0].weight.add_(1.0)
    ema.update()
    saver = Checkpointer(tmp_path, every_steps=1, every_minutes=0, keep=2)
    path = saver.save(1, {}, {}, {"actor_ema": ema})
    assert sorted(p.name for p in path.glob("actor_ema_*")) == ["actor_ema_rank0.safetensors"]

    monkeypatch.setattr(ckpt, "rank", lambda: 1)  # a second rank of a larger run
    fresh = ActorEMA(actor, 0.9, "cpu")
    saver.load(path, {}, {"actor_ema": fresh})
    assert all(torch.equal(a, b) for a, b in zip(fresh.values, ema.values, strict=True))
    assert not torch.equal(fresh.values[0], actor[0].weight.detach())  # the average, not the weights

    fresh.sharded = True  # as under ZeRO-3: rank 0's partition is not rank 1's
    with pytest.raises(ValueError, match="holds no actor_ema state for rank 1: it was written by fewer ranks"):
        saver.load(path, {}, {"actor_ema": fresh})
    monkeypatch.setattr(ckpt, "rank", lambda: 0)
    other = ActorEMA(torch.nn.Sequential(torch.nn.Linear(3, 5)), 0.9, "cpu")
    with pytest.raises(ValueError, match="does not match this actor's trainable parameters"):
        saver.load(path, {}, {"actor_ema": other})
    assert (path / "actor_ema_rank0.safetensors").exists()


def test_resume_path_outside_the_run_is_refused(continuous: Path, tmp_path: Path):
    elsewhere = continuous / "sft" / "checkpoints" / "step_000030"
    proc = run_cli(*ARGS, f"run.output_dir={tmp_path}/run", f"run.resume={elsewhere}", "run.stages=[sft]")
    assert proc.returncode == 2
    assert "only resumed from inside this run's folder" in proc.stderr.strip().splitlines()[-1]


def _kill_and_resume_equals_continuous(base: Path | None, tmp_path: Path, extra: list[str], marker: str,
                                       stage: str, finals: list[str], resume_extra: tuple[str, ...] = ()) -> dict[str, Path]:
    """Run `extra` on top of ARGS twice: uninterrupted, and SIGKILLed at `marker` then resumed
    (with `resume_extra` added: settings that must not change the result)."""
    import shutil

    runs = {}
    for name in ("continuous", "killed"):
        out = tmp_path / name
        if base is not None:
            shutil.copytree(base, out)
        if name == "killed":
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", *ARGS, *extra, f"run.output_dir={out}"], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            kill_when(proc, marker)
        proc = run_cli(*ARGS, *extra, *(resume_extra if name == "killed" else ()), f"run.output_dir={out}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if name == "killed":
            assert f"[{stage}] resumed from" in proc.stdout
        runs[name] = out
    assert timing_free(train_rows(runs["killed"] / stage / "metrics.jsonl")) == \
        timing_free(train_rows(runs["continuous"] / stage / "metrics.jsonl"))
    for final in finals:
        a, b = weights(runs["killed"] / final), weights(runs["continuous"] / final)
        assert all(torch.equal(a[k], b[k]) for k in a), final
    return runs


def test_resume_with_gradient_accumulation_across_an_epoch(tmp_path: Path):
    # 720 examples / 13 = 55 micro-batches: 18 steps of 3 an epoch and one left over, which must not
    # spill into the next epoch's steps (the run crosses the epoch at step 18; resumed from step 20).
    extra = ["run.stages=[sft]", "stage.sft.per_device_train_batch_size=13", "stage.sft.gradient_accumulation_steps=3",
             "stage.sft.max_steps=24"]
    _kill_and_resume_equals_continuous(None, tmp_path, extra, "[sft] train step 22", "sft", ["sft/final"])


def test_ppo_resume_with_generation_batches_epochs_ptx_and_normalisation(continuous: Path, shared_data: Path, tmp_path: Path):
    """Resumed with the frozen reference and reward models offloaded (ZeRO-3 engines instead of
    plain modules), as after an out-of-memory error: the same metrics and weights as the plain run."""
    extra = ["run.stages=[ppo]", "stage.ppo.generation_batches=2", "stage.ppo.ppo_epochs=2",
             "stage.ppo.per_device_training_batch_size=8", "stage.ppo.normalize_reward=true",
             "stage.ppo.kl_target=0.05", "stage.ppo.unsup_coef=0.5",
             f"data_blend.ptx_path={shared_data / 'tinyshakespeare' / 'input.txt'}", "stage.ppo.max_steps=8"]
    runs = _kill_and_resume_equals_continuous(continuous, tmp_path, extra, "[ppo] train step 6", "ppo",
                                              ["ppo/final/actor", "ppo/final/critic", "ppo/final/actor_ema"],
                                              resume_extra=("stage.ppo.offload_reference_model=true",
                                                            "stage.ppo.offload_reward_model=true"))
    frozen = {r["role"]: (r["zero_stage"], r["offload"])
              for r in json.loads((runs["killed"] / "plan.json").read_text())["stages"]["ppo"]["roles"]}
    assert frozen["ref"] == frozen["reward"] == (3, True)


def test_every_rank_evaluates_the_same_number_of_batches(monkeypatch):
    """Under ZeRO-3 an eval forward is a collective: a rank with one batch more would hang."""
    import pipeline.dist as dist
    import pipeline.training as training

    data = list(range(33))
    for world in (1, 2, 3, 4, 40):
        for batch in (1, 2, 8, 16, 64):
            counts, seen = [], []
            for r in range(world):  # the data-parallel rank and width come from pipeline.dist
                monkeypatch.setattr(dist, "rank", lambda r=r: r)
                monkeypatch.setattr(dist, "world_size", lambda w=world: w)
                batches = list(training.eval_batches(data, batch, lambda rows: rows))
                counts.append(len(batches))
                assert all(0 < len(b) <= batch for b in batches)
                seen += [x for b in batches for x in b]
            assert len(set(counts)) == 1, (world, batch, counts)
            assert sorted(set(seen)) == data  # every row evaluated
            if batch > 1 and world <= len(data):
                assert sorted(seen) == data  # and none twice
