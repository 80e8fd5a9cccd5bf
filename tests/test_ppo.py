"""PPO in full on CPU with tiny models: ZeRO 0-3, LoRA, EMA, PTX, the rollout engine, throughput.

One tiny SFT + RM run is made once per session; each PPO variant runs in a copy of it
(`run.stages=[ppo]`), so only stage.ppo.* differs between variants. Tolerances, CPU fp32:
  ZeRO-2 vs ZeRO-3 (and 0, 1) losses per step: rtol 1e-4, atol 1e-6
  EMA vs the hand-computed average: atol 1e-6
  ZeRO-3 rollout vs the gathered plain model, greedy: identical tokens
  log-probs taken while decoding vs a full forward: fp32 atol 1e-5; bf16 max 0.01, mean 1e-3
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import merge, record_gathers, stage_config

from pipeline.config import ConfigError, GenerationSection, load_config
from pipeline.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
PTX_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6
EMA_ATOL = 1e-6
STEP_KEYS = ("reward", "kl", "entropy", "clip_frac", "approx_kl", "value_error", "answer_length", "actor_loss",
             "critic_loss", "kl_coef", "generation_s", "experience_s", "training_s", "other_s", "step_s", "samples_per_s",
             "tflops")
PHASES = ("generation_s", "experience_s", "training_s", "other_s")


BASE = {
    "run": {"name": "tiny", "dtype": "fp32", "log_interval": 1, "seed": 1234},
    "model": {"actor": "tiny-opt", "reward": "tiny-opt", "tokenizer": "builtin"},
    "data_blend": {"name": "builtin", "datasets": [{"name": "builtin", "max_records": 400}], "split": "2,4,4",
                   "max_prompt_len": 32, "max_answer_len": 24,
                   "ptx_path": str(PTX_TEXT) if PTX_TEXT.is_file() else None, "ptx_max_blocks": 64},
    "hardware": {"name": "cpu", "device": "cpu"},
    "stage": {
        "sft": {"per_device_train_batch_size": 8, "max_steps": 3, "optim": {"learning_rate": 2e-3}},
        "rm": {"per_device_train_batch_size": 8, "max_steps": 3, "optim": {"learning_rate": 1e-3}},
        # unsup_coef 0 = no PTX (data_blend.ptx_path is set for every variant: it is part of the SFT/RM hash)
        "ppo": {"per_device_generation_batch_size": 4, "per_device_training_batch_size": 4, "max_steps": 2,
                "unsup_coef": 0.0, "generation": {"max_new_tokens": 8},
                "actor": {"optim": {"learning_rate": 1e-3, "num_warmup_steps": 0}},
                "critic": {"optim": {"learning_rate": 1e-3, "num_warmup_steps": 0}}},
    },
}


def config(out: Path, stages: list[str], **ppo) -> dict:
    return stage_config(BASE, out, stages, "ppo", ppo)


def zero(stage: int, actor: dict | None = None, critic: dict | None = None, **strategy) -> dict:
    """stage.ppo.actor / critic settings: ZeRO `stage` (and `strategy`) for both, plus each one's own."""
    layout = {"strategy": {"zero_stage": stage, **strategy}}
    return {"actor": merge(layout, actor or {}), "critic": merge(layout, critic or {})}


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """SFT and RM, tiny, once per session."""
    out = tmp_path_factory.mktemp("ppo_base") / "run"
    run_pipeline(load_config(config(out, ["sft", "rm"])))
    return out


_RUNS: dict[str, tuple[dict, list[dict], Path]] = {}


def run_ppo(base_run: Path, tmp_root: Path, name: str, **ppo) -> tuple[dict, list[dict], Path]:
    """PPO alone in a copy of the base run; (result, train metrics rows, ppo dir). Cached by name."""
    if name not in _RUNS:
        out = tmp_root / name
        shutil.copytree(base_run, out)
        result = run_pipeline(load_config(config(out, ["ppo"], **ppo)))["ppo"]
        rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
        _RUNS[name] = (result, [r for r in rows if r["split"] == "train"], out / "ppo")
    return _RUNS[name]


@pytest.fixture(scope="session")
def ppo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ppo_runs")


def check_outputs(base_run: Path, ppo_dir: Path, rows: list[dict], steps: int) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.models import RewardModel

    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        for key in STEP_KEYS:
            assert math.isfinite(row[key]), (key, row)
        assert row["tflops"] > 0 and row["answer_length"] >= 1
        # The phases tile the step: other_s is what the three leave (logging, batching, the KL controller).
        assert all(row[key] >= 0 for key in PHASES), row
        assert sum(row[key] for key in PHASES) == pytest.approx(row["step_s"], rel=1e-6)
    actor = load_file(ppo_dir / "final" / "actor" / "model.safetensors")
    start = load_file(base_run / "sft" / "final" / "model.safetensors")
    assert not [k for k in actor if "lora" in k or "base_layer" in k]  # adapters merged on save
    assert set(actor) == set(start)
    assert max(float((actor[k] - start[k]).abs().max()) for k in actor) > 0  # it trained
    AutoModelForCausalLM.from_pretrained(ppo_dir / "final" / "actor")
    RewardModel.from_pretrained(ppo_dir / "final" / "critic")


