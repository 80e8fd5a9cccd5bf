"""Every config file composes into a valid RunConfig; bad values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.catalog import CATALOG, UnknownModelError, resolve_model
from pipeline.cli import resolve_hardware
from pipeline.config import ConfigError, load_config, register_resolvers

CONF = ROOT / "conf"
APPENDED = {"deployment", "experiment"}  # groups outside the defaults list: added with "+"


def conf_files() -> list[tuple[str, str]]:
    out = []
    for path in sorted(CONF.rglob("*.yaml")):
        group = str(path.parent.relative_to(CONF))
        if group != ".":
            out.append((group, path.stem))
    return out


def compose_with(*overrides: str, hydra: bool = False):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_conf_has_every_group():
    groups = {g for g, _ in conf_files()}
    assert {"model", "data_blend", "stage", "hardware", "deployment", "experiment"} <= groups


@pytest.mark.parametrize("group,name", conf_files(), ids=lambda x: str(x))
def test_every_config_file_composes_and_validates(group, name):
    if group.startswith("hydra/"):
        cfg = compose_with(f"{group}={name}", hydra=True)
        assert cfg.hydra.launcher is not None
        return
    prefix = "+" if group in APPENDED else ""
    cfg = compose_with(f"{prefix}{group}={name}")
    run_cfg = load_config(resolve_hardware(cfg))
    assert run_cfg.stage.ppo.kl_ctl >= 0 and run_cfg.output_dir.parts


def test_default_is_deepspeed_chat_pair_and_constants():
    cfg = load_config(compose_with("hardware=cpu"))
    assert cfg.model.actor_source == "facebook/opt-1.3b" and cfg.model.reward_source == "facebook/opt-350m"
    p = cfg.stage.ppo
    assert (p.kl_ctl, p.clip_reward_value, p.cliprange, p.cliprange_value, p.gamma, p.lam) == (0.1, 5.0, 0.2, 0.2, 1.0, 0.95)
    assert cfg.run.stages == ["sft", "rm", "ppo"]


def test_ema_is_off_by_default_with_deepspeed_chats_beta():
    from pipeline.planner import plan_run

    p = load_config(compose_with("hardware=cpu")).stage.ppo
    assert (p.enable_ema, p.ema_beta) == (False, 0.992)
    assert (p.offload_reference_model, p.offload_reward_model) == (None, None)  # the planner decides
    on = load_config(compose_with("hardware=cpu", "stage.ppo.enable_ema=true")).stage.ppo
    assert (on.enable_ema, on.ema_beta) == (True, 0.992)
    lone_beta = load_config(compose_with("hardware=cpu", "stage.ppo.ema_beta=0.99"))
    assert "stage.ppo.ema_beta=0.99 has no effect: the EMA is off (stage.ppo.enable_ema=false)" in plan_run(lone_beta).warnings


def test_promised_multi_node_command_resolves_actor():
    proc = run_cli("+deployment=multi_node", "model.actor=opt-66b", "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.model.actor_source == "facebook/opt-66b"
    assert printed.deployment.name == "multi_node"


@pytest.mark.parametrize("override,message", [
    ("stage.ppo.per_device_training_batch_size=7", "stage.ppo.per_device_training_batch_size=7"),
    ("stage.ppo.cliprange=-1", "stage.ppo.cliprange=-1.0 must be > 0"),
    ("run.stages=[sft,kto]", "run.stages"),
    ("data_blend.split='1,2'", "data_blend.split"),
    ("model.actor=gpt-17", "model.actor=gpt-17"),
    ("stage.sft.strategy.zero_stage=4", "stage.sft.strategy.zero_stage=4"),
    ("stage.ppo.generation.top_p=1.5", "stage.ppo.generation.top_p"),
    ("stage.ppo.ema_beta=1.0", "stage.ppo.ema_beta=1.0 must be in"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(compose_with("hardware=cpu", override))


@pytest.mark.parametrize("override,message", [
    ("stage.ppo.clip_range=0.3", "error: unknown config key stage.ppo.clip_range; did you mean stage.ppo.cliprange?"),
    ("+stage.sft.optim.lr=0.5", "error: unknown config key stage.sft.optim.lr; did you mean stage.sft.optim.learning_rate?"),
    ("+run.foo=1", "error: unknown config key run.foo; known keys there: name, output_dir, stages"),
    ("stage.ppo.cliprange=abc", "error: stage.ppo.cliprange=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("stage.ppo.actor_optim.learning_rate=1e-4", "error: stage.ppo.actor_optim: renamed; use stage.ppo.actor.optim"),
])
def test_unknown_key_and_wrong_type_fail_at_the_command_line(override, message):
    """With or without `+`: one line naming the key and the closest known one, exit 2, before Hydra."""
    proc = run_cli(override, "--cfg", "job", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(message), proc.stderr


def test_unknown_key_in_a_yaml_file_is_refused_naming_it(tmp_path: Path):
    """A key no section has, written in a config group's YAML, stops the run as one from the command line does."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nstage:\n  sft:\n    mask_prompts: true\n")
    proc = run_cli("+experiment=typo", f"hydra.searchpath=[file://{tmp_path}]", "run.dry_run=true", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: unknown config key stage.sft.mask_prompts; did you mean stage.sft.mask_prompt?"


def test_yaml_groups_hold_only_what_they_change():
    """Defaults are written once, in pipeline/config.py: no YAML group repeats a default value (hardware,
    deployment and model options are whole profiles of a device, a topology or an actor/reward pair and
    state every fact; local.yaml names the field keys so that data_blend.fields.<key>=... needs no `+`)."""
    from omegaconf import OmegaConf

    from pipeline.config import RunConfig

    defaults = OmegaConf.structured(RunConfig)
    repeated = []
    for group, name in conf_files():
        if group in ("hardware", "deployment", "model", "experiment") or group.startswith("hydra"):
            continue
        node = OmegaConf.load(CONF / group / f"{name}.yaml")
        section = defaults[group] if group in defaults else None
        for key, value in (OmegaConf.to_container(node, resolve=False) or {}).items():
            if section is None or key not in section or key in ("name", "fields"):
                continue
            if OmegaConf.to_container(OmegaConf.create({"v": value}))["v"] == \
                    OmegaConf.to_container(OmegaConf.create({"v": section[key]}), resolve=False)["v"]:
                repeated.append(f"{group}/{name}.yaml: {key}")
    assert not repeated, repeated
    assert not (OmegaConf.to_container(OmegaConf.load(CONF / "stage" / "default.yaml")) or {})


def test_stages_out_of_order_are_refused_at_validation():
    with pytest.raises(ConfigError, match=r"run\.stages=\['rm', 'sft'\] is out of order"):
        load_config(compose_with("hardware=cpu", "run.stages=[rm,sft]"))


def test_the_applied_plan_is_validated_again_and_frozen():
    """A conflict the planner creates fails before any model loads; then the config is read-only."""
    from pipeline.config import FrozenConfigError, finalize

    class GathersNothing:  # a plan that chose module-by-module generation
        def apply(self, cfg):
            cfg.stage.ppo.generation.gather_weights = False

    cfg = load_config(compose_with("hardware=cpu", "stage.ppo.generation.merge_lora=true"))
    with pytest.raises(ConfigError, match=r"stage\.ppo\.generation\.merge_lora=True needs the actor's weights gathered"):
        finalize(cfg, GathersNothing())
    cfg = finalize(load_config(compose_with("hardware=cpu")), GathersNothing())
    with pytest.raises(FrozenConfigError):
        cfg.stage.ppo.actor.optim.learning_rate = 1.0
    with pytest.raises(FrozenConfigError):
        cfg.run.seed = 1


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="run.dtype=fp16"):
        load_config(compose_with("hardware=cpu", "run.dtype=fp16"))


