"""Critic-free step 3 (GRPO, RLOO, REINFORCE++) with a reward function, on CPU with tiny models: no critic
or reward model is built, checkpointed, saved or planned; groups of samples per prompt; ZeRO 0-3 and
LoRA; resume equals a continuous run; held-out accuracy with its interval in the results.

One tiny SFT run on the built-in verifiable task (builtin_pick) is made once per session; each variant
runs step 3 alone in a copy of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import stage_config

from pipeline.config import ConfigError, load_config
from pipeline.runner import run_pipeline

BASE = {
    "run": {"name": "tiny", "dtype": "fp32", "log_interval": 1, "seed": 1234},
    "model": {"actor": "tiny-opt", "reward": "tiny-opt", "tokenizer": "builtin:pick"},
    "data_blend": {"name": "pick", "datasets": [{"name": "builtin_pick", "max_records": 400}], "split": "1,0,1",
                   "max_prompt_len": 16, "max_answer_len": 4},
    "hardware": {"name": "cpu", "device": "cpu"},
    "stage": {
        "sft": {"per_device_train_batch_size": 16, "max_steps": 3, "optim": {"learning_rate": 3e-3}},
        "ppo": {"reward": "gsm8k_exact_match", "advantage_estimator": "grpo", "samples_per_prompt": 4,
                "per_device_generation_batch_size": 2, "per_device_training_batch_size": 4, "max_steps": 2,
                "eval_prompts": 6, "generation": {"max_new_tokens": 4},
                "actor": {"optim": {"learning_rate": 1e-3, "num_warmup_steps": 0}}},
    },
}


def config(out: Path, stages: list[str], **ppo) -> dict:
    return stage_config(BASE, out, stages, "ppo", ppo)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo_base") / "run"
    run_pipeline(load_config(config(out, ["sft"])))
    return out


def run_ppo(sft_run: Path, out: Path, **ppo) -> tuple[dict, list[dict]]:
    shutil.copytree(sft_run, out)
    result = run_pipeline(load_config(config(out, ["ppo"], **ppo)))["ppo"]
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return result, [r for r in rows if r["split"] == "train"]


def timing_free(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k not in ("time", "tflops", "samples_per_s")}
            for r in rows]


@pytest.mark.parametrize("estimator, zero, lora", [("grpo", 2, 0), ("rloo", 3, 4), ("reinforce_pp", 0, 0)])
def test_critic_free_run_builds_saves_and_plans_no_critic(sft_run, tmp_path, estimator, zero, lora):
    samples = 1 if estimator == "reinforce_pp" else 4
    result, rows = run_ppo(sft_run, tmp_path / "run", advantage_estimator=estimator, samples_per_prompt=samples,
                           per_device_training_batch_size=2 * samples // 2 if samples > 1 else 2,
                           checkpoint={"every_steps": 1},
                           actor={"strategy": {"zero_stage": zero}, "lora": {"dim": lora}})
    ppo = tmp_path / "run" / "ppo"
    assert sorted(p.name for p in (ppo / "final").iterdir()) == ["actor"]
    step_dir = sorted((ppo / "checkpoints").glob("step_*"))[-1]
    assert not [p for p in step_dir.rglob("*") if "critic" in p.name], "a critic in the checkpoint"
    assert [r["step"] for r in rows] == [1, 2]
    assert all("critic_loss" not in r and "value_error" not in r for r in rows)
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows)  # exact match scores 0 or 1
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["stages"]["ppo"]
    assert [r["role"] for r in plan["roles"]] == ["actor", "ref"]
    assert plan["roles"][0]["zero_stage"] == zero and plan["roles"][0]["lora_dim"] == lora
    # held-out accuracy: counts, share and Wilson interval agree
    heldout = json.loads((ppo / "heldout.json").read_text())
    assert sorted(heldout) == ["greedy_after", "greedy_before", "greedy_gain", "sampled_after", "sampled_before", "sampled_gain"]
    for key in ("greedy_before", "greedy_after", "sampled_before", "sampled_after"):
        right, n, low, high = heldout[key]
        assert n == 6 and 0 <= right <= n and low <= right / n <= high
        assert result[f"heldout_{key}"] == right / n and result[f"heldout_{key}_ci95"] == [low, high]
    for mode in ("greedy", "sampled"):
        gain, (low, high) = result[f"heldout_{mode}_gain"], result[f"heldout_{mode}_gain_ci95"]
        assert gain == pytest.approx(result[f"heldout_{mode}_after"] - result[f"heldout_{mode}_before"]) and low <= gain <= high
        assert heldout[f"{mode}_gain"] == [gain, low, high]


def test_grpo_resume_equals_continuous(sft_run, tmp_path, monkeypatch):
    """4 steps uninterrupted vs stopped after the step-2 checkpoint and resumed: the same metrics and
    the same final weights (KL in the loss, k3, the GRPO paper's per-answer normalisation)."""
    from safetensors.torch import load_file

    import pipeline.stages.ppo as ppo_stage

    settings = {"max_steps": 4, "checkpoint": {"every_steps": 2}, "kl_placement": "loss", "kl_estimator": "k3",
                "kl_ctl": 0.04, "loss_aggregation": "sequence"}
    runs = {}
    runs["continuous"] = run_ppo(sft_run, tmp_path / "continuous", **settings)[1]

    def stop_at_first_checkpoint(exit_if_set: bool = False) -> bool:
        if exit_if_set:
            raise SystemExit(3)
        return False

    with monkeypatch.context() as patch:
        patch.setattr(ppo_stage, "stop_requested", stop_at_first_checkpoint)
        with pytest.raises(SystemExit):
            run_ppo(sft_run, tmp_path / "resumed", **settings)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r["split"] == "train") == 2
    result = run_pipeline(load_config(config(tmp_path / "resumed", ["ppo"], **settings)))["ppo"]
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    runs["resumed"] = [r for r in rows if r["split"] == "train"]
    assert timing_free(runs["resumed"]) == timing_free(runs["continuous"])
    a = load_file(tmp_path / "resumed" / "ppo" / "final" / "actor" / "model.safetensors")
    b = load_file(tmp_path / "continuous" / "ppo" / "final" / "actor" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the start's held-out accuracy, measured before the stop, is carried over by heldout.json
    continuous = json.loads((tmp_path / "continuous" / "ppo" / "heldout.json").read_text())
    assert result["heldout_greedy_before"] == continuous["greedy_before"][0] / continuous["greedy_before"][1]


def test_groups_of_samples_and_their_advantages(sft_run, tmp_path):
    """generate_experience samples samples_per_prompt answers per prompt, consecutive; GRPO's advantages
    are the same on every token of an answer and sum to zero over each group."""
    from pipeline.data import load_stage_data
    from pipeline.data.collate import collate_prompts
    from pipeline.dist import init_distributed
    from pipeline.models import load_tokenizer
    from pipeline.rlhf import PPOTrainer, RLHFEngine

    cfg = load_config(config(sft_run, ["ppo"], samples_per_prompt=4, scale_advantages_by_std=False))
    init_distributed(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_source, sft_run)
    data = load_stage_data(cfg, "ppo", tokenizer)
    batch = collate_prompts([data.train[i] for i in range(3)], tokenizer.pad_token_id)
    torch.manual_seed(0)
    engine = RLHFEngine(sft_run / "sft" / "final", None, tokenizer, num_total_iters=4, args=cfg)
    assert engine.critic is None and engine.reward is None and set(engine.sizes) == {"actor", "ref"}
    trainer = PPOTrainer(engine, cfg)
    exp = trainer.generate_experience(batch)
    prompts = exp.seq[:, : exp.prompt_len]
    assert exp.seq.shape[0] == 12 and torch.equal(prompts, batch["input_ids"].repeat_interleave(4, dim=0))
    per_answer = exp.advantages.sum(1) / exp.answer_mask.sum(1)
    assert torch.allclose(exp.advantages, per_answer[:, None] * exp.answer_mask, atol=1e-6)
    groups = exp.scores.view(3, 4)
    assert torch.allclose(per_answer.view(3, 4), groups - groups.mean(1, keepdim=True), atol=1e-6)
    a_loss, c_loss = trainer.train_rlhf(next(exp.minibatches(4)))
    assert torch.isfinite(a_loss) and float(c_loss) == 0.0


@pytest.mark.parametrize("ppo, stages, message", [
    ({"advantage_estimator": "grpo", "samples_per_prompt": 1}, ["sft", "ppo"],
     "stage.ppo.samples_per_prompt=1 must be >= 2 for stage.ppo.advantage_estimator=grpo"),
    ({"advantage_estimator": "ppo2"}, ["sft", "ppo"], "stage.ppo.advantage_estimator=ppo2 must be one of"),
    ({"samples_per_prompt": 3, "per_device_training_batch_size": 4}, ["sft", "ppo"],
     "stage.ppo.per_device_training_batch_size=4 must divide the rows of a generation batch"),
    ({}, ["sft", "rm", "ppo"], "drop rm from run.stages"),
    ({"kl_placement": "both"}, ["sft", "ppo"], "stage.ppo.kl_placement=both must be reward or loss"),
    ({"loss_aggregation": "mean"}, ["sft", "ppo"], "stage.ppo.loss_aggregation=mean must be token, sequence or constant"),
])
def test_bad_settings_are_refused_naming_the_key(tmp_path, ppo, stages, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(config(tmp_path, stages, **ppo))


def test_stage_options_compose():
    from hydra import compose, initialize_config_dir

    root = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(root), version_base=None):
        for option, estimator, samples in (("grpo", "grpo", 8), ("rloo", "rloo", 4), ("reinforce_pp", "reinforce_pp", 1)):
            cfg = load_config(compose("config", overrides=[f"stage={option}", "stage.ppo.reward=gsm8k_exact_match",
                                                           "run.stages=[sft,ppo]"]), check_paths=False)
            assert (cfg.stage.ppo.advantage_estimator, cfg.stage.ppo.samples_per_prompt) == (estimator, samples)
        cfg = load_config(compose("config", overrides=["+experiment=pick"]), check_paths=False)
        assert cfg.stage.ppo.advantage_estimator == "grpo" and cfg.model.tokenizer == "builtin:pick"


@pytest.mark.slow
def test_two_gloo_ranks_under_zero3(tmp_path: Path):
    """[sft, ppo] with GRPO and the exact-match reward on 2 gloo ranks under torchrun, the actor and
    its reference partitioned by ZeRO-3: each rank's groups are its own prompts' samples, rank 0 alone
    writes metrics, heldout.json and the final actor; no critic anywhere."""
    from conftest import run_cli

    out = tmp_path / "run"
    proc = run_cli("+experiment=pick", "data_blend.datasets.0.max_records=400", "run.log_interval=1",
                   "stage.sft.max_steps=4", "stage.ppo.max_steps=3", "stage.ppo.samples_per_prompt=4",
                   "stage.ppo.per_device_generation_batch_size=2", "stage.ppo.per_device_training_batch_size=4",
                   "stage.ppo.eval_prompts=8", "stage.ppo.actor.strategy.zero_stage=3", "+deployment=single_node",
                   "deployment.procs_per_node=2", f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--nproc_per_node=2" in proc.stdout
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert sorted(p.name for p in (out / "ppo" / "final").iterdir()) == ["actor"]
    roles = json.loads((out / "plan.json").read_text())["stages"]["ppo"]["roles"]
    assert {r["role"]: r["zero_stage"] for r in roles} == {"actor": 3, "ref": 3}
    heldout = json.loads((out / "ppo" / "heldout.json").read_text())
    assert all(heldout[key][1] == 8 for key in heldout if not key.endswith("_gain"))