# ---------------------------------------------------------------------- ZeRO stages, LoRA, mixed features


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ppo_zero_stage(base_run, ppo_root, stage):
    _, rows, ppo_dir = run_ppo(base_run, ppo_root, f"zero{stage}", **zero(stage))
    check_outputs(base_run, ppo_dir, rows, 2)


def test_sft_and_rm_under_zero3_match_zero0(base_run, tmp_path):
    """Steps 1 and 2 with their models built under ZeRO-3 (partitioned from the start): the same
    per-step losses as the base run's ZeRO-0 (rtol 1e-4)."""
    out = tmp_path / "zero3"
    cfg = config(out, ["sft", "rm"])
    for stage in ("sft", "rm"):
        cfg["stage"][stage] = merge(cfg["stage"][stage], {"strategy": {"zero_stage": 3}})
    run_pipeline(load_config(cfg))
    for stage, key in (("sft", "loss"), ("rm", "loss")):
        rows = {}
        for run in (base_run, out):
            lines = (run / stage / "metrics.jsonl").read_text().splitlines()
            rows[run] = [json.loads(line)[key] for line in lines if json.loads(line)["split"] == "train"]
        assert len(rows[out]) == 3
        assert rows[out] == pytest.approx(rows[base_run], rel=LOSS_RTOL, abs=LOSS_ATOL), stage


@pytest.mark.parametrize("stage", [0, 3])
def test_ppo_lora(base_run, ppo_root, stage):
    lora = {"dim": 4, "target_modules": ["q_proj", "v_proj", "fc1"], "learning_rate": 1e-3, "only_optimize_lora": True}
    _, rows, ppo_dir = run_ppo(base_run, ppo_root, f"lora{stage}", **zero(stage, actor={"lora": lora}, critic={"lora": lora}),
                               enable_ema=True, ema_beta=0.5)
    check_outputs(base_run, ppo_dir, rows, 2)
    # The EMA averages the adapters only; saved merged, like the actor: it moved, less than the actor,
    # and only where the adapters act.
    from safetensors.torch import load_file

    ema = load_file(ppo_dir / "final" / "actor_ema" / "model.safetensors")
    actor = load_file(ppo_dir / "final" / "actor" / "model.safetensors")
    start = load_file(base_run / "sft" / "final" / "model.safetensors")
    assert set(ema) == set(start)
    moved = {k: float((ema[k] - start[k]).abs().max()) for k in ema}
    assert {k for k, v in moved.items() if v > 0} == {k for k in actor if not torch.equal(actor[k], start[k])}
    assert all(k.endswith(("q_proj.weight", "v_proj.weight", "fc1.weight")) for k, v in moved.items() if v > 0)
    assert 0 < max(moved.values()) < max(float((actor[k] - start[k]).abs().max()) for k in actor)


def test_zero2_equals_zero3(base_run, ppo_root):
    """Same seed, same data: ZeRO-2 and ZeRO-3 give the same losses (rtol 1e-4, CPU fp32)."""
    _, rows2, _ = run_ppo(base_run, ppo_root, "zero2", **zero(2))
    _, rows3, _ = run_ppo(base_run, ppo_root, "zero3", **zero(3))
    for r2, r3 in zip(rows2, rows3, strict=True):
        for key in ("actor_loss", "critic_loss", "reward", "kl", "value_error", "answer_length"):
            assert r2[key] == pytest.approx(r3[key], rel=LOSS_RTOL, abs=LOSS_ATOL), (key, r2[key], r3[key])


@pytest.mark.skipif(not PTX_TEXT.is_file(), reason=f"{PTX_TEXT} is not here")
def test_ppo_ema_ptx_adaptive_kl(base_run, ppo_root, capsys):
    """EMA + PTX (tinyshakespeare) + adaptive KL + reward normalisation + advantage whitening, ZeRO-2."""
    _, rows, ppo_dir = run_ppo(base_run, ppo_root, "mixed", **zero(2), enable_ema=True, unsup_coef=1.0,
                               kl_target=0.01, kl_horizon=100, normalize_reward=True, whiten_advantages=True, max_steps=3)
    check_outputs(base_run, ppo_dir, rows, 3)
    assert all(math.isfinite(r["ptx_loss"]) and r["ptx_loss"] > 0 for r in rows)
    assert rows[-1]["kl_coef"] != pytest.approx(0.1, abs=1e-9)  # the adaptive controller moved it from kl_ctl
    from safetensors.torch import load_file

    ema = load_file(ppo_dir / "final" / "actor_ema" / "model.safetensors")
    actor = load_file(ppo_dir / "final" / "actor" / "model.safetensors")
    start = load_file(ppo_dir.parent / "sft" / "final" / "model.safetensors")
    # beta 0.992 over 3 updates: the EMA moved from the start, far less than the actor did
    moved = max(float((ema[k] - start[k]).abs().max()) for k in ema)
    assert 0 < moved < max(float((actor[k] - start[k]).abs().max()) for k in actor)
    out = capsys.readouterr().out
    assert "End-to-End" in out and "Experience forwards" in out and "TFLOPs" in out


# ---------------------------------------------------------------------- API level: rollout engine, EMA


