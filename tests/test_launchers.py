"""Launchers: the commands a deployment turns into, SLURM's variables, the Hydra SLURM launcher
config, and a real 2-rank gloo run of every stage (`+deployment=single_node deployment.procs_per_node=2`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.launchers.distributed import child_overrides, needs_relaunch, relaunch_command
from pipeline.launchers.hostfile import HostfileError, read_hostfile
from pipeline.launchers.process_env import RELAUNCHED_ENV, expand_nodelist, inside_launcher
from pipeline.launchers.slurm import register_resolvers, requeue_after_preemption, tasks_per_node, torch_env_from_slurm

ROOT = Path(__file__).resolve().parents[1]
# Small enough for 2 shared CPU cores: 400 records (72 SFT train / 8 eval examples), a few steps.
SMALL = ["+experiment=demo", "data_blend.datasets.0.max_records=400",
         "stage.sft.max_steps=4", "stage.sft.per_device_train_batch_size=8", "stage.sft.checkpoint.every_steps=2",
         "stage.rm.max_steps=4", "stage.rm.per_device_train_batch_size=8",
         "stage.ppo.max_steps=2", "stage.ppo.per_device_generation_batch_size=4",
         "stage.ppo.per_device_training_batch_size=4", "stage.ppo.generation.max_new_tokens=8"]


def make_cfg(**deployment) -> RunConfig:
    return load_config({"model": {"actor": "tiny-opt", "reward": "tiny-opt", "tokenizer": "builtin"},
                        "hardware": {"name": "cpu", "device": "cpu"}, "deployment": deployment})


# ---------------------------------------------------------------- commands


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (absolute names, also imports inside functions)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_launchers_import_only_leaves_and_only_the_cli_imports_launchers():
    """No import circle: distributed and slurm share process_env, not each other; launchers take
    only pipeline's leaves; of pipeline/, the CLI imports launchers (resume.py: node_launch, a leaf)."""
    leaves = {"pipeline.config", "pipeline.errors", "pipeline.dist", "pipeline.files"}
    launcher_modules = {f"pipeline.launchers.{p.stem}" for p in (ROOT / "launchers").glob("*.py")}
    for path in (ROOT / "launchers").glob("*.py"):
        ours = {m for m in imported_modules(path) if m.startswith("pipeline")}
        assert ours <= leaves | launcher_modules, f"launchers/{path.name} imports {sorted(ours - leaves - launcher_modules)}"
    assert "pipeline.launchers.slurm" not in imported_modules(ROOT / "launchers" / "distributed.py")
    assert "pipeline.launchers.distributed" not in imported_modules(ROOT / "launchers" / "slurm.py")
    for leaf in ("process_env", "node_launch"):
        assert not {m for m in imported_modules(ROOT / "launchers" / f"{leaf}.py")
                    if m.startswith("pipeline") and m != "pipeline.files"}, leaf
    importers = {str(p.relative_to(ROOT)) for folder in ("pipeline", "stages") for p in (ROOT / folder).rglob("*.py")
                 if {m for m in imported_modules(p) if m.startswith("pipeline.launchers")} - {"pipeline.launchers.node_launch"}}
    assert importers == {"pipeline/cli.py"}, importers
    node_launch_importers = {str(p.relative_to(ROOT)) for folder in ("pipeline", "stages") for p in (ROOT / folder).rglob("*.py")
                             if "pipeline.launchers.node_launch" in imported_modules(p)}
    assert node_launch_importers <= {"pipeline/cli.py", "pipeline/__main__.py", "pipeline/resume.py"}, node_launch_importers



def test_single_node_relaunches_under_torchrun_with_the_same_overrides():
    cfg = make_cfg(name="single_node", launcher="torchrun", procs_per_node=2)
    assert needs_relaunch(cfg, env={}) and not needs_relaunch(cfg, env={"RANK": "0", "WORLD_SIZE": "2"})
    overrides = child_overrides(["+experiment=demo", "run.output_dir=rel", "stage.sft.max_steps=3"], "/abs/run", "/abs/run/.hydra")
    assert overrides == ["+experiment=demo", "stage.sft.max_steps=3", "run.output_dir=/abs/run",
                         "hydra.run.dir=/abs/run/.hydra", "hydra.output_subdir=null"]
    cmd = relaunch_command(cfg, overrides, env={}, port=29511)
    assert cmd.argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=1", "--nproc_per_node=2", "--node_rank=0", "--master_port=29511"} <= set(cmd.argv)
    assert cmd.argv[cmd.argv.index("-m", 3):][:2] == ["-m", "pipeline"] and cmd.argv[-len(overrides):] == overrides
    assert cmd.env == {RELAUNCHED_ENV: "1"}


