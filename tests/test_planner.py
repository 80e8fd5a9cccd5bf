"""Memory planner and hardware profiles: formulas, preferences, DeepSpeed-Chat's published fits."""

from __future__ import annotations

import copy
import dataclasses
import json
from functools import cache

import pytest
from omegaconf import OmegaConf

from pipeline import planner as P
from pipeline.catalog import CATALOG, resolve_model
from pipeline.config import HardwareSection, load_config
from pipeline.hardware import CONF_DIR, detect_hardware, gpu_profile, load_profile, profile_names

GB = 1e9
PROFILES = ["v100-32g", "a6000-48g", "a100-40g", "a100-80g", "h100-80g", "h200-141g", "cpu"]


def hw(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"))


@cache
def _base(profile: str, nodes: int, procs: int | None, dtype: str | None):
    d = {"model": {"actor": "opt-1.3b", "reward": "opt-350m"}, "hardware": hw(profile)}
    if procs is not None:
        d["deployment"] = {"launcher": "deepspeed", "nodes": nodes, "procs_per_node": procs}
    if dtype:
        d["run"] = {"dtype": dtype}
    return load_config(d)


def make(actor: str, profile: str, *, reward: str = "opt-350m", nodes: int = 1, procs: int | None = None,
         dtype: str | None = None, **stage):
    """A validated RunConfig (load_config is slow, so the base is cached and copied)."""
    cfg = copy.deepcopy(_base(profile, nodes, procs, dtype))
    cfg.model.actor, cfg.model.reward = actor, reward
    for dotted, value in stage.items():
        obj = cfg
        parts = dotted.split("__")
        for p in parts[:-1]:
            obj = getattr(obj, p)
        setattr(obj, parts[-1], value)
    return cfg


# ----------------------------------------------------------------------------- profiles


def test_profiles_exist_and_load():
    assert set(PROFILES) <= set(profile_names())
    assert (CONF_DIR / "auto.yaml").is_file()
    keys = {f.name for f in dataclasses.fields(HardwareSection)}
    for name in PROFILES:
        facts = hw(name)
        assert set(facts) == keys, name
        cfg = load_config({"hardware": facts})
        assert cfg.hardware.name == name and cfg.hardware.memory_gib > 0
    assert hw("v100-32g")["bf16"] is False and hw("a100-80g")["bf16"] is True


def test_detect_hardware_has_section_keys_and_validates():
    facts = detect_hardware()
    assert set(facts) == {f.name for f in dataclasses.fields(HardwareSection)}
    assert facts["name"].startswith("auto:")
    load_config({"hardware": facts})


def test_gpu_profile_known_and_unknown():
    a = gpu_profile("NVIDIA A100-SXM4-80GB", int(79.2 * 2**30), 8, 0, 108, 8)
    assert a["peak_tflops"] == load_profile("a100-80g")["peak_tflops"] and a["name"] == "auto:NVIDIA A100-SXM4-80GB"
    assert gpu_profile("NVIDIA A100-SXM4-40GB", int(39.4 * 2**30), 8, 0, 108, 1)["bandwidth_gbps"] == 1555
    u = gpu_profile("NVIDIA Mystery", 24 * 2**30, 8, 9, 128, 2)
    assert u["bf16"] and u["memory_gib"] == 24.0 and u["peak_tflops"] > 0 and u["devices_per_node"] == 2
    assert gpu_profile("Tesla V100-SXM2-32GB", 32 * 2**30, 7, 0, 80, 1)["bf16"] is False


# ----------------------------------------------------------------------------- formulas


def test_model_state_bytes_per_param():
    n = 10**9
    fp16 = P.trained_state_bytes(n, n, "fp16", 0, False, 1)
    assert (fp16["params"], fp16["grads"], fp16["optimizer"]) == (2 * GB, 2 * GB, 12 * GB)  # 16 B/param
    fp32 = P.trained_state_bytes(n, n, "fp32", 0, False, 1)
    assert (fp32["params"], fp32["grads"], fp32["optimizer"]) == (4 * GB, 4 * GB, 8 * GB)  # 16 B/param
    bf16 = P.trained_state_bytes(n, n, "bf16", 0, False, 1)
    assert bf16["grads"] == 6 * GB  # + fp32 gradient accumulator of BF16_Optimizer
    z1 = P.trained_state_bytes(n, n, "fp16", 1, False, 8)
    assert (z1["params"], z1["grads"], z1["optimizer"]) == (2 * GB, 2 * GB, 1.5 * GB)
    z2 = P.trained_state_bytes(n, n, "fp16", 2, False, 8)
    assert (z2["params"], z2["grads"], z2["optimizer"]) == (2 * GB, 0.25 * GB, 1.5 * GB)
    z3 = P.trained_state_bytes(n, n, "fp16", 3, False, 8)
    assert (z3["params"], z3["grads"], z3["optimizer"]) == (0.25 * GB, 0.25 * GB, 1.5 * GB)


def test_offload_and_lora_and_frozen():
    n = 10**9
    off2 = P.trained_state_bytes(n, n, "fp16", 2, True, 4)
    assert off2["optimizer"] == 0 and off2["grads"] == 0.5 * GB and off2["params"] == 2 * GB
    assert off2["host"] == 12 * GB / 4 + 4 * GB / 4  # Adam states + fp32 gradient partition
    off3 = P.trained_state_bytes(n, n, "fp16", 3, True, 4)
    assert off3["params"] == 0 and off3["host"] == 4 * GB + 0.5 * GB
    # LoRA: frozen base in fp16, adapters at 16 B/param
    adapters = P.lora_params(resolve_model("opt-1.3b"), 128)
    assert adapters == 128 * (10 * 2048 + 2 * 8192) * 24 == 113_246_208
    lo = P.trained_state_bytes(n + adapters, adapters, "fp16", 0, False, 1)
    assert lo["params"] == 2 * (n + adapters) and lo["grads"] == 2 * adapters and lo["optimizer"] == 12 * adapters
    assert P.lora_params(resolve_model("llama-2-70b"), 8) == 8 * (9 * 8192 + 2 * 1024 + 3 * 28672) * 80
    fz = P.frozen_state_bytes(n, "bf16", 3, False, 8)
    assert fz["params"] == 0.25 * GB and fz["grads"] == fz["optimizer"] == 0
    assert P.frozen_state_bytes(n, "bf16", 3, True, 8)["params"] == 0
    assert P.frozen_state_bytes(n, "bf16", 0, False, 8)["params"] == 2 * GB


def test_activation_formulas_match_korthikanti():
    """Korthikanti et al.'s layer is a GeLU MLP (a gpt2-family model of OPT-1.3b's shape here); OPT's
    ReLU keeps one f-wide tensor less (measured with saved-tensor hooks: bench/memory.py --parts)."""
    import dataclasses

    opt = resolve_model("opt-1.3b")
    spec = dataclasses.replace(opt, family="gpt2")
    s, b, h, a = 512, 4, spec.hidden_size, spec.num_heads
    sbh = s * b * h
    # Korthikanti et al.: 34*s*b*h + 5*a*s^2*b bytes (fp16). Without dropout masks: 32*s*b*h;
    # with hidden dropout masks: 34*s*b*h; eager attention adds the fp16 softmax output 2*a*s^2*b.
    assert P.layer_activation_bytes(spec, b, s, "fp16") == 32 * sbh
    assert P.layer_activation_bytes(spec, b, s, "fp16", dropout=True) == 34 * sbh
    assert P.layer_activation_bytes(spec, b, s, "fp16", eager_attention=True) == 32 * sbh + 2 * a * s * s * b
    assert P.layer_activation_bytes(spec, b, s, "fp32") == 64 * sbh
    # OPT: LayerNorm inputs 2h, QKV input h, Q, K, V, context 4h, MLP input h, ReLU output f = 4h: 12h.
    assert P.layer_activation_bytes(opt, b, s, "fp16") == 24 * sbh
    assert P.layer_activation_bytes(opt, b, s, "fp32") == 48 * sbh
    L, V = spec.num_layers, spec.vocab_size
    full = P.training_activation_bytes(spec, b, s, "fp16", grad_ckpt=False, lm_head=True)
    assert full == L * 32 * sbh + 2 * 2 * sbh + s * b * V * (2 + 8)
    assert P.training_activation_bytes(opt, b, s, "fp16", grad_ckpt=False, lm_head=True) == full - L * 8 * sbh
    ckpt = P.training_activation_bytes(spec, b, s, "fp16", grad_ckpt=True, lm_head=True)
    assert ckpt == L * 2 * sbh + 32 * sbh + 2 * 2 * sbh + s * b * V * (2 + 8)
    value = P.training_activation_bytes(spec, b, s, "fp16", grad_ckpt=True, lm_head=False)
    assert value == L * 2 * sbh + 32 * sbh + 2 * 2 * sbh + s * b * 4


def test_zero0_reduce_bucket_peaks_apart_from_the_activations():
    """DeepSpeed's ZeRO-0 engine flattens every gradient into its reduce bucket after autograd's
    backward, with more than one data-parallel replica (pipeline.engine turns it off on one rank or one
    tensor-parallel group): the bucket is a training transient beside the activations, max of the two;
    ZeRO-1/2 buckets stay resident (with more than one rank), ZeRO-3 gathers resident too."""
    spec = resolve_model("opt-125m")
    n = spec.num_params()
    assert P.comm_buffer_bytes(spec, n, n, "fp32", 0, 1, True) == 0
    assert P.comm_buffer_bytes(spec, n, n, "fp32", 0, 2, True, tp=2) == 0  # one TP group: one replica
    assert P.comm_buffer_bytes(spec, n, n, "fp32", 0, 4, True, tp=2) == n * 4
    assert P.comm_buffer_bytes(spec, n, n, "bf16", 1, 1, True) == 0
    assert P.comm_buffer_bytes(spec, n, n, "bf16", 1, 2, True) == n * 2
    assert P.training_transient_bytes(3e9, n * 4, 0) == (0.0, 3e9)
    assert P.training_transient_bytes(1e8, n * 4, 0) == (0.0, n * 4)
    assert P.training_transient_bytes(3e9, n * 2, 1) == (n * 2, 3e9)


def test_kv_cache_and_gqa():
    llama70 = resolve_model("llama-2-70b")  # 80 layers, 8 KV heads of 128
    assert P.kv_cache_bytes(llama70, 1, 4096, "fp16") == 2 * 80 * 4096 * 1024 * 2  # 1.25 GiB
    assert P.kv_cache_bytes(llama70, 1, 4096, "fp16") / 2**30 == 1.25
    opt = resolve_model("opt-13b")
    assert P.kv_cache_bytes(opt, 16, 512, "bf16") == 2 * 40 * 16 * 512 * 5120 * 2


def test_reward_params_drop_untied_head():
    llama = resolve_model("llama-2-7b")
    assert P.reward_params(llama) == llama.num_params() - 32000 * 4096 + 4096
    opt = resolve_model("opt-350m")
    assert P.reward_params(opt) == opt.num_params() + 1024


# ----------------------------------------------------------------------------- planner behaviour


def _strategy_fields(cfg):
    p = cfg.stage
    return [p.sft.strategy, p.rm.strategy, p.ppo.actor.strategy, p.ppo.critic.strategy]


def test_cpu_natural_choice_and_apply_fills_everything(tmp_path):
    cfg = make("tiny-opt", "cpu", reward="tiny-opt")
    plan = P.plan_run(cfg)
    assert plan.fits and not plan.warnings and not plan.suggestions
    plan.apply(cfg)
    for s in _strategy_fields(cfg):
        assert (s.zero_stage, s.offload, s.gradient_checkpointing) == (0, False, False)
    for lora in (cfg.stage.sft.lora, cfg.stage.rm.lora, cfg.stage.ppo.actor.lora, cfg.stage.ppo.critic.lora):
        assert lora.dim == 0
    assert json.loads(json.dumps(plan.to_dict()))["fits"] is True
    plan.save(tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["stages"]["ppo"]["fits"] is True
    assert "ZeRO" in (tmp_path / "plan.txt").read_text()
    table = plan.table()
    for col in ("stage", "role", "ZeRO", "offload", "LoRA", "grad ckpt", "GiB/device", "fits?"):
        assert col in table
    assert {"actor", "critic", "ref", "reward"} <= {r.role for r in plan.stages["ppo"].roles}


def test_ema_is_an_fp32_average_of_the_trained_parameters():
    """4 bytes per trained parameter (the adapters only under LoRA), partitioned under ZeRO-3;
    in host RAM with the reference model."""
    base = P.plan_run(make("opt-1.3b", "h200-141g"))
    cfg = make("opt-1.3b", "h200-141g", stage__ppo__enable_ema=True)
    with_ema = P.plan_run(cfg).stages["ppo"]
    n = resolve_model("opt-1.3b").num_params()
    ema = with_ema.role("ema")
    assert ema.device_gib == pytest.approx(4 * n / P.GIB) and ema.host_gib == 0
    assert with_ema.role("actor").strategy == base.stages["ppo"].role("actor").strategy  # room enough: same layout
    assert with_ema.peak_gib - base.stages["ppo"].peak_gib == pytest.approx(4 * n / P.GIB)
    off = P.plan_run(make("opt-1.3b", "h200-141g", stage__ppo__enable_ema=True,
                          stage__ppo__offload_reference_model=True)).stages["ppo"]
    assert off.role("ema").device_gib == 0 and off.role("ema").host_gib == pytest.approx(4 * n / P.GIB)
    assert off.role("ema").strategy.offload
    spec = resolve_model("opt-13b")
    sharded = P.plan_run(make("opt-13b", "a100-80g", procs=8, stage__ppo__enable_ema=True,
                              stage__ppo__actor__strategy__zero_stage=3, stage__ppo__actor__lora__dim=64)).stages["ppo"]
    assert sharded.role("ema").device_gib + sharded.role("ema").host_gib == pytest.approx(4 * P.lora_params(spec, 64) / 8 / P.GIB)
    assert sharded.role("ema").params == P.lora_params(spec, 64)


def test_offloading_the_frozen_models_makes_step3_fit():
    """OPT-6.7B on one V100-32G: step 3 fits only with the reference model's weights in host RAM.
    The planner finds that, fills the switches, and respects an explicit false (then says what would fit)."""
    cfg = make("opt-6.7b", "v100-32g")
    plan = P.plan_run(cfg)
    ppo = plan.stages["ppo"]
    assert plan.fits, P.dry_run_report(cfg)
    ref, reward = ppo.role("ref"), ppo.role("reward")
    n, d = resolve_model("opt-6.7b").num_params(), 2  # fp16 on a V100
    assert ref.strategy == P.Strategy(3, True) and ref.host_gib == pytest.approx(n * d / P.GIB)
    spec = resolve_model("opt-6.7b")
    gather_buffers = 2 * max(P.layer_params(spec), spec.vocab_size * spec.hidden_size) * d  # the embedding, twice
    assert ref.breakdown["params"] == 0 and ref.device_gib == pytest.approx(gather_buffers / P.GIB)
    assert reward.strategy == P.Strategy(0, False)  # not needed: not offloaded
    plan.apply(cfg)
    assert (cfg.stage.ppo.offload_reference_model, cfg.stage.ppo.offload_reward_model) == (True, False)
    ref_row = next(line.split() for line in plan.table().splitlines() if line.split()[:2] == ["ppo", "ref"])
    assert ref_row[4:6] == ["3", "yes"]  # ZeRO, offload columns

    pinned = make("opt-6.7b", "v100-32g", stage__ppo__offload_reference_model=False)
    plan = P.plan_run(pinned)
    assert not plan.fits
    assert any("stage ppo with your settings (stage.ppo.offload_reference_model)" in w for w in plan.warnings)
    assert any(s.startswith("ppo: leave stage.ppo.offload_reference_model to the planner") and "ref: offloaded" in s
               for s in plan.suggestions), plan.suggestions
    plan.apply(pinned)
    assert pinned.stage.ppo.offload_reference_model is False


def test_frozen_offload_is_never_chosen_on_cpu_and_warned_when_asked():
    # OPT-6.7B does not fit in the CPU profile's 16 GiB; offloading to the same RAM would "help" on paper
    plan = P.plan_run(make("opt-6.7b", "cpu"))
    assert not plan.fits
    assert not plan.stages["ppo"].role("ref").strategy.offload and not plan.stages["ppo"].role("reward").strategy.offload
    warned = P.plan_run(make("tiny-opt", "cpu", reward="tiny-opt", stage__ppo__offload_reward_model=True))
    assert warned.stages["ppo"].role("reward").strategy == P.Strategy(3, True)
    assert any(w.startswith("stage.ppo.offload_reward_model=true on a CPU device") for w in warned.warnings)


def test_an_actor_too_large_to_gather_generates_module_by_module():
    """OPT-66B (132 GB in bf16) on 8 x A100-80G without tensor parallelism (tp_degree=1; with it the
    actor generates on its shards: tests/test_tp.py): ZeRO-3, and generation cannot gather the whole
    actor on one GPU, so the plan fetches modules per step and fills stage.ppo.generation.gather_weights=false
    for the rollout engine; forcing the gather does not fit and the warning names the key."""
    no_tp = {"stage__ppo__actor__strategy__tp_degree": 1, "stage__ppo__critic__strategy__tp_degree": 1}
    cfg = make("opt-66b", "a100-80g", procs=8, **no_tp)
    plan = P.plan_run(cfg)
    ppo = plan.stages["ppo"]
    assert plan.fits and ppo.role("actor").strategy.zero_stage == 3 and ppo.generation_gathers_params is False
    plan.apply(cfg)
    assert cfg.stage.ppo.generation.gather_weights is False
    forced = P.plan_run(make("opt-66b", "a100-80g", procs=8, stage__ppo__generation__gather_weights=True, **no_tp))
    assert not forced.fits
    assert any("stage ppo with your settings (" in w and "stage.ppo.generation.gather_weights)" in w for w in forced.warnings)
    small = make("opt-1.3b", "a100-80g", procs=8, stage__ppo__actor__strategy__zero_stage=3)
    P.plan_run(small).apply(small)
    assert small.stage.ppo.generation.gather_weights is True  # gathered whenever it fits


def test_unsized_model_frozen_offload_follows_its_partner_like_the_engine():
    """Without sizes the planner keeps the engine's rule for a null switch: offload when the partner
    runs ZeRO-3 + offload."""
    cfg = make("someorg/unsized-model", "a100-80g", stage__ppo__actor__strategy__zero_stage=3,
               stage__ppo__actor__strategy__offload=True)
    assert cfg.stage.ppo.offloads_frozen("ref") and not cfg.stage.ppo.offloads_frozen("reward")
    plan = P.plan_run(cfg)
    assert plan.stages["ppo"].role("ref").strategy == P.Strategy(3, True)
    plan.apply(cfg)
    assert cfg.stage.ppo.offload_reference_model is True and cfg.stage.ppo.offload_reward_model is False


def test_preference_order_prefers_less_sharding_first():
    # opt-1.3b full fine-tune fits plain on an 80G GPU: ZeRO-0, no ckpt, no LoRA, no offload.
    s = P.plan_run(make("opt-1.3b", "a100-80g")).stages["sft"].role("actor").strategy
    assert s == P.Strategy(0, False, False, 0)
    # opt-13b over 8 x A100-40G: not at ZeRO 0-2; sharding comes before LoRA and offload.
    s = P.plan_run(make("opt-13b", "a100-40g", procs=8)).stages["sft"].role("actor").strategy
    assert s.zero_stage == 3 and s.lora_dim == 0 and not s.offload
    order = P._candidates(P._inputs(make("opt-1.3b", "a100-80g")), P._Constraint())
    ranks = [(P._offload_level(c), c.lora_dim > 0, c.gradient_checkpointing) for c in order]
    assert ranks == sorted(ranks) and order[0] == P.Strategy(0, False, False, 0)


def test_explicit_settings_win_and_warn_when_they_do_not_fit():
    cfg = make("opt-13b", "a100-40g", stage__sft__strategy__zero_stage=0, stage__sft__strategy__offload=False,
               stage__sft__lora__dim=0)
    plan = P.plan_run(cfg)
    sft = plan.stages["sft"]
    assert not sft.fits and not plan.fits
    assert sft.role("actor").strategy.zero_stage == 0 and sft.role("actor").strategy.lora_dim == 0
    assert any("stage sft" in w and "stage.sft.strategy.zero_stage" in w for w in plan.warnings)
    assert any(s.startswith("sft: leave") for s in plan.suggestions)
    plan.apply(cfg)
    assert cfg.stage.sft.strategy.zero_stage == 0 and cfg.stage.sft.lora.dim == 0
    assert cfg.stage.sft.strategy.gradient_checkpointing is not None  # the planner filled the rest
    # an explicit choice that fits is kept without a warning
    cfg = make("tiny-opt", "cpu", reward="tiny-opt", stage__rm__strategy__zero_stage=2)
    plan = P.plan_run(cfg)
    plan.apply(cfg)
    assert cfg.stage.rm.strategy.zero_stage == 2 and not plan.warnings


def test_inconsistent_explicit_settings_warn():
    cfg = make("opt-1.3b", "a100-80g", stage__sft__strategy__zero_stage=0, stage__sft__strategy__offload=True)
    w = " ".join(P.plan_run(cfg).warnings)
    assert "offload needs ZeRO" in w


def _largest_actor(profile: str, dtype: str | None = None) -> str:
    fitting = None
    for name in ["opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b"]:
        if P.plan_run(make(name, profile, dtype=dtype)).fits:
            fitting = name
    return fitting


@pytest.mark.parametrize("profile,dtype,at_least", [
    ("v100-32g", "fp16", "opt-2.7b"),
    ("a6000-48g", None, "opt-6.7b"),
    ("a100-40g", None, "opt-6.7b"),
    ("a100-80g", None, "opt-13b"),
])
def test_deepspeed_chat_table3_single_gpu(profile, dtype, at_least):
    """DeepSpeed-Chat Table 3: largest actor (with an OPT-350m reward model) on one GPU."""
    order = list(CATALOG)
    got = _largest_actor(profile, dtype)
    assert got is not None and order.index(got) >= order.index(at_least), got


@pytest.mark.parametrize("actor,profile,nodes,procs", [
    ("opt-1.3b", "a6000-48g", 1, None),   # single_gpu preset (in-process)
    ("opt-13b", "a100-40g", 1, 8),         # single_node 8 x A100-40G
    ("opt-13b", "a100-80g", 1, 8),
    ("opt-30b", "a100-80g", 1, 8),
    ("opt-66b", "a100-80g", 1, 8),
    ("opt-66b", "a100-80g", 8, 8),         # multi_node 64 x A100-80G
    ("opt-13b", "a100-80g", 8, 8),
])
def test_deepspeed_chat_presets_are_feasible(actor, profile, nodes, procs):
    cfg = make(actor, profile, nodes=nodes, procs=procs)
    plan = P.plan_run(cfg)
    assert plan.fits, P.dry_run_report(cfg)


def test_nothing_fits_says_what_would():
    plan = P.plan_run(make("opt-66b", "a100-80g"))  # one GPU
    assert not plan.fits and plan.suggestions
    assert any("devices" in s for s in plan.suggestions)
    report = P.dry_run_report(make("opt-66b", "a100-80g"))
    assert "What would fit" in report and "does NOT fit" in report
    plan = P.plan_run(make("opt-1.3b", "cpu", stage__ppo__per_device_generation_batch_size=64,
                           stage__ppo__per_device_training_batch_size=64))
    assert not plan.fits and any("batch_size" in s or "devices" in s for s in plan.suggestions)


@pytest.mark.parametrize("profile", PROFILES)
def test_dry_run_every_catalog_model_on_every_profile(profile):
    for actor in CATALOG:
        cfg = make(actor, profile)
        plan = P.plan_run(cfg)
        report = P.dry_run_report(cfg, plan)
        assert "stage" in report and "dry run" in report
        json.dumps(plan.to_dict())
        if not plan.fits:
            assert plan.suggestions
        plan.apply(cfg)
        for s in _strategy_fields(cfg):
            assert None not in (s.zero_stage, s.offload, s.gradient_checkpointing)


def test_unsized_hub_model_gets_a_conservative_plan(tmp_path):
    cfg = make("someorg/unsized-model", "a100-80g", procs=8)
    plan = P.plan_run(cfg)
    assert any("model.actor: size unknown" in w for w in plan.warnings)
    plan.apply(cfg)
    assert cfg.stage.sft.strategy.zero_stage == 3 and cfg.stage.sft.strategy.gradient_checkpointing is True
    assert "dry run" in P.dry_run_report(cfg)


def test_local_folder_model_is_sized_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "opt", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "ffn_dim": 256, "vocab_size": 512, "max_position_embeddings": 512}))
    plan = P.plan_run(make(str(tmp_path), "cpu", reward="tiny-opt"))
    assert plan.fits and plan.stages["sft"].role("actor").params == CATALOG["tiny-opt"].num_params()