def make_engine(base_run: Path, tmp_path: Path, dtype: str = "fp32", **ppo):
    from pipeline.dist import init_distributed
    from pipeline.models import load_tokenizer
    from pipeline.rlhf import PPOTrainer, RLHFEngine

    cfg = load_config(config(tmp_path / "api", ["ppo"], **ppo))
    cfg.run.dtype = dtype
    init_distributed(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_source, base_run)
    torch.manual_seed(0)
    engine = RLHFEngine(actor_model_name_or_path=base_run / "sft" / "final", critic_model_name_or_path=base_run / "rm" / "final",
                        tokenizer=tokenizer, num_total_iters=10, args=cfg)
    return cfg, engine, PPOTrainer(engine=engine, args=cfg)


def prompts(base_run: Path, cfg, tokenizer, n: int = 4) -> dict:
    from pipeline.data import load_stage_data
    from pipeline.data.collate import collate_prompts

    cfg = copy.deepcopy(cfg)
    cfg.run.output_dir = str(base_run)  # its data cache
    data = load_stage_data(cfg, "ppo", tokenizer)
    return collate_prompts([data.train[i] for i in range(n)], tokenizer.pad_token_id)


def gathered_copy(engine_module, base_run: Path, tokenizer):
    """A plain (unsharded) model holding the ZeRO-3 actor's current weights."""
    from pipeline.engine import gathered_params
    from pipeline.models import load_causal_lm

    plain = load_causal_lm(str(base_run / "sft" / "final"), tokenizer).eval()
    with torch.no_grad(), gathered_params(engine_module):
        for dst, src in zip(plain.parameters(), engine_module.parameters(), strict=True):
            dst.copy_(src.detach())
    return plain


def snapshot(module) -> list[torch.Tensor]:
    from pipeline.engine import gathered_params

    with gathered_params(module):
        return [p.detach().clone() for p in module.parameters()]


def count_zero3_fetches(monkeypatch) -> list:
    """A list that grows by one per ZeRO-3 per-module parameter fetch from now on."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    fetches = []
    real = PartitionedParameterCoordinator.fetch_sub_module

    def counting(self, *args, **kw):
        fetches.append(1)
        return real(self, *args, **kw)

    monkeypatch.setattr(PartitionedParameterCoordinator, "fetch_sub_module", counting)
    return fetches


def test_zero3_rollout_and_ema(base_run, tmp_path, monkeypatch):
    """Under ZeRO-3: greedy rollout tokens equal the gathered plain model's; ZeRO-3 hooks are
    off while generating (no per-module fetch, so nothing per token);
    after two PPO updates the EMA equals beta^2 a0 + beta (1 - beta) a1 + (1 - beta) a2."""
    from pipeline.engine import unwrap

    beta = 0.9
    cfg, engine, trainer = make_engine(base_run, tmp_path, **zero(3), enable_ema=True, ema_beta=beta)
    actor = unwrap(engine.actor)
    batch = prompts(base_run, cfg, engine.tokenizer)
    history = [snapshot(actor)]
    for _ in range(2):
        exp = trainer.generate_experience(batch)
        trainer.train_rlhf(exp)
        trainer.update_ema()
        history.append(snapshot(actor))
    a0, a1, a2 = history
    for ema_param, p0, p1, p2 in zip(engine.ema.full_values(), a0, a1, a2, strict=True):
        expected = beta**2 * p0 + beta * (1 - beta) * p1 + (1 - beta) * p2
        torch.testing.assert_close(ema_param, expected, atol=EMA_ATOL, rtol=0)
    assert any(not torch.equal(p0, p2) for p0, p2 in zip(a0, a2))
    # ZeRO-3: the EMA holds this rank's partitions (here, one rank: whole but flat and padded)
    assert all(value.dim() == 1 for value in engine.ema.values)

    plain = gathered_copy(actor, base_run, engine.tokenizer)
    kwargs = trainer.rollout.sampling_kwargs(do_sample=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expected = plain.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = trainer.rollout.generate(ids, mask, do_sample=False)
    assert torch.equal(got, expected)
    assert actor.training  # back in the training layout

    # ZeRO-3's per-module fetch hook would run for every module at every token (28 per token here);
    # the rollout engine gathers once and takes the hooks off, so it must not run at all.
    fetches = count_zero3_fetches(monkeypatch)
    for tokens in (2, 8):
        trainer.rollout.gen.max_new_tokens = tokens
        trainer.rollout.generate(ids, mask, do_sample=False)
    assert not fetches, f"{len(fetches)} per-module ZeRO-3 fetches during generation"

    exp = trainer.generate_experience(batch)  # hooks restored: training still works
    a_loss, c_loss = trainer.train_rlhf(exp)
    assert torch.isfinite(a_loss) and torch.isfinite(c_loss)


def test_ema_of_a_bf16_actor_is_the_fp32_average(base_run, tmp_path):
    """bf16 training, default beta 0.992: after two updates the EMA equals the average computed in
    fp32 from the actor's bf16 weights (atol 1e-6). An EMA kept in bf16 could not: its rounding step
    near these weights is ~1e-4, larger than most (1 - beta) x change."""
    from pipeline.engine import unwrap

    cfg, engine, trainer = make_engine(base_run, tmp_path, dtype="bf16", **zero(2), enable_ema=True)
    beta = cfg.stage.ppo.ema_beta
    assert beta == 0.992
    actor = unwrap(engine.actor)
    assert {p.dtype for p in actor.parameters()} == {torch.bfloat16}
    assert {value.dtype for value in engine.ema.values} == {torch.float32}
    batch = prompts(base_run, cfg, engine.tokenizer)
    history = [[p.float() for p in snapshot(actor)]]
    for _ in range(2):
        trainer.train_rlhf(trainer.generate_experience(batch))
        trainer.update_ema()
        history.append([p.float() for p in snapshot(actor)])
    a0, a1, a2 = history
    moved = 0.0
    for ema_param, p0, p1, p2 in zip(engine.ema.full_values(), a0, a1, a2, strict=True):
        expected = beta**2 * p0 + beta * (1 - beta) * p1 + (1 - beta) * p2
        torch.testing.assert_close(ema_param, expected, atol=EMA_ATOL, rtol=0)
        moved = max(moved, float((ema_param - p0).abs().max()))
    assert moved > 0


def test_save_hf_gathers_one_module_at_a_time_and_merges_lora_like_peft(base_run, tmp_path, monkeypatch):
    """Saving a ZeRO-3 LoRA actor: the file equals peft's merge_and_unload of the gathered model,
    no gather holds more than one module's parameters (a whole-model gather would not fit a large
    model on one GPU), and neither that save nor the EMA's changes the actor."""
    from safetensors.torch import load_file

    from pipeline.engine import gathered_params, unwrap
    from pipeline.export import save_hf

    lora = {"dim": 4, "target_modules": ["q_proj", "v_proj", "fc1"], "learning_rate": 1e-2, "only_optimize_lora": True}
    cfg, engine, trainer = make_engine(base_run, tmp_path, **zero(3, actor={"lora": lora}), enable_ema=True, ema_beta=0.5)
    trainer.train_rlhf(trainer.generate_experience(prompts(base_run, cfg, engine.tokenizer)))
    trainer.update_ema()
    actor = unwrap(engine.actor)
    before = snapshot(actor)
    with gathered_params(actor):
        reference = {k: v.clone() for k, v in copy.deepcopy(actor).merge_and_unload().state_dict().items()}

    sizes = record_gathers(monkeypatch)
    save_hf(engine.actor, tmp_path / "actor", engine.tokenizer)
    assert sizes and max(sizes) <= 4 < len(list(actor.parameters()))  # a LoRA layer: weight, bias, A, B
    saved = load_file(tmp_path / "actor" / "model.safetensors")
    assert set(saved) == set(reference) - {"lm_head.weight"}  # OPT ties it to the embedding
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    assert any(not torch.equal(saved[k], load_file(base_run / "sft" / "final" / "model.safetensors")[k]) for k in saved)
    engine.ema.save(tmp_path / "ema", engine.tokenizer)
    ema = load_file(tmp_path / "ema" / "model.safetensors")
    assert any(not torch.equal(ema[k], saved[k]) for k in saved)  # the average, not the actor
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(actor), strict=True))


