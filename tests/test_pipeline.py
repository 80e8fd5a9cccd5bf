"""The whole pipeline end to end: the offline demo, then real hh-rlhf data with the OPT tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.models import RewardModel
from pipeline.tracking import read_metrics


def test_demo_learns_in_every_stage(demo_run: Path):
    results = json.loads((demo_run / "results.json").read_text())
    sft, rm, ppo = results["sft"], results["rm"], results["ppo"]
    assert sft["eval_loss_after"] < 0.3 * sft["eval_loss_before"]
    assert rm["accuracy_after"] >= 0.9 and rm["chosen_score"] > rm["rejected_score"]
    assert ppo["reward_last"] > ppo["reward_first"] + 0.3
    assert ppo["steps"] == 80
    # The demo's closing lines summarise each stage and say where the models are.
    tail = (demo_run / "stdout.txt").read_text().splitlines()[-16:]
    assert any(line.startswith("SFT   eval loss") for line in tail)
    assert any("held-out accuracy" in line for line in tail)
    assert any(line.startswith("PPO   mean reward") for line in tail)
    assert any(str(demo_run / "ppo" / "final") in line for line in tail)


def test_demo_writes_metrics_manifests_and_loadable_models(demo_run: Path):
    for stage in ("sft", "rm", "ppo"):
        rows = read_metrics(demo_run / stage / "metrics.jsonl")
        assert len([r for r in rows if r["split"] == "train"]) >= 40
        manifest = json.loads((demo_run / stage / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["config_hash"]
    ppo_rows = [r for r in read_metrics(demo_run / "ppo" / "metrics.jsonl") if r["split"] == "train"]
    for key in ("reward", "kl", "entropy", "clip_frac", "approx_kl", "value_error", "answer_length"):
        assert all(key in r for r in ppo_rows), key

    tokenizer = AutoTokenizer.from_pretrained(demo_run / "ppo" / "final" / "actor")
    actor = AutoModelForCausalLM.from_pretrained(demo_run / "ppo" / "final" / "actor")
    sft_actor = AutoModelForCausalLM.from_pretrained(demo_run / "sft" / "final")
    assert any(not torch.equal(a, b) for a, b in zip(actor.parameters(), sft_actor.parameters()))
    prompt = tokenizer("\n\nHuman: what color is the cat ?\n\nAssistant:", return_tensors="pt")
    out = actor.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "cat" in tokenizer.decode(out[0, prompt.input_ids.shape[1]:])

    rm = RewardModel.from_pretrained(demo_run / "rm" / "final").eval()
    good = tokenizer("\n\nHuman: what color is the cat ?\n\nAssistant: the cat is", return_tensors="pt")
    with torch.no_grad():
        values = rm(good.input_ids, good.attention_mask)
    assert values.shape == good.input_ids.shape
    critic = RewardModel.from_pretrained(demo_run / "ppo" / "final" / "critic")
    assert critic.v_head.weight.shape == rm.v_head.weight.shape


def test_same_command_again_skips_finished_stages(demo_run: Path):
    proc = run_cli("+experiment=demo", f"run.output_dir={demo_run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("sft", "rm", "ppo"):
        assert f"[{stage}] already done with this config: skipping" in proc.stdout


def test_changed_stage_config_reruns_it_and_the_stages_after(demo_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    proc = run_cli("+experiment=demo", f"run.output_dir={run}", "stage.rm.num_train_epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[sft] already done" in proc.stdout
    assert "[rm] config changed since it finished: running rm again, and the stages after it" in proc.stdout
    assert "[ppo] config changed since it finished" in proc.stdout


def test_frozen_model_offload_keeps_the_ppo_hash_and_ema_changes_it():
    """Offloading the frozen models computes the same numbers, so a run resumes across that switch;
    EMA settings shape the result."""
    from pipeline.config import load_config
    from pipeline.runner import stage_hash

    cfg = load_config({"model": {"actor": "tiny-opt", "reward": "tiny-opt"}})
    before = {stage: stage_hash(cfg, stage) for stage in ("sft", "rm", "ppo")}
    cfg.stage.ppo.offload_reference_model = cfg.stage.ppo.offload_reward_model = True
    assert {stage: stage_hash(cfg, stage) for stage in ("sft", "rm", "ppo")} == before
    cfg.stage.ppo.enable_ema = True
    assert stage_hash(cfg, "ppo") != before["ppo"] and stage_hash(cfg, "rm") == before["rm"]


def test_ppo_alone_needs_a_reward_model(tmp_path: Path):
    """Without rm in the run, PPO scores with model.reward, which must be a reward model."""
    proc = run_cli("+experiment=demo", f"run.output_dir={tmp_path}/run", "run.stages=[ppo]")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "reward model" in last and "Traceback" not in proc.stderr


def test_ppo_alone_from_given_checkpoints(demo_run: Path, tmp_path: Path):
    """DeepSpeed-Chat's step 3 alone: PPO from an actor and a reward model given by path, sized by the
    plan from their config.json, their origin recorded in the run folder."""
    out = tmp_path / "step3"
    proc = run_cli("+experiment=demo", f"run.output_dir={out}", "run.stages=[ppo]", "stage.ppo.max_steps=3",
                   f"model.actor={demo_run / 'sft' / 'final'}", f"model.reward={demo_run / 'rm' / 'final'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[ppo] actor from model.actor={demo_run / 'sft' / 'final'} (given)" in proc.stdout
    inputs = json.loads((out / "ppo" / "inputs.json").read_text())
    assert inputs["actor"]["path"] == str(demo_run / "sft" / "final") and inputs["actor"]["stage"] is None
    assert inputs["reward"]["key"] == "model.reward"
    plan = json.loads((out / "plan.json").read_text())
    actor = next(r for r in plan["stages"]["ppo"]["roles"] if r["role"] == "actor")
    demo_actor = AutoModelForCausalLM.from_pretrained(demo_run / "sft" / "final")
    assert actor["params"] == sum(p.numel() for p in demo_actor.parameters())
    assert json.loads((out / "results.json").read_text())["ppo"]["steps"] == 3
    # The same command again: done, as for any stage.
    again = run_cli("+experiment=demo", f"run.output_dir={out}", "run.stages=[ppo]", "stage.ppo.max_steps=3",
                    f"model.actor={demo_run / 'sft' / 'final'}", f"model.reward={demo_run / 'rm' / 'final'}")
    assert again.returncode == 0 and "[ppo] already done with this config" in again.stdout


def test_real_hh_rlhf_with_opt_tokenizer(shared_data: Path, tmp_path: Path):
    data = shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    tokenizer = shared_data / "tokenizers" / "opt"
    out = tmp_path / "hh"
    proc = run_cli("+experiment=demo", "data_blend=hh-rlhf", f"data_blend.path={data}", f"model.tokenizer={tokenizer}",
                   f"run.output_dir={out}", "data_blend.max_prompt_len=128", "data_blend.max_answer_len=64",
                   "stage.sft.max_steps=12", "stage.rm.max_steps=12", "stage.ppo.max_steps=3",
                   "stage.sft.per_device_train_batch_size=8", "stage.rm.per_device_train_batch_size=8",
                   "stage.ppo.per_device_generation_batch_size=8", "stage.ppo.per_device_training_batch_size=8",
                   "stage.ppo.gold_check.every_steps=0")  # no ground truth in hh-rlhf: the demo's gold check is off
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"sft", "rm", "ppo"}
    assert results["sft"]["eval_loss_after"] < results["sft"]["eval_loss_before"]
    # A 2-layer random-init model cannot learn human preference from 700 pairs; report, don't assert.
    print(f"hh-rlhf helpful-base RM held-out accuracy: {results['rm']['accuracy_after']:.3f}")
    assert 0.0 <= results["rm"]["accuracy_after"] <= 1.0
    actor = AutoModelForCausalLM.from_pretrained(out / "ppo" / "final" / "actor")
    assert actor.get_input_embeddings().weight.shape[0] >= 50265  # grown to the OPT tokenizer