def test_models_are_sized_with_the_embedding_rows_the_tokenizer_grows_them_to(shared_data, tmp_path):
    """tiny-opt has 512 embedding rows; loaded with the OPT tokenizer (50265 tokens) it grows to 50272
    (the next multiple of 8), and the plan counts those rows: 50272*64 + 514*64 positions + 2 layers *
    49984 + 2*64 final LayerNorm = 3,350,400 parameters (165,760 with the built-in tokenizer); critic
    and reward add their value head's 64 weights."""
    from pipeline.models import load_causal_lm, load_tokenizer, materialize

    cfg = make("tiny-opt", "cpu", reward="tiny-opt")
    assert P.plan_run(cfg).stages["sft"].role("actor").params == 165_760
    cfg.model.tokenizer = str(shared_data / "tokenizers" / "opt")
    plan = P.plan_run(cfg)
    assert {(r.role, r.params) for sp in plan.stages.values() for r in sp.roles} == {
        ("actor", 3_350_400), ("ref", 3_350_400), ("critic", 3_350_464), ("reward", 3_350_464)}  # + value head
    assert not any("different tokenizers" in w for w in plan.warnings)
    tokenizer = load_tokenizer(cfg.model.tokenizer, tmp_path)
    model = load_causal_lm(materialize("tiny-opt", tmp_path, len(tokenizer), seed=0), tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == 50272
    assert sum(p.numel() for p in model.parameters()) == 3_350_400


def test_tokenizer_warning_compares_the_tokenizers_saved_beside_the_models(shared_data, tmp_path):
    """Random-init models saved with the OPT tokenizer are not flagged whatever their family or embedding
    size; one saved with another tokenizer is, even of the same family and size."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from pipeline.data import builtin

    opt_tokenizer = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "opt")
    other_tokenizer = AutoTokenizer.from_pretrained(builtin.save_tokenizer(tmp_path / "builtin_tokenizer"))
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    folders = {
        "opt": (OPTForCausalLM(OPTConfig(vocab_size=512, ffn_dim=256, word_embed_proj_dim=64, **small)), opt_tokenizer),
        "llama": (LlamaForCausalLM(LlamaConfig(vocab_size=50272, intermediate_size=128, **small)), opt_tokenizer),
        "opt_other": (OPTForCausalLM(OPTConfig(vocab_size=512, ffn_dim=256, word_embed_proj_dim=64, **small)),
                      other_tokenizer),
    }
    for name, (model, tokenizer) in folders.items():
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)

    def flagged(actor: str, reward: str) -> bool:
        cfg = make(str(tmp_path / actor), "cpu", reward=str(tmp_path / reward))
        return any("different tokenizers" in w for w in P.plan_run(cfg).warnings)

    assert not flagged("opt", "llama") and not flagged("llama", "opt")
    assert flagged("opt", "opt_other")


def test_reward_model_of_another_tokenizer_family_is_flagged():
    """DeepSpeed-Chat users hit embedding mismatches with a LLaMA actor and an OPT reward model; here
    one tokenizer serves every model, so the plan says what that costs instead."""
    mixed = " ".join(P.plan_run(make("llama-2-7b", "a100-80g", reward="opt-350m")).warnings)
    assert "model.reward=opt-350m (opt, vocabulary 50272) and model.actor=llama-2-7b (llama, vocabulary 32000)" in mixed
    assert "different tokenizers" in mixed
    assert "different tokenizers" not in " ".join(P.plan_run(make("opt-13b", "a100-80g", reward="opt-350m")).warnings)