def test_save_hf_refuses_lora_layouts_it_cannot_merge(tmp_path):
    """DoRA, lora_bias or modules_to_save need more than peft's get_delta_weight: refused by name, not written wrong."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    from pipeline.export import save_hf

    for extra, why in (({"use_dora": True}, r"q_proj: cannot write a LoRA layer with a LoRA variant"),
                       ({"lora_bias": True}, r"q_proj: cannot write a LoRA layer with lora_bias"),
                       ({"modules_to_save": ["fc1"]}, r"fc1: peft modules_to_save wrappers are not written")):
        model = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                         vocab_size=64, word_embed_proj_dim=16))
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], **extra))
        with pytest.raises(ValueError, match=why):
            save_hf(peft_model, tmp_path / "out", tokenizer=None)
        assert not (tmp_path / "out").exists()


def test_zero3_lora_in_bf16_keeps_one_dtype(base_run, tmp_path):
    """Under ZeRO-3 the models are built under zero.Init, where DeepSpeed does not cast parameters:
    peft's adapters (fp32 by default) are cast to bf16 with the base, also when the base trains too
    (only_optimize_lora=false: one optimizer over both), and a PPO update with EMA runs."""
    from pipeline.engine import unwrap

    lora = {"dim": 4, "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-3, "only_optimize_lora": False}
    cfg, engine, trainer = make_engine(base_run, tmp_path, dtype="bf16", **zero(3, actor={"lora": lora}, critic={"lora": lora}),
                                       enable_ema=True)
    for model in (engine.actor, engine.critic):
        dtypes = {p.dtype for p in unwrap(model).parameters()}
        assert dtypes == {torch.bfloat16}, dtypes
        assert any("lora_" in name for name, _ in unwrap(model).named_parameters())
    a_loss, c_loss = trainer.train_rlhf(trainer.generate_experience(prompts(base_run, cfg, engine.tokenizer)))
    trainer.update_ema()
    assert torch.isfinite(a_loss) and torch.isfinite(c_loss)
    assert len(engine.ema.values) == sum(1 for p in unwrap(engine.actor).parameters() if p.requires_grad)


def test_offloaded_frozen_models_score_like_plain_ones(base_run, tmp_path):
    """offload_reference_model / offload_reward_model under a ZeRO-0 actor and critic: the frozen
    models become ZeRO-3 inference engines with their weights offloaded, the EMA lives in host RAM
    in fp32, and the first experience batch scores as plain models do: the reference log-probs equal
    the (still identical) actor's, the reward scores a plain copy of rm/final's."""
    from deepspeed import DeepSpeedEngine

    from pipeline.models import RewardModel
    from pipeline.rl_math import last_index

    cfg, engine, trainer = make_engine(base_run, tmp_path, **zero(0), offload_reference_model=True,
                                       offload_reward_model=True, enable_ema=True)
    for frozen in (engine.ref, engine.reward):
        assert isinstance(frozen, DeepSpeedEngine) and frozen.zero_optimization_stage() == 3
        assert frozen.zero_offload_param().device == "cpu"
        assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in frozen.module.parameters() if p.ds_numel > 1e4)
    assert engine.actor.zero_optimization_stage() == 0
    assert {(value.dtype, value.device.type) for value in engine.ema.values} == {(torch.float32, "cpu")}

    exp = trainer.generate_experience(prompts(base_run, cfg, engine.tokenizer))
    assert exp.answer_mask.sum() > 0
    torch.testing.assert_close(exp.ref_logprobs, exp.logprobs, atol=1e-5, rtol=0)
    plain = RewardModel.from_pretrained(base_run / "rm" / "final", "fp32", None).eval()
    with torch.no_grad():
        values = plain(exp.seq, exp.attention_mask, exp.position_ids)
    rows = torch.arange(values.shape[0])
    expected = values[rows, exp.prompt_len + last_index(exp.answer_mask)]
    torch.testing.assert_close(exp.scores, expected, atol=1e-5, rtol=0)
    a_loss, c_loss = trainer.train_rlhf(exp)
    assert torch.isfinite(a_loss) and torch.isfinite(c_loss)


def test_zero3_models_are_built_straight_into_their_partitions(base_run, tmp_path):
    """Under zero3_construction transformers builds the model under deepspeed.zero.Init: no weight
    is ever whole outside a gather (DeepSpeed would otherwise move the whole model to the device
    before partitioning it), the vocabulary is kept, and gathered weights equal the file's."""
    from pipeline.config import StrategySection
    from pipeline.dist import init_distributed
    from pipeline.engine import gathered_params, zero3_construction
    from pipeline.models import load_causal_lm, load_tokenizer

    cfg = load_config(config(tmp_path / "api", ["ppo"]))
    init_distributed(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_source, base_run)
    source = str(base_run / "sft" / "final")
    with zero3_construction(cfg, StrategySection(zero_stage=3, offload=True)):
        model = load_causal_lm(source, tokenizer)
    plain = load_causal_lm(source, tokenizer)  # outside: plain again
    assert not any(hasattr(p, "ds_id") for p in plain.parameters())
    assert all(hasattr(p, "ds_id") for p in model.parameters())
    large = [p for p in model.parameters() if p.ds_numel > 1e4]  # below that DeepSpeed keeps them whole
    assert large and all(p.numel() == 0 for p in large)
    assert model.get_input_embeddings().weight.ds_shape == plain.get_input_embeddings().weight.shape
    with gathered_params(model):
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            assert torch.equal(p.detach(), q.detach())