def test_catalog_sizes_without_download():
    expected = {"opt-125m": 125.2e6, "opt-350m": 331.2e6, "opt-1.3b": 1315.8e6, "opt-13b": 12853e6,
                "opt-66b": 65.7e9, "llama-2-7b": 6.738e9, "llama-2-70b": 68.98e9}
    for name, params in expected.items():
        assert resolve_model(name).num_params() == pytest.approx(params, rel=0.01), name
    assert resolve_model("facebook/opt-1.3b").hidden_size == 2048
    assert len([n for n in CATALOG if n.startswith(("opt-", "llama-2-"))]) == 12
    with pytest.raises(UnknownModelError, match="gpt-17"):
        resolve_model("gpt-17")


def test_local_folder_is_sized_from_its_config(tmp_path: Path):
    from transformers import OPTConfig

    OPTConfig(hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=2, vocab_size=100,
              word_embed_proj_dim=32).save_pretrained(tmp_path)
    spec = resolve_model(str(tmp_path))
    assert (spec.num_layers, spec.hidden_size, spec.vocab_size, spec.family) == (3, 32, 100, "opt")


def test_default_model_missing_offline_fails_fast_with_one_line(tmp_path: Path):
    proc = run_cli(f"run.output_dir={tmp_path}/run", "hardware=cpu",
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "facebook/opt-1.3b" in last and "+experiment=demo" in last


def test_run_folders_with_the_old_role_key_names_still_load():
    """config.yaml of older runs names stage.ppo.actor_strategy, critic_optim, ...: they move to the
    new keys, tp_degree included (the key is back: DeepSpeed AutoTP)."""
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(compose_with("hardware=cpu", "+experiment=demo"), resolve=False)
    old.pop("hydra", None)
    ppo = old["stage"]["ppo"]
    ppo["actor_strategy"] = {**ppo.pop("actor")["strategy"], "tp_degree": 1}  # the old key names
    ppo["critic_optim"] = {**ppo.pop("critic")["optim"], "learning_rate": 3e-6}
    cfg = load_config(old)
    assert cfg.stage.ppo.actor.strategy.zero_stage is None and cfg.stage.ppo.actor.strategy.tp_degree == 1
    assert cfg.stage.ppo.critic.optim.learning_rate == 3e-6


def test_gradient_clipping_zero_means_off_in_deepspeed():
    """DeepSpeed clips at 1.0 when its config has no gradient_clipping key: 0 must be written as 0."""
    from pipeline.engine import ds_config

    cfg = load_config(compose_with("hardware=cpu", "stage.sft.optim.gradient_clipping=0"))
    s = cfg.stage.sft
    assert ds_config(cfg, 1, 1, s.strategy, s.optim)["gradient_clipping"] == 0.0
    assert ds_config(cfg, 1, 1, s.strategy, cfg.stage.rm.optim)["gradient_clipping"] == 1.0