def test_single_gpu_and_no_deployment_run_in_process():
    assert not needs_relaunch(make_cfg(name="single_gpu", launcher="in_process", procs_per_node=1), env={})
    assert not needs_relaunch(make_cfg(), env={})
    assert make_cfg().world_size == 1


def test_multi_node_uses_the_deepspeed_launcher_with_the_hostfile(tmp_path: Path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nworker-1 slots=8\nworker-2 slots=8  # spare\n\n")
    assert read_hostfile(hostfile) == {"worker-1": 8, "worker-2": 8}
    cfg = make_cfg(name="multi_node", launcher="deepspeed", nodes=2, procs_per_node=8, hostfile=str(hostfile),
                   master_port=29500)
    cmd = relaunch_command(cfg, ["model.actor=opt-66b"], env={})
    assert cmd.argv[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd.argv[cmd.argv.index("--hostfile") + 1] == str(hostfile)
    assert {"--num_nodes=2", "--num_gpus=8", "--master_addr=worker-1", "--master_port=29500", "--no_local_rank"} <= set(cmd.argv)
    assert cmd.argv[-2:] == ["--module", "pipeline"]  # the overrides travel in the launch file
    assert json.loads(next(iter(cmd.files.values())))["overrides"] == ["model.actor=opt-66b"]


def test_other_nodes_get_overrides_and_variables_through_the_launch_file(tmp_path: Path):
    """On several nodes the command line carries no user text (DeepSpeed pastes it unquoted into
    the remote shell); a rank adopts the launch file: exact overrides, the forwarded variables
    (quotes, spaces, $ kept), this Python first on PATH, and nothing else of the launching shell."""
    from pipeline.launchers.node_launch import LAUNCH_ENV, STOP_FILE_ENV, adopt, stop_file_present, write_private

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=1\nworker-2 slots=1\n")
    cfg = make_cfg(name="multi_node", launcher="deepspeed", nodes=2, procs_per_node=1, hostfile=str(hostfile))
    cfg.run.output_dir = str(tmp_path / "run")
    env = {"HF_HOME": "/scratch/my hf", "WANDB_API_KEY": "k'ey\"$x", "PIPELINE_PROGRESS": "0",
           "UNRELATED_SECRET": "nope", "PATH": "/only/here"}
    overrides = ["+data_blend.datasets=[{name:a,weight:1}]", "run.name='x $HOME;`id`'"]
    cmd = relaunch_command(cfg, overrides, env=env, port=29512)
    assert cmd.argv[-2:] == ["--module", "pipeline"] and not set(overrides) & set(cmd.argv)
    launch = cmd.env[LAUNCH_ENV]
    assert launch == str(tmp_path / "run" / ".launch" / "node_launch.json") and set(cmd.files) == {launch}
    assert cmd.stop_file == str(tmp_path / "run" / ".launch" / "stop")
    write_private(launch, cmd.files[launch])
    assert os.stat(launch).st_mode & 0o777 == 0o600 and os.stat(Path(launch).parent).st_mode & 0o777 == 0o700

    rank_env = {LAUNCH_ENV: launch, "RANK": "1", "WORLD_SIZE": "2", "PATH": "/usr/bin", "HF_HOME": "/node/own",
                "MASTER_ADDR": "worker-1", "MASTER_PORT": "29512"}
    argv = ["pipeline/__main__.py"]
    assert adopt(argv, rank_env)
    assert argv[1:] == overrides and LAUNCH_ENV not in rank_env  # the rank's own children do not adopt it again
    assert {k: rank_env.get(k) for k in ("HF_HOME", "WANDB_API_KEY", "PIPELINE_PROGRESS", RELAUNCHED_ENV)} == \
        {"HF_HOME": "/scratch/my hf", "WANDB_API_KEY": "k'ey\"$x", "PIPELINE_PROGRESS": "0", RELAUNCHED_ENV: "1"}
    assert "UNRELATED_SECRET" not in rank_env
    assert rank_env["PATH"].split(os.pathsep) == [os.path.dirname(sys.executable), "/usr/bin"]
    assert rank_env[STOP_FILE_ENV] == cmd.stop_file and not stop_file_present(rank_env)
    Path(cmd.stop_file).write_text("SIGUSR1")
    assert stop_file_present(rank_env)
    assert not adopt(["x"], {LAUNCH_ENV: launch})  # not a rank (the parent itself): nothing adopted
    stale = {LAUNCH_ENV: launch, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert not adopt(["x"], stale) and "HF_HOME" not in stale  # another run's file (another rendezvous)
    with pytest.raises(SystemExit, match="must be on a file system every host of the hostfile sees"):
        adopt(["x"], {**rank_env, LAUNCH_ENV: str(tmp_path / "elsewhere.json")})
    one_node = relaunch_command(make_cfg(launcher="deepspeed", procs_per_node=2), overrides, env=env)
    assert one_node.files == {} and one_node.stop_file is None and one_node.argv[-2:] == overrides


def test_bad_multi_node_settings_name_the_key(tmp_path: Path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8\n")
    with pytest.raises(ConfigError, match="deployment.nodes=2: the hostfile .* lists only 1 host"):
        relaunch_command(make_cfg(launcher="deepspeed", nodes=2, procs_per_node=8, hostfile=str(hostfile)), [], env={})
    with pytest.raises(ConfigError, match="deployment.hostfile"):
        relaunch_command(make_cfg(launcher="deepspeed", nodes=2, procs_per_node=8), [], env={})
    with pytest.raises(ConfigError, match="deployment.hostfile=.*missing: no such file"):
        relaunch_command(make_cfg(launcher="deepspeed", nodes=2, procs_per_node=8, hostfile=str(tmp_path / "missing")), [], env={})
    with pytest.raises(ConfigError, match="NODE_RANK"):
        relaunch_command(make_cfg(launcher="torchrun", nodes=2, procs_per_node=8), [], env={})
    hostfile.write_text("worker-1 gpus=8\n")
    with pytest.raises(HostfileError, match="line 1"):
        read_hostfile(hostfile)


# ---------------------------------------------------------------- SLURM variables


def slurm_env(**extra) -> dict:
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_STEP_NODELIST": "gpu[07-08]"}
    return {**env, **extra}


def test_torch_distributed_comes_from_slurm_variables():
    cfg = make_cfg(name="slurm", launcher="slurm", nodes=2, procs_per_node=2)
    values = torch_env_from_slurm(cfg, slurm_env())
    assert values == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1",
                      "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242 % 20000)}
    assert inside_launcher(values)
    # Another launcher inside a one-task job step starts the ranks itself; the batch script is no step.
    assert torch_env_from_slurm(make_cfg(launcher="torchrun", procs_per_node=2),
                                slurm_env(SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")) == {}
    with pytest.raises(ConfigError, match="deployment.launcher=slurm: this process is not a SLURM job step"):
        torch_env_from_slurm(cfg, {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"})


def test_torchrun_on_several_slurm_nodes_starts_every_local_rank():
    """One SLURM task per node (tasks_per_node for torchrun): the task must not become a rank itself
    (that ran one rank per node, silently); torchrun gets the node rank, node 0 and one port from SLURM."""
    cfg = make_cfg(name="single_node", launcher="torchrun", nodes=2, procs_per_node=8)
    env = slurm_env(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="1(x2)")
    assert torch_env_from_slurm(cfg, env) == {} and needs_relaunch(cfg, env={})
    cmd = relaunch_command(cfg, ["x=1"], env=env)
    assert {"--nnodes=2", "--nproc_per_node=8", "--node_rank=1", "--master_addr=gpu07",
            f"--master_port={20000 + 4242 % 20000}"} <= set(cmd.argv)
    with pytest.raises(ConfigError, match="deployment.master_port=<a port free on node 0>"):
        relaunch_command(make_cfg(launcher="torchrun", nodes=2, procs_per_node=8, master_addr="10.0.0.1"), [],
                         env={"NODE_RANK": "1"})
    with pytest.raises(ConfigError, match="deployment.launcher=deepspeed in a SLURM job step of 2 tasks"):
        torch_env_from_slurm(make_cfg(launcher="deepspeed", nodes=2, procs_per_node=8), env)


def test_nodelist_expansion_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert expand_nodelist("gpu[07-09,12],login1") == ["gpu07", "gpu08", "gpu09", "gpu12", "login1"]


def test_requeue_only_from_the_first_task_of_a_slurm_job():
    assert not requeue_after_preemption({})  # not in SLURM
    assert not requeue_after_preemption({"SLURM_JOB_ID": "7", "SLURM_PROCID": "1"})  # not rank 0
    assert not requeue_after_preemption({"SLURM_JOB_ID": "7", RELAUNCHED_ENV: "1"})  # the relaunching parent requeues
    assert not requeue_after_preemption({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "3", "PIPELINE_MAX_REQUEUES": "3"})


def test_hydra_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_resolvers as register_pipeline_resolvers

    register_pipeline_resolvers()
    register_resolvers()
    assert tasks_per_node("torchrun", 8, 8) == 1 and tasks_per_node("slurm", None, 4) == 4
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["+experiment=demo", "+deployment=slurm", "deployment.nodes=2",
                                           "deployment.procs_per_node=3", "hydra/launcher=slurm",
                                           "hydra.launcher.partition=gpu", "hydra.launcher.account=rlhf",
                                           "hydra.launcher.timeout_min=30"], return_hydra_config=True)
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["partition"], launcher["account"],
            launcher["timeout_min"]) == (2, 3, "gpu", "rlhf", 30)
    assert launcher["additional_parameters"] == {"signal": "USR1@120", "requeue": True}


# ---------------------------------------------------------------- a real 2-rank run

# Loaded by every Python process of the run (PYTHONPATH): records which (epoch, example index) each
# rank's training loop took from epoch_batches, by stage (the collate function's name), into
# PIPELINE_SHARD_LOG_DIR, read when pipeline.training is imported (on other nodes that variable
# arrives with the launch file, after interpreter start-up).
SITECUSTOMIZE = textwrap.dedent('''
    import importlib.abc, importlib.util, json, os, sys

    def _patch(mod, log):
        original = mod.epoch_batches

        class Recorded:
            def __init__(self, data, stage, epoch, tp):
                self.data, self.stage, self.epoch, self.tp = data, stage, epoch, tp
            def __len__(self):
                return len(self.data)
            def __getitem__(self, i):
                import torch.distributed as dist
                rank = dist.get_rank() if dist.is_initialized() else 0
                world = dist.get_world_size() if dist.is_initialized() else 1
                with open(os.path.join(log, f"rank{rank}.jsonl"), "a") as f:
                    f.write(json.dumps({"stage": self.stage, "epoch": self.epoch, "index": int(i),
                                        "world": world, "size": len(self.data), "tp": self.tp}) + "\\n")
                return self.data[i]

        def epoch_batches(data, micro_batch, collate, seed, epoch, skip=0, tp=1):
            stage = getattr(collate, "func", collate).__name__
            return original(Recorded(data, stage, epoch, tp), micro_batch, collate, seed, epoch, skip, tp)
        mod.epoch_batches = epoch_batches

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "pipeline.training":
                return None
            sys.meta_path.remove(self)
            log = os.environ.get("PIPELINE_SHARD_LOG_DIR")
            if not log:
                return None
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                _patch(module, log)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())
''')


def run_recording_shards(tmp: Path, *args: str, path_prefix: str = "") -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Run the pipeline with SMALL + args; each rank logs the examples it trains on to <tmp>/shards."""
    out, shards, hook = tmp / "run", tmp / "shards", tmp / "hook"
    shards.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIPELINE_SHARD_LOG_DIR": str(shards),
           "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env["PATH"]
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", RELAUNCHED_ENV):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", *SMALL, *args, f"run.output_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, shards, proc


def assert_disjoint_shards(shards: Path) -> None:
    seen = {rank: [json.loads(line) for line in (shards / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}
    assert not (shards / "rank2.jsonl").exists()
    assert all(row["world"] == 2 for rows in seen.values() for row in rows)
    stages = {row["stage"] for row in seen[0]}
    assert {"collate_sft", "collate_pairs"} <= stages and len(stages) >= 3, stages  # sft, rm, ppo prompts
    assert stages == {row["stage"] for row in seen[1]}
    for stage in stages:
        mine = {rank: {(r["epoch"], r["index"]) for r in rows if r["stage"] == stage} for rank, rows in seen.items()}
        assert mine[0] and mine[1], stage
        assert not mine[0] & mine[1], f"{stage}: ranks 0 and 1 trained on the same examples {sorted(mine[0] & mine[1])[:5]}"
        assert len(mine[0]) == len(mine[1]), stage  # equal shards: the same number of steps on both ranks


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    return run_recording_shards(tmp_path_factory.mktemp("two_rank"), "+deployment=single_node",
                                "deployment.procs_per_node=2")


def test_two_rank_run_finishes_every_stage_under_torchrun(two_rank_run):
    out, _, proc = two_rank_run
    assert "launching torch.distributed.run" in proc.stdout and "--nproc_per_node=2" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"sft", "rm", "ppo", "truth"}  # truth: the built-in task's held-out ground truth
    for stage in ("sft", "rm", "ppo"):
        assert json.loads((out / stage / "manifest.json").read_text())["result"]["steps"] >= 1
        # Only rank 0 writes metrics: one line per (step, split), not two.
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        keys = [(r["step"], r["split"]) for r in rows]
        assert len(keys) == len(set(keys)), f"{stage}: duplicate metric rows {keys}"
    # The launching process held the folder; rank 0 ran under its lock (a lock of its own would have
    # been refused: the holder, the parent, was alive), and it is gone with the run.
    assert not (out / ".lock").exists()


def test_each_rank_trained_on_its_own_shard(two_rank_run):
    assert_disjoint_shards(two_rank_run[1])


def test_zero3_ema_partitioned_over_two_ranks_saves_what_zero2_saves(two_rank_run, tmp_path: Path):
    """Under ZeRO-3 each rank averages only its partition of the actor; the saved actor_ema (the
    partitions gathered) equals ZeRO-2's, where every rank averages whole tensors (same seed, same
    data: the runs train alike within rtol 1e-4). The ZeRO-3 run also generates module by module
    (generation.gather_weights=false), which must give the same answers."""
    import shutil

    from safetensors.torch import load_file

    out, _, _ = two_rank_run
    finals = {}
    for stage in (2, 3):
        run = tmp_path / f"zero{stage}"
        shutil.copytree(out, run, ignore=shutil.ignore_patterns("ppo"))
        proc = run_cli(*SMALL, "+deployment=single_node", "deployment.procs_per_node=2", "run.stages=[ppo]",
                       f"run.output_dir={run}", f"stage.ppo.actor.strategy.zero_stage={stage}",
                       f"stage.ppo.critic.strategy.zero_stage={stage}", "stage.ppo.enable_ema=true",
                       "stage.ppo.ema_beta=0.5", "stage.ppo.checkpoint.every_steps=1",
                       # ZeRO-3 also generates module by module: ranks step together (synced_gpus)
                       *(["stage.ppo.generation.gather_weights=false"] if stage == 3 else []), timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert {f"actor_ema_rank{r}.safetensors" for r in (0, 1)} <= {p.name for p in (run / "ppo" / "checkpoints" / "step_000002").iterdir()}
        finals[stage] = {name: load_file(run / "ppo" / "final" / name / "model.safetensors") for name in ("actor", "actor_ema")}
    start = load_file(out / "sft" / "final" / "model.safetensors")
    for name in ("actor", "actor_ema"):
        z2, z3 = finals[2][name], finals[3][name]
        assert set(z2) == set(z3) == set(start)
        for key in z2:
            torch.testing.assert_close(z3[key], z2[key], rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    ema, actor = finals[3]["actor_ema"], finals[3]["actor"]
    moved = max(float((ema[k] - start[k]).abs().max()) for k in ema)
    assert 0 < moved < max(float((actor[k] - start[k]).abs().max()) for k in actor)
    # The last checkpoint (step 2, the end) holds each rank's partitions: together, the saved EMA.
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3" / "ppo" / "final" / "actor_ema")
    step = tmp_path / "zero3" / "ppo" / "checkpoints" / "step_000002"
    parts = [load_file(step / f"actor_ema_rank{r}.safetensors") for r in (0, 1)]
    params = list(saved.parameters())
    assert len(parts[0]) == len(parts[1]) == len(params)
    for i, param in enumerate(params):
        whole = torch.cat([parts[0][str(i)], parts[1][str(i)]])[: param.numel()].view(param.shape)
        torch.testing.assert_close(whole, param.detach(), rtol=0, atol=0)


def two_node_args(tmp_path: Path) -> list[str]:
    from pipeline.dist import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    return ["+deployment=multi_node", f"deployment.hostfile={hostfile}", "deployment.nodes=2",
            "deployment.procs_per_node=1", f"deployment.master_port={free_port()}"]


FAKE_CLUSTER = str(ROOT / "tests" / "fake_cluster")


def test_two_node_run_through_the_deepspeed_launcher_and_pdsh(tmp_path: Path):
    """+deployment=multi_node with a 2-host hostfile, for real up to the network: DeepSpeed's runner
    calls pdsh, which (tests/fake_cluster/pdsh, both hosts being this machine) starts each node's
    launcher in a bare login shell as ssh would. The ranks get the overrides (one that a shell
    would mangle) and the forwarded variables only through the launch file, form one world of 2
    and train on disjoint shards; the launch file (it may hold tokens) is gone afterwards."""
    name = "x{a,b} $HOME"
    out, shards, proc = run_recording_shards(tmp_path, *two_node_args(tmp_path), "stage.sft.checkpoint.every_steps=0",
                                             f"run.name='{name}'", path_prefix=FAKE_CLUSTER)
    assert "launching deepspeed.launcher.runner" in proc.stdout
    assert "localhost: " in proc.stdout and "127.0.0.1: " in proc.stdout  # both nodes' output, through pdsh
    assert OmegaConf.load(out / "config.yaml").run.name == name
    assert set(json.loads((out / "results.json").read_text())) == {"sft", "rm", "ppo", "truth"}
    assert_disjoint_shards(shards)
    assert not (out / ".launch" / "node_launch.json").exists()
    assert not (out / ".lock").exists()  # rank 0 had the parent's token through the launch file


def test_eval_metric_is_reduced_over_both_ranks(two_rank_run):
    """The SFT eval loss the 2-rank run reports (each rank evaluates half, then all_reduce_mean) equals
    one process evaluating the saved final model on the whole eval split."""
    from transformers import AutoModelForCausalLM

    from pipeline.data import load_stage_data
    from pipeline.data.collate import collate_sft
    from pipeline.models import load_tokenizer

    out, _, _ = two_rank_run
    cfg = load_config(OmegaConf.load(out / "config.yaml"))
    tokenizer = load_tokenizer(cfg.tokenizer_source, out)
    data = load_stage_data(cfg, "sft", tokenizer)
    assert len(data.eval) >= 2
    model = AutoModelForCausalLM.from_pretrained(out / "sft" / "final").eval()
    collate = partial(collate_sft, pad_id=tokenizer.pad_token_id, mask_prompt=cfg.stage.sft.mask_prompt)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.eval), 4):
            batch = collate([data.eval[i] for i in range(start, min(start + 4, len(data.eval)))])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    reported = json.loads((out / "results.json").read_text())["sft"]["eval_loss_after"]
    assert reported == pytest.approx(total / tokens, rel=1e-4)


def test_checkpoints_written_and_final_models_reload(two_rank_run):
    from transformers import AutoModelForCausalLM

    out, _, _ = two_rank_run
    steps = sorted(p.name for p in (out / "sft" / "checkpoints").glob("step_*"))
    assert "step_000002" in steps, steps
    assert (out / "sft" / "checkpoints" / "step_000002" / "state.json").exists()
    for path in (out / "sft" / "final", out / "ppo" / "final" / "actor"):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- multirun and stop signals


def clean_env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", RELAUNCHED_ENV):
        env.pop(var, None)
    return env


def test_local_multirun_gives_each_job_its_own_run_folder(tmp_path: Path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-m", f"hydra.sweep.dir={sweep}", *SMALL,
                           "stage.sft.max_steps=2", "stage.rm.max_steps=2", "stage.ppo.max_steps=1",
                           "stage.ppo.actor.optim.learning_rate=1e-4,2e-4"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for num, lr in ((0, 1e-4), (1, 2e-4)):
        run = sweep / str(num)
        assert f"== run {run} ==" in proc.stdout
        assert OmegaConf.load(run / "config.yaml").stage.ppo.actor.optim.learning_rate == pytest.approx(lr)
        assert (run / "ppo" / "manifest.json").exists() and (run / "ppo" / "final" / "actor" / "config.json").exists()


def stop_once_training(cmd: list[str], out: Path, env: dict, stop, new_session: bool = False) -> tuple[int, str]:
    """Start `cmd`, call stop(process) once SFT has logged a train step, return (exit code, output)."""
    import time

    parent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=new_session)
    try:
        metrics = out / "sft" / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
            assert parent.poll() is None, parent.stdout.read()[-3000:]
            time.sleep(0.25)
        stop(parent)
        log, _ = parent.communicate(timeout=300)
    finally:
        if parent.poll() is None:
            parent.kill()
    return parent.returncode, log


def stopped_checkpoint(out: Path) -> tuple[Path, int]:
    """The one SFT checkpoint a stop left (periodic saving is off), and its step (between 1 and 99)."""
    (checkpoint,) = (out / "sft" / "checkpoints").glob("step_*")
    stopped_at = int(checkpoint.name.split("_")[1])
    assert 1 <= stopped_at < 100
    return checkpoint, stopped_at


def test_sigusr1_to_a_relaunched_run_checkpoints_every_rank_and_the_same_command_resumes(tmp_path: Path):
    import signal

    from pipeline.models import load_tokenizer, materialize

    out = tmp_path / "run"
    materialize("tiny-opt", out, len(load_tokenizer("builtin", out)), 1234)  # see two_rank_run
    cmd = [sys.executable, "-m", "pipeline", *SMALL, "+deployment=single_node", "deployment.procs_per_node=2",
           f"run.output_dir={out}", "stage.sft.max_steps=100", "stage.sft.num_train_epochs=100",
           "stage.sft.checkpoint.every_steps=0", "stage.rm.max_steps=1", "stage.ppo.max_steps=1"]
    code, log = stop_once_training(cmd, out, clean_env(), lambda parent: parent.send_signal(signal.SIGUSR1))
    assert code == 75, log[-3000:]  # SIGUSR1: what SLURM sends before the time limit
    assert "asking the ranks to checkpoint and stop" in log and log.count("checkpoint saved; exiting") == 2
    checkpoint, stopped_at = stopped_checkpoint(out)
    again = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"[sft] resumed from {checkpoint} at step {stopped_at}" in again.stdout
    assert json.loads((out / "results.json").read_text())["sft"]["steps"] == 100


def test_sigterm_to_the_process_group_stops_a_two_node_run_through_the_stop_file_and_it_resumes(tmp_path: Path):
    """Ranks on other hosts are not the launching process's children: a stop reaches them only as
    <run>/.launch/stop. SIGTERM goes to the whole process group, as a scheduler sends it; DeepSpeed's
    runner (in its own session) must not get it, or its handler kills every rank unsaved. Both
    ranks checkpoint and exit 75; the same command resumes (a stale stop file does not stop it)."""
    import signal

    out = tmp_path / "run"
    args = [*SMALL, *two_node_args(tmp_path), f"run.output_dir={out}", "stage.sft.max_steps=100",
            "stage.sft.num_train_epochs=100", "stage.sft.checkpoint.every_steps=0", "stage.rm.max_steps=1",
            "stage.ppo.max_steps=1"]
    env = {**clean_env(), "PATH": FAKE_CLUSTER + os.pathsep + os.environ["PATH"]}
    code, log = stop_once_training([sys.executable, "-m", "pipeline", *args], out, env,
                                   lambda parent: os.killpg(parent.pid, signal.SIGTERM), new_session=True)
    assert code == 75, log[-3000:]
    assert log.count("checkpoint saved; exiting") == 2, log[-3000:]
    checkpoint, stopped_at = stopped_checkpoint(out)
    (out / ".launch").mkdir(exist_ok=True)
    (out / ".launch" / "stop").write_text("left over")
    again = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"[sft] resumed from {checkpoint} at step {stopped_at}" in again.stdout
    assert json.loads((out / "results.json").read_text())["sft"]["steps"] == 100


def test_collectives_put_their_tensors_where_the_backend_reduces(monkeypatch):
    """NCCL reduces CUDA tensors only: the per-step flags (any_rank) and metric sums
    (all_reduce_mean) must be made on the current GPU there, on the CPU under gloo."""
    from pipeline.dist import collective_device

    assert collective_device() == torch.device("cpu")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    assert collective_device() == torch.device("cpu")