def test_zero3_generation_module_by_module_gives_the_gathered_tokens(base_run, tmp_path, monkeypatch):
    """generation.gather_weights=false (an actor too large to gather): DeepSpeed fetches modules
    at every decode step, and greedy tokens equal those of the gathered model."""
    from pipeline.engine import unwrap

    cfg, engine, trainer = make_engine(base_run, tmp_path, **zero(3),
                                       generation={"max_new_tokens": 8, "gather_weights": False})
    assert trainer.rollout.per_module
    batch = prompts(base_run, cfg, engine.tokenizer)
    expected = gathered_copy(unwrap(engine.actor), base_run, engine.tokenizer).generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **trainer.rollout.sampling_kwargs(do_sample=False))
    fetches = count_zero3_fetches(monkeypatch)
    got = trainer.rollout.generate(batch["input_ids"], batch["attention_mask"], do_sample=False)
    assert torch.equal(got, expected)
    assert len(fetches) >= 8 * 20  # every module, every step (28 modules here)
    with pytest.raises(ConfigError, match="merge_lora=True needs the actor.s weights gathered"):
        load_config(config(tmp_path / "x", ["ppo"], generation={"merge_lora": True, "gather_weights": False}))


def test_zero3_lora_merge_for_generation(base_run, tmp_path):
    """LoRA merged for generation gives the same greedy tokens as unmerged, and the weights are
    restored exactly afterwards."""
    from pipeline.engine import unwrap
    from pipeline.rollout import RolloutEngine

    lora = {"dim": 4, "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-2}
    cfg, engine, trainer = make_engine(base_run, tmp_path, **zero(3, actor={"lora": lora}))
    batch = prompts(base_run, cfg, engine.tokenizer)
    trainer.train_rlhf(trainer.generate_experience(batch))  # LoRA B is no longer zero
    actor = unwrap(engine.actor)
    before = snapshot(actor)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    unmerged = RolloutEngine(engine.actor, engine.tokenizer, cfg.stage.ppo.generation, merge_lora=False)
    merged = RolloutEngine(engine.actor, engine.tokenizer, cfg.stage.ppo.generation, merge_lora=True)
    assert torch.equal(unmerged.generate(ids, mask, do_sample=False), merged.generate(ids, mask, do_sample=False))
    for b, a in zip(before, snapshot(actor), strict=True):
        assert torch.equal(a, b)


def test_rollout_progress_bar_counts_decode_steps(base_run, tmp_path, monkeypatch):
    """With the bar on, generation gives the same tokens and the bar counts one tick per decode step."""
    from pipeline import rollout as rollout_module

    monkeypatch.setenv("PIPELINE_PROGRESS", "1")
    cfg, engine, trainer = make_engine(base_run, tmp_path)
    batch = prompts(base_run, cfg, engine.tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ticks = []
    real_end = rollout_module.DecodeProgress.end
    monkeypatch.setattr(rollout_module.DecodeProgress, "end", lambda self: (ticks.append(self.bar.n), real_end(self)))
    silent = rollout_module.RolloutEngine(engine.actor, engine.tokenizer, cfg.stage.ppo.generation, show_progress=False)
    shown = rollout_module.RolloutEngine(engine.actor, engine.tokenizer, cfg.stage.ppo.generation, show_progress=True)
    silent.gen.max_new_tokens = 6
    expected = silent.generate(ids, mask, do_sample=False)
    assert not ticks
    got = shown.generate(ids, mask, do_sample=False)
    assert torch.equal(got, expected)
    assert ticks == [got.shape[1] - ids.shape[1]] and 1 <= ticks[0] <= 6


def test_static_kv_cache_generates_the_same_tokens_under_zero3(base_run, tmp_path):
    """generation.cache=static (preallocated KV cache; compiled decode step on CUDA) gives the
    dynamic cache's greedy tokens, call after call with different prompt lengths."""
    from pipeline.rollout import RolloutEngine

    cfg, engine, trainer = make_engine(base_run, tmp_path, **zero(3))
    batch = prompts(base_run, cfg, engine.tokenizer, n=6)
    gen = copy.deepcopy(cfg.stage.ppo.generation)
    gen.cache = "static"
    static = RolloutEngine(engine.actor, engine.tokenizer, gen, show_progress=False)
    dynamic = RolloutEngine(engine.actor, engine.tokenizer, cfg.stage.ppo.generation, show_progress=False)
    assert static.sampling_kwargs(False)["cache_implementation"] == "static"
    assert "cache_implementation" not in dynamic.sampling_kwargs(False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] > 4
    for cut in (0, 2, 4):  # a shorter prompt length each call (the left columns dropped)
        sub_ids, sub_mask = ids[:, cut:], mask[:, cut:]
        assert torch.equal(static.generate(sub_ids, sub_mask, do_sample=False),
                           dynamic.generate(sub_ids, sub_mask, do_sample=False))


def test_generation_layout_turns_checkpointing_off_and_back_without_leaking_hooks(base_run, tmp_path):
    """LoRA actor with gradient checkpointing: off inside the generation layout, on again after,
    and no hook piles up call after call (the model-level enable adds an input-grad hook each time)."""
    from pipeline.engine import activation_checkpointing, unwrap

    strategy = {"zero_stage": 0, "gradient_checkpointing": True}
    lora = {"dim": 4, "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-2}
    cfg, engine, trainer = make_engine(base_run, tmp_path, actor={"strategy": strategy, "lora": lora})
    actor = unwrap(engine.actor)
    embeddings = actor.get_input_embeddings()
    hooks = len(embeddings._forward_hooks)
    assert activation_checkpointing(actor) and actor.training
    batch = prompts(base_run, cfg, engine.tokenizer)
    for _ in range(3):
        with trainer.rollout.generation_layout() as module:
            assert not activation_checkpointing(module) and not module.training
        trainer.train_rlhf(trainer.generate_experience(batch))
    assert activation_checkpointing(actor) and actor.training
    assert len(embeddings._forward_hooks) == hooks


def test_activation_checkpointing_switches_without_deprecation_warnings(base_run):
    """On and off for the actor (plain and with peft LoRA) and the reward model, through the names
    transformers 5 keeps (the gradient_checkpointing_* aliases warn and go away in v6)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.engine import activation_checkpointing, set_activation_checkpointing
    from pipeline.models import RewardModel

    actor = AutoModelForCausalLM.from_pretrained(base_run / "sft" / "final")
    critic = RewardModel.from_pretrained(base_run / "rm" / "final")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base_run / "sft" / "final"),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for model in (actor, critic, lora):
            assert not activation_checkpointing(model)
            set_activation_checkpointing(model, True)
            assert activation_checkpointing(model)
            set_activation_checkpointing(model, False)
            assert not activation_checkpointing(model)


def test_steps_tile_the_stage_loop(base_run, ppo_root):
    """step_s of successive steps add up to the loop's own time: no time falls between steps (each
    step's span starts where the previous one's ended), and every phase lies inside its step."""
    _, rows, ppo_dir = run_ppo(base_run, ppo_root, "zero0", **zero(0))
    assert len(rows) == 2
    for row in rows:
        assert sum(row[key] for key in PHASES) == pytest.approx(row["step_s"], rel=1e-6)
        assert row["generation_s"] > 0 and row["experience_s"] > 0 and row["training_s"] > 0


def test_log_prob_time_is_counted_in_the_phase_that_computes_it(base_run, tmp_path, monkeypatch):
    """Slowing down each piece of log-prob work by a known delay moves exactly its phase: the actor's
    log-probs (taken while decoding) into generation_s, the reference's into experience_s; the two
    phases cover the whole generate_experience call."""
    import time

    import pipeline.rlhf as rlhf_module
    import pipeline.rollout as rollout_module

    cfg, engine, trainer = make_engine(base_run, tmp_path)
    batch = prompts(base_run, cfg, engine.tokenizer)
    delay, calls = 0.02, {"decode": 0, "ref": 0}

    def slowed(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            time.sleep(delay)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(rollout_module, "next_tokens", slowed("decode", rollout_module.next_tokens))
    monkeypatch.setattr(rlhf_module, "logprobs_of_labels", slowed("ref", rlhf_module.logprobs_of_labels))
    t0 = time.perf_counter()
    exp = trainer.generate_experience(batch)
    wall = time.perf_counter() - t0
    c = trainer.pop_counters()
    assert calls["decode"] == exp.answer.shape[1] and calls["ref"] == 1
    assert c["generation_s"] >= delay * calls["decode"]
    assert delay <= c["experience_s"] < delay * calls["decode"]
    assert c["generation_s"] + c["experience_s"] == pytest.approx(wall, rel=0.02)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logprobs_taken_while_decoding_equal_a_full_forward(base_run, tmp_path, dtype):
    """The actor's log-probs and entropies recorded while decoding equal a full forward's over the
    same prompt + answer (fp32: 1e-5; bf16: max 0.01, mean 1e-3: the cached decode step and the full
    forward round differently). At the first update the PPO ratio is then 1 up to that noise: no
    clipping, approx_kl ~ 0."""
    from pipeline.engine import unwrap
    from pipeline.rl_math import entropy_from_logits, logprobs_of_labels
    from pipeline.rlhf import answer_logits

    cfg, engine, trainer = make_engine(base_run, tmp_path, dtype=dtype, generation={"max_new_tokens": 12})
    exp = trainer.generate_experience(prompts(base_run, cfg, engine.tokenizer))
    actor = unwrap(engine.actor)
    actor.eval()
    with torch.no_grad():
        logits = answer_logits(engine.actor, exp.answer.shape[1], input_ids=exp.seq, attention_mask=exp.attention_mask,
                               position_ids=exp.position_ids)
        full = logprobs_of_labels(logits, exp.answer)
        entropy = entropy_from_logits(logits)
    actor.train()
    mask = exp.answer_mask.bool()
    assert mask.sum() >= 8 and exp.logprobs.dtype == exp.entropy.dtype == torch.float32
    assert torch.equal(exp.logprobs[~mask], torch.zeros_like(exp.logprobs[~mask]))
    diff = (exp.logprobs - full)[mask].abs()
    if dtype == "fp32":
        assert diff.max() < 1e-5 and (exp.entropy - entropy)[mask].abs().max() < 1e-4
    else:
        assert diff.max() < 0.01 and diff.mean() < 1e-3 and (exp.entropy - entropy)[mask].abs().max() < 0.01
    trainer.train_rlhf(exp)
    assert trainer.last_stats["clip_frac"] == 0.0
    assert trainer.last_stats["approx_kl"] < (1e-10 if dtype == "fp32" else 1e-5)


def test_checking_for_the_end_every_few_steps_gives_the_same_rollout(base_run, tmp_path, monkeypatch):
    """On a GPU the loop looks at whether every row has ended only every few steps (each look waits
    for the device); the steps run past the last eos are cut off: the same tokens, log-probs and
    entropies as checking at every step. The rows are made to end at steps 2, 4, 7 and 8 (the tiny
    model rarely samples its eos): 9 steps, or 10 when looking every 5th."""
    import pipeline.rollout as rollout_module

    cfg, engine, trainer = make_engine(base_run, tmp_path, generation={"max_new_tokens": 24})
    batch = prompts(base_run, cfg, engine.tokenizer)
    eos, end_at, real = engine.tokenizer.eos_token_id, torch.tensor([2, 4, 7, 8]), rollout_module.next_tokens

    def ending(*args, **kwargs):
        tokens, logp, entropy = real(*args, **kwargs)
        step = calls.pop(0)
        return torch.where(end_at == step, eos, tokens), logp, entropy

    monkeypatch.setattr(rollout_module, "next_tokens", ending)
    rollouts = []
    for every in (1, 5):
        monkeypatch.setattr(rollout_module, "stop_check_steps", lambda device, every=every: every)
        calls = list(range(24))
        torch.manual_seed(11)
        rollouts.append(trainer.rollout.rollout(batch["input_ids"], batch["attention_mask"]))
        assert 24 - len(calls) == (9 if every == 1 else 10)  # decode steps run
    every_step, every_five = rollouts
    answer = every_step.seq[:, batch["input_ids"].shape[1]:]
    assert answer.shape[1] == 9 and (answer == eos).long().argmax(1).tolist() == [2, 4, 7, 8]
    for field in ("seq", "logprobs", "entropy"):
        assert torch.equal(getattr(every_five, field), getattr(every_step, field)), field


def test_greedy_decoding_from_the_config(base_run, tmp_path):
    """stage.ppo.generation.do_sample=false, or temperature=0, decodes greedily: transformers' greedy
    tokens, call after call; sampling with the same seed repeats its tokens and differs from greedy.
    Contradictory settings are refused in one line naming the keys."""
    from pipeline.engine import unwrap

    cfg, engine, trainer = make_engine(base_run, tmp_path, generation={"max_new_tokens": 10})
    batch = prompts(base_run, cfg, engine.tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    torch.manual_seed(7)
    sampled = trainer.rollout.generate(ids, mask)
    torch.manual_seed(7)
    assert torch.equal(trainer.rollout.generate(ids, mask), sampled)
    plain = unwrap(engine.actor)
    with torch.no_grad():
        expected = plain.generate(input_ids=ids, attention_mask=mask, **trainer.rollout.sampling_kwargs(do_sample=False))
    assert not torch.equal(sampled, expected)
    for generation in ({"do_sample": False}, {"temperature": 0.0}):
        greedy_cfg = load_config(config(tmp_path / "greedy", ["ppo"], generation={"max_new_tokens": 10, **generation}))
        assert greedy_cfg.stage.ppo.generation.greedy
        rollout = type(trainer.rollout)(engine.actor, engine.tokenizer, greedy_cfg.stage.ppo.generation, show_progress=False)
        assert not rollout.sampling_kwargs(do_sample=True)["do_sample"]
        for _ in range(2):
            assert torch.equal(rollout.generate(ids, mask), expected)
    for generation, culprit in (({"do_sample": False, "temperature": 0.7}, r"stage\.ppo\.generation\.temperature=0\.7 applies only when sampling"),
                                ({"temperature": 0.0, "top_p": 0.9}, r"stage\.ppo\.generation\.top_p=0\.9 applies only when sampling"),
                                ({"do_sample": False, "top_k": 5}, r"stage\.ppo\.generation\.top_k=5 applies only when sampling"),
                                ({"temperature": -1.0}, r"stage\.ppo\.generation\.temperature=-1\.0 must be >= 0")):
        with pytest.raises(ConfigError, match=culprit):
            load_config(config(tmp_path / "bad", ["ppo"], generation=generation))


# ---------------------------------------------------------------------- clear errors


def test_deepspeed_backend_is_refused_with_the_reason(tmp_path):
    """DeepSpeed's hybrid engine cannot run on transformers >= 4.50 (its kernels keep the tuple KV
    cache): refused at config time and through the Python API, before any model is loaded."""
    import transformers

    from pipeline.config import ConfigError
    from pipeline.rlhf import RLHFEngine
    from pipeline.rollout import BackendUnavailable, check_backend

    why = rf"stage\.ppo\.generation\.backend=deepspeed cannot run with transformers {re.escape(transformers.__version__)}.*backend=hf"
    with pytest.raises(ConfigError, match=why):
        load_config(config(Path("/tmp/unused"), ["ppo"], generation={"backend": "deepspeed"}))
    with pytest.raises(BackendUnavailable, match=why):
        check_backend(GenerationSection(backend="deepspeed"))
    cfg = load_config(config(tmp_path, ["ppo"]))
    cfg.stage.ppo.generation.backend = "deepspeed"  # an API user's RunConfig, never validated
    with pytest.raises(BackendUnavailable, match=why):
        RLHFEngine(actor_model_name_or_path="/nonexistent/actor", critic_model_name_or_path="/nonexistent/critic",
                   tokenizer=None, num_total_iters=1, args=cfg)


def test_offload_needs_zero():
    from pipeline.config import RoleSection, StrategySection
    from pipeline.engine import OffloadUnavailable, make_optimizer

    cfg = load_config(config(Path("/tmp/unused"), ["ppo"]))
    role = RoleSection(strategy=StrategySection(zero_stage=0, offload=True))
    with pytest.raises(OffloadUnavailable, match=r"stage\.ppo\.actor\.strategy\.offload=true needs stage\.ppo\.actor\.strategy\.zero_stage"):
        make_optimizer(cfg, torch.nn.Linear(2, 2), role, "stage.ppo.actor")


@pytest.mark.slow
def test_ppo_cpu_offload(base_run, ppo_root):
    """ZeRO-2 and ZeRO-3 with CPU offload (DeepSpeedCPUAdam; its op is JIT-built once, minutes)."""
    for stage in (2, 3):
        _, rows, ppo_dir = run_ppo(base_run, ppo_root, f"offload{stage}", **zero(stage, offload=True), enable_ema=True)
        check_outputs(base_run, ppo_dir, rows, 2)
