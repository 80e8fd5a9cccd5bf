"""Tensor parallelism (DeepSpeed AutoTP, stage.*.strategy.tp_degree): what is refused before any
model loads, the planner's TP layouts against hand-computed bytes, the data split by data-parallel
rank, and 2 gloo ranks with TP=2 against the same models unsplit: engine-level checks
(tests/tp_ranks.py under torchrun) and whole runs, one rank TP=1 against two ranks TP=2 on the same
data (tiny LLaMA actor with grouped-query attention, tiny OPT reward model and critic).

Tolerances, fp32 on CPU, as numpy's allclose: |tp2 - one| <= atol + rtol * |one|, rtol 1e-4 (a TP
all-reduce sums partial products in another order: ~1e-7 relative per forward). The atols cover
quantities that are 0, or nearly, in exact arithmetic, where a relative tolerance means nothing:
- METRIC_ATOL: the KL to the reference and PPO's approx_kl at step 1 (actor = reference) are
  differences of two log-probabilities near -ln(vocab) = -6.2, whose float32 spacing is 2**-21 =
  4.8e-7; a log-softmax rounds a few times, so each side carries ~1.5 ulp and their difference up to
  ~3 ulp where it should be 0. 4 ulp = 1.9e-6 (measured: 7.2e-7, both pairings).
- WEIGHT_ATOL: AdamW's step lr * m / (sqrt(v) + eps) is scale-free where a gradient is large, so its
  float32 noise moves the weight by ~1e-7 * lr; but an entry whose gradient is of the order of eps =
  1e-8 passes its noise (~1e-11: 1e-7 of gradient sums of ~1e-4) on divided by eps: up to ~1e-3 * lr
  per step. Over the engines' 3 steps at lr 1e-3 (tests/tp_ranks.py) that is 3e-6 (measured beyond
  rtol: 2.4e-6, LLaMA at ZeRO-3; 2.2e-6 OPT), over the runs' warm-ups (sum of lr 1.2e-3 at most)
  1.2e-6 (measured 4.3e-9, all four final models of both pairings): 1e-5.
- ZERO_GRADIENT_ATOL: two parameters have a true gradient of exactly 0, so their float32 gradient is
  rounding noise g alone, which Adam turns into steps of lr * g / (|g| + eps) (eps = 1e-8, |g| ~ 1e-9)
  in the noise's direction: up to lr per step in either run. OPT's k_proj.bias (a query's scores
  shift alike for every key, which softmax ignores) and a reward model's final LayerNorm bias
  (chosen and rejected scores shift alike, which the pairwise loss ignores). Measured 2.4e-5 (RM
  final LayerNorm bias, 4 warm-up steps summing to lr 6e-5) and 5.6e-6 (k_proj.bias, the engines' 3
  steps at lr 1e-3; 2.2e-6 in the runs): 1e-4. That bias shifts every RM score by ~1.6e-5, which
  the RM's score metrics carry (8.2e-5 relative at most, inside rtol alone).
PPO is compared from the same start (the one-rank PPO reads the TP=2 run's SFT and RM models):
otherwise the RM's final LayerNorm bias, 2.4e-5 apart, shifts every reward and the critic's values
by ~1.6e-5, and PPO's metrics inherit it (an actor loss of -0.12 then differed by 1.1e-4 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

from pipeline import planner as P
from pipeline.catalog import BUILTIN_VOCAB, resolve_model
from pipeline.config import ConfigError, load_config

CPU = {"name": "cpu", "device": "cpu"}
TWO_RANKS = {"name": "single_node", "launcher": "torchrun", "procs_per_node": 2}


def config(stage: dict, deployment: dict | None = TWO_RANKS, **model) -> object:
    return load_config({"model": {"actor": "tiny-opt", "reward": "tiny-opt", "tokenizer": "builtin", **model},
                        "hardware": CPU, "stage": stage, **({"deployment": deployment} if deployment else {})})


# ----------------------------------------------------------------------------- refused before loading


@pytest.mark.parametrize("stage,deployment,message", [
    ({"sft": {"strategy": {"tp_degree": 2}, "lora": {"dim": 8}}}, TWO_RANKS,
     "stage.sft.lora.dim=8 with stage.sft.strategy.tp_degree=2: DeepSpeed AutoTP cannot shard peft LoRA layers"),
    ({"rm": {"strategy": {"tp_degree": 2}}}, None,
     "stage.rm.strategy.tp_degree=2 must divide the ranks of a node (1 here"),
    ({"rm": {"strategy": {"tp_degree": 4}}}, TWO_RANKS,
     "stage.rm.strategy.tp_degree=4 must divide the ranks of a node (2 here"),
    ({"sft": {"strategy": {"tp_degree": 8}}}, {**TWO_RANKS, "procs_per_node": 8},
     "stage.sft.strategy.tp_degree=8: model.actor=tiny-opt has 4 attention heads and 4 key-value heads, which 8 "
     "does not divide; DeepSpeed AutoTP would split attention unevenly"),
    ({"ppo": {"actor": {"strategy": {"tp_degree": 2}}, "critic": {"strategy": {"tp_degree": 1}}}}, TWO_RANKS,
     "stage.ppo.critic.strategy.tp_degree=1 with stage.ppo.actor.strategy.tp_degree=2: DeepSpeed keeps one "
     "tensor-parallel group per process"),
    ({"ppo": {"enable_ema": True, "actor": {"strategy": {"tp_degree": 2}}}}, TWO_RANKS,
     "stage.ppo.enable_ema=True with stage.ppo.actor.strategy.tp_degree=2: the EMA averages whole parameters"),
    ({"dpo": {"strategy": {"tp_degree": 0}}}, TWO_RANKS, "stage.dpo.strategy.tp_degree=0 must be >= 1"),
])
def test_what_autotp_cannot_run_is_refused_by_key_before_any_model_loads(stage, deployment, message):
    with pytest.raises(ConfigError) as refused:
        config(stage, deployment)
    assert str(refused.value).startswith(message), str(refused.value)


def test_kv_heads_are_checked_on_a_local_model_folder(tmp_path: Path):
    """LLaMA with 4 attention heads and 2 key-value heads: TP=2 is accepted, TP=4 refused naming both."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=128).save_pretrained(tmp_path)
    config({"sft": {"strategy": {"tp_degree": 2}}}, actor=str(tmp_path))
    with pytest.raises(ConfigError, match=r"has 4 attention heads and 2 key-value heads, which 4 does not divide.*"
                                          r"choose a degree that divides both \(1, 2\)"):
        config({"sft": {"strategy": {"tp_degree": 4}}}, {**TWO_RANKS, "procs_per_node": 4}, actor=str(tmp_path))


def test_a_model_sized_only_when_it_loads_is_checked_before_deepspeed_splits_it():
    """A hub model without a cached config.json is sized when it loads: its heads are checked then,
    before deepspeed.initialize."""
    from transformers import OPTConfig, OPTForCausalLM

    from pipeline.engine import check_head_split

    model = OPTForCausalLM(OPTConfig(hidden_size=48, num_attention_heads=3, ffn_dim=96, num_hidden_layers=1,
                                     vocab_size=64, word_embed_proj_dim=48))
    check_head_split(model, 3, "stage.sft")
    with pytest.raises(ConfigError, match=r"^stage\.sft\.strategy\.tp_degree=2: .* has 3 attention heads and 3 key-value "
                                          r"heads, which 2 does not divide"):
        check_head_split(model, 2, "stage.sft")


def test_a_degree_given_for_a_family_autotp_was_not_measured_on_is_kept_with_a_warning(tmp_path: Path):
    from transformers import GPTNeoXConfig

    GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=128).save_pretrained(tmp_path)
    cfg = config({"sft": {"strategy": {"tp_degree": 2}}}, actor=str(tmp_path))
    plan = P.plan_run(cfg)
    assert plan.stages["sft"].role("actor").strategy.tp_degree == 2
    assert f"stage.sft.strategy.tp_degree=2: DeepSpeed AutoTP was measured here on opt and llama models only, not on " \
           f"gpt_neox ({tmp_path})" in " ".join(plan.warnings)
    assert P.plan_run(config({}, actor=str(tmp_path))).stages["sft"].role("actor").strategy.tp_degree == 1


def test_a_changed_degree_keeps_the_stage_and_its_checkpoints():
    """The degree is not part of a stage's config hash (as the number of ranks is not): a finished
    stage is not redone for it, and a stopped one keeps its checkpoints, whose resume then refuses
    the other degree by key (below, and on real DeepSpeed files in tests/tp_ranks.py)."""
    from pipeline.runner import stage_hash, stage_record

    plain, split = config({}), config({"sft": {"strategy": {"tp_degree": 2}}, "ppo": {"actor": {"strategy": {"tp_degree": 2}}}})
    for stage in ("sft", "ppo"):
        assert stage_hash(plain, stage) == stage_hash(split, stage)
        assert stage_record(plain, stage) == stage_record(split, stage)


def test_a_checkpoint_of_another_degree_is_refused_by_key(tmp_path: Path):
    """The degree is read from the names of DeepSpeed's files (one mp_rank per tensor-parallel rank),
    before anything is loaded or unpickled."""
    from pipeline.resume import check_tensor_parallel, written_tp_degree

    state = tmp_path / "step_000002" / "actor" / "state"
    state.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
                 "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"):
        (state / name).write_bytes(b"")
    assert written_tp_degree(state.parent) == 2
    with pytest.raises(ConfigError) as refused:
        check_tensor_parallel(tmp_path / "step_000002", {"actor": torch.nn.Linear(2, 2)}, "ppo")
    assert str(refused.value) == (
        f"{tmp_path / 'step_000002'} was written with stage.ppo.actor.strategy.tp_degree=2 and this run has 1: "
        "DeepSpeed loads a checkpoint only into the tensor-parallel degree that wrote it; set "
        "stage.ppo.actor.strategy.tp_degree=2 to resume from it, or run.resume=never to start ppo over")


# ----------------------------------------------------------------------------- the data split


def test_the_ranks_of_a_tensor_parallel_group_read_the_same_batches(monkeypatch):
    """4 ranks at TP=2: ranks 0 and 1 (one group) read rank 0's share of a 2-rank run without TP,
    ranks 2 and 3 rank 1's; training and evaluation alike, and an epoch has the 2-rank run's steps."""
    import pipeline.dist as dist
    from pipeline.training import epoch_batches, eval_batches, steps_per_epoch

    data = list(range(40))

    def shares(world: int, tp: int, fn) -> list[list]:
        out = []
        for r in range(world):
            monkeypatch.setattr(dist, "rank", lambda r=r: r)
            monkeypatch.setattr(dist, "world_size", lambda: world)
            out.append([list(b) for b in fn(tp)])
        return out

    def train(tp):
        return epoch_batches(data, 4, list, seed=3, epoch=1, tp=tp)

    def evaluate(tp):
        return eval_batches(data[:11], 2, list, tp=tp)

    for fn in (train, evaluate):
        tp2, plain = shares(4, 2, fn), shares(2, 1, fn)
        assert tp2 == [plain[0], plain[0], plain[1], plain[1]], fn.__name__
        assert not set(sum(plain[0], [])) & set(sum(plain[1], [])), fn.__name__
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    assert steps_per_epoch(40, 4, 1, tp=2) == 5 and steps_per_epoch(40, 4, 1) == 2


# ----------------------------------------------------------------------------- the planner


def test_tp_layout_bytes_equal_the_hand_computation():
    """OPT-66B (H 9216, F 36864, 72 heads, 64 layers, V 50272) at TP=8, ZeRO-1, bf16, 64 ranks (8 data-parallel)."""
    spec = resolve_model("opt-66b")
    H, F, L, V = 9216, 36864, 64, 50272
    split = L * (4 * H * H + 3 * H + 2 * H * F + F)  # q, k, v, out_proj, fc1, fc2 weights; q/k/v, fc1 biases
    whole = V * H + 2050 * H + L * 6 * H + 2 * H  # embeddings, positions, row biases + LayerNorms, final LayerNorm
    assert P.tensor_parallel_split(spec) == (split, whole) == (65_233_944_576, 485_756_928)
    assert P.tensor_parallel_params(spec, 8) == split / 8 + whole == 8.64e9
    st = P.trained_state_bytes(8.64e9, 8.64e9, "bf16", 1, False, 64 // 8)
    assert (st["params"], st["grads"], st["optimizer"]) == (2 * 8.64e9, (2 + 4) * 8.64e9, 12 * 8.64e9 / 8)
    # Activations of one layer, per token, bf16: 4H whole + (Q, K, V, context: 4H; ReLU output: F) / 8.
    b, s = 1, 512
    per_token = (4 * H + (4 * H + F) / 8) * 2
    assert per_token == 92_160
    assert P.layer_activation_bytes(spec, b, s, "bf16", tp=8) == per_token * b * s
    sbh = b * s * H
    act = L * per_token * b * s + 2 * 2 * sbh + s * b * V * (2 + 8)  # the all-reduces run in place: no buffer
    assert P.training_activation_bytes(spec, b, s, "bf16", grad_ckpt=False, lm_head=True, tp=8) == act == 3_296_165_888
    assert P.kv_cache_bytes(spec, 4, 512, "bf16", tp=8) == 2 * L * 4 * 512 * H * 2 / 8
    # ZeRO-3 at TP=8 gathers a layer's shards and its whole parts, or the embedding when larger.
    layer = (4 * H * H + 3 * H + 2 * H * F + F) / 8 + 6 * H
    assert P.comm_buffer_bytes(spec, 0, 0, "bf16", 3, 64, True, tp=8) == 2 * max(layer, V * H) * 2


def test_the_tp_degree_each_role_gets_and_what_it_may_not_be():
    """OPT-66B on 8 nodes of 8 x A100-80G: no layout without tensor parallelism generates without
    fetching every module per token, so the PPO actor is split (the critic, reference and reward with
    it); SFT (512 tokens x 16 rows) fits with ZeRO-3 at TP=8 without checkpointing (66.9 of 70.3 GiB: the
    planner prefers splitting to recomputing); apply fills every degree. LoRA or the EMA keep TP off; an untested family is not split by the planner."""
    base = {"model": {"actor": "opt-66b", "reward": "opt-350m"}, "hardware": _profile("a100-80g"),
            "deployment": {"name": "multi_node", "launcher": "deepspeed", "nodes": 8, "procs_per_node": 8}}
    cfg = load_config(base)
    plan = P.plan_run(cfg)
    ppo = plan.stages["ppo"]
    tp = ppo.role("actor").strategy.tp_degree
    assert plan.fits and tp in (2, 4, 8)
    assert {r.role: r.strategy.tp_degree for r in ppo.roles} == {"actor": tp, "critic": tp, "ref": tp, "reward": tp}
    assert ppo.generation["path"].startswith(f"tensor-parallel (TP={tp}")
    assert plan.stages["sft"].role("actor").strategy == P.Strategy(3, False, False, 0, 8)
    plan.apply(cfg)
    assert (cfg.stage.ppo.actor.strategy.tp_degree, cfg.stage.ppo.critic.strategy.tp_degree, cfg.stage.sft.strategy.tp_degree) == (tp, tp, 8)
    assert json.loads(json.dumps(plan.to_dict()))["stages"]["ppo"]["roles"][0]["tp_degree"] == tp
    from pipeline.config import validate

    validate(cfg)  # the plan's degrees pass the checks a user's would
    inp = P._inputs(load_config({**base, "stage": {"ppo": {"actor": {"lora": {"dim": 16}}, "enable_ema": True}}}))
    assert P._tp_options(inp, inp.constraint("ppo", "actor"), (inp.actor,)) == ([1], "LoRA is given (AutoTP cannot split peft's layers)")
    assert P._tp_options(inp, P._Constraint(), (inp.actor,), ema=True) == ([1], "the EMA is on (stage.ppo.enable_ema)")
    assert P._tp_options(inp, P._Constraint(), (inp.actor,)) == ([1, 2, 4, 8], "")
    gpt2 = resolve_model("opt-125m").__class__(**{**resolve_model("opt-125m").__dict__, "family": "gpt2"})
    assert P._tp_options(inp, P._Constraint(), (gpt2,))[0] == [1]


def _profile(name: str) -> dict:
    from omegaconf import OmegaConf

    from pipeline.hardware import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"))


def test_dry_run_of_opt_66b_says_which_generation_path_and_degree_and_why():
    proc = run_cli("run.dry_run=true", "+deployment=multi_node", "model.actor=opt-66b", "hardware=a100-80g", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("stage "))
    assert header.split()[:9] == ["stage", "role", "model", "params", "ZeRO", "offload", "LoRA", "grad", "ckpt"]
    assert "TP" in header.split()
    ppo_actor = next(line.split() for line in out.splitlines() if line.split()[:2] == ["ppo", "actor"])
    tp = int(ppo_actor[8])
    assert tp > 1
    line = next(line for line in out.splitlines() if line.startswith("PPO generation: "))
    assert line.startswith(f"PPO generation: tensor-parallel (TP={tp}, the lowest degree that fits): each of the {tp} ranks")
    assert "the whole actor gathered for generation would need 132.6 GiB per device (more than the 70.3 GiB usable)" in line
    assert f"ppo TP={tp} (groups of {tp} consecutive ranks in a node share one batch: {64 // tp} data-parallel replicas" in out
    assert "Plan fits." in out


# ----------------------------------------------------------------------------- 2 gloo ranks, TP=2


def tiny_models(folder: Path) -> Path:
    """The built-in tokenizer and tiny random-init OPT and LLaMA (grouped-query attention: 4 heads,
    2 key-value heads; untied head) with its vocabulary, saved once."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from pipeline.data.builtin import save_tokenizer

    save_tokenizer(folder / "tokenizer")
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
             "vocab_size": BUILTIN_VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **shape)).save_pretrained(folder / "opt")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False,
                                 **shape)).save_pretrained(folder / "llama")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tiny_models(tmp_path_factory.mktemp("tp_models"))


def clean_env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def test_engines_split_over_two_ranks_compute_what_the_unsplit_model_does(models: Path, tmp_path: Path):
    """tests/tp_ranks.py on 2 gloo ranks, both families: AutoTP splits q_proj to [32, 64]; the final
    model written right after the split equals the loaded one exactly; 3 AdamW steps give the unsplit
    model's losses and weights (written whole by save_hf, one module at a time); greedy rollouts give
    the same tokens before and after training; the next stage runs without TP (DeepSpeed's groups
    released: plain data parallelism over both ranks), the one after with TP=2 again under ZeRO-3 with
    a frozen TP=2 reference offloaded (same logits); a second degree inside one stage is refused, and
    so is its checkpoint for an engine without TP."""
    from pipeline.dist import free_port

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(ROOT / "tests" / "tp_ranks.py"), str(models), str(out)],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for res in ranks:
        for name, value in res.items():
            assert not (isinstance(value, dict) and "error" in value), f"rank {res['rank']} {name}: {value}"
        for family in ("sft_opt", "sft_llama"):
            r = res[family]
            assert r["q_proj"] == [32, 64]
            assert r["tokens"] == r["tokens_unsplit"] and r["tokens_trained"] == r["tokens_trained_unsplit"], family
            torch.testing.assert_close(r["losses"], r["losses_unsplit"], rtol=1e-4, atol=0)
        assert res["rm"]["dp_world_size"] == 2 and res["rm"]["q_proj"] == [64, 64]
        d = res["dpo"]
        assert d["frozen_logits_vs_unsplit"] < 1e-5 and d["tokens"] == d["tokens_unsplit"]
        torch.testing.assert_close(d["losses"], d["losses_unsplit"], rtol=1e-4, atol=0)
        assert d["mixed_degrees"].startswith("stage.dpo.strategy.tp_degree=1: another model of stage dpo runs with "
                                             "tensor-parallel degree 2, and DeepSpeed keeps one tensor-parallel group per process")
        assert d["checkpoint_degree"] == 2  # ZeRO-3 names: zero_pp_rank_0_mp_rank_0{0,1}_model_states.pt
        assert d["other_degree_resume"].startswith(f"{out / 'step'} was written with stage.dpo.strategy.tp_degree=2 "
                                                   "and this run has 1")
    for family in ("sft_opt", "sft_llama"):
        assert ranks[0][family]["start_written_vs_unsplit"]["max_abs"] == 0.0
    for written in (ranks[0]["sft_opt"], ranks[0]["sft_llama"], ranks[0]["dpo"]):  # at rtol 1e-4, as one_rank_and_tp2
        assert written["trained_written_vs_unsplit"]["beyond_rtol"] <= WEIGHT_ATOL, written["trained_written_vs_unsplit"]
        assert written["trained_written_vs_unsplit"]["zero_gradient_beyond_rtol"] <= ZERO_GRADIENT_ATOL
    assert ranks[0]["rm"]["loss"] != ranks[1]["rm"]["loss"]  # without TP each rank has rows of its own


# Both families through all three stages (a LLaMA actor with grouped-query attention beside an OPT reward
# model and critic, and the other way round), greedy rollouts, reward normalisation (its statistics
# gathered once per tensor-parallel group), a checkpoint at every step. The RM learning rate is low: its
# final LayerNorm bias has a true gradient of 0 (it shifts chosen and rejected scores alike), which Adam
# turns into lr-sized noise.
RUN = ["+experiment=demo", "data_blend.datasets.0.max_records=400", "run.log_interval=1",
       "stage.sft.max_steps=4", "stage.sft.per_device_train_batch_size=8",
       "stage.rm.max_steps=4", "stage.rm.per_device_train_batch_size=8", "stage.rm.optim.learning_rate=1e-4",
       "stage.ppo.max_steps=3", "stage.ppo.per_device_generation_batch_size=4", "stage.ppo.per_device_training_batch_size=2",
       "stage.ppo.generation.max_new_tokens=8", "stage.ppo.generation.do_sample=false", "stage.ppo.normalize_reward=true",
       *[f"stage.{s}.checkpoint.every_steps=1" for s in ("sft", "rm", "ppo")],
       "stage.sft.checkpoint.keep=4", "stage.ppo.checkpoint.keep=4",
       *[f"{key}.strategy.zero_stage=1" for key in ("stage.sft", "stage.rm", "stage.ppo.actor", "stage.ppo.critic")]]
TP2 = ["+deployment=single_node", "deployment.procs_per_node=2", "stage.sft.strategy.tp_degree=2",
       "stage.rm.strategy.tp_degree=2"]
PPO_TP2 = ["stage.ppo.actor.strategy.tp_degree=2", "stage.ppo.critic.strategy.tp_degree=2"]
FINALS = {"sft/final": "causal", "rm/final": "classifier", "ppo/final/actor": "causal", "ppo/final/critic": "classifier"}


def measured(rows: list[dict]) -> list[dict]:
    """Metric rows without wall-clock figures (seconds, rates, TFLOPs)."""
    return [{k: v for k, v in r.items() if not (k.endswith(("_s", "per_s")) or "tflops" in k)} for r in rows]


def final_weights(run: Path, names=tuple(FINALS)) -> dict[str, dict[str, torch.Tensor]]:
    """The final models `names` as plain from_pretrained loads them (whole: the TP shards were gathered)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loaders = {"causal": AutoModelForCausalLM, "classifier": AutoModelForSequenceClassification}
    return {name: loaders[FINALS[name]].from_pretrained(run / name).state_dict() for name in names}


RTOL, METRIC_ATOL, WEIGHT_ATOL, ZERO_GRADIENT_ATOL = 1e-4, 4 * 2.0**-21, 1e-5, 1e-4  # module docstring
ZERO_GRADIENT = ("self_attn.k_proj.bias", "rm/final model.decoder.final_layer_norm.bias")


def assert_close_metrics(a: list[dict], b: list[dict], stage: str) -> None:
    """Per-step metric rows of one rank (a) and TP=2 (b): the same steps, every float within RTOL and METRIC_ATOL."""
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b] and len(a) >= 3, stage
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if isinstance(value, float):
                assert abs(rb[key] - value) <= METRIC_ATOL + RTOL * abs(value), (stage, ra["step"], ra["split"], key,
                                                                                 value, rb[key])


def one_rank_and_tp2(given: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """The same data, seed and batches per step: one rank without TP, then 2 gloo ranks with every model
    split over both (one data-parallel replica). SFT and RM run end to end on both; PPO runs on one rank
    again from the TP=2 run's SFT and RM models (a copy of its folder: those stages are done). Asserts
    per-step SFT, RM and PPO metrics, the same rollout lengths, and the four final models loaded with
    plain from_pretrained, at the module docstring's tolerances. Returns both run folders."""
    import shutil

    from pipeline.tracking import read_metrics

    one, two, ppo_one = tmp_path / "one_rank", tmp_path / "tp2", tmp_path / "one_rank_ppo"
    proc = run_cli(*RUN, *given, "run.stages=[sft,rm]", f"run.output_dir={one}", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = run_cli(*RUN, *given, *TP2, *PPO_TP2, f"run.output_dir={two}", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--nproc_per_node=2" in proc.stdout
    plan = json.loads((two / "plan.json").read_text())["stages"]
    assert {(s, r["role"]): r["tp_degree"] for s in ("sft", "rm", "ppo") for r in plan[s]["roles"]} == {
        ("sft", "actor"): 2, ("rm", "reward"): 2, ("ppo", "actor"): 2, ("ppo", "critic"): 2, ("ppo", "ref"): 2,
        ("ppo", "reward"): 2}
    shutil.copytree(two, ppo_one, ignore=lambda folder, names: ["ppo"] if Path(folder) == two else [])
    proc = run_cli(*RUN, *given, f"run.output_dir={ppo_one}", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[sft] already done" in proc.stdout and "[rm] already done" in proc.stdout
    assert "--nproc_per_node" not in proc.stdout
    for stage, first in (("sft", one), ("rm", one), ("ppo", ppo_one)):
        assert_close_metrics(*(measured(read_metrics(run / stage / "metrics.jsonl")) for run in (first, two)), stage)
    lengths = [[r["answer_length"] for r in read_metrics(run / "ppo" / "metrics.jsonl") if r["split"] == "train"]
               for run in (ppo_one, two)]
    assert lengths[0] == lengths[1] and len(lengths[0]) == 3
    whole = {**final_weights(one, ("sft/final", "rm/final")), **final_weights(ppo_one, ("ppo/final/actor", "ppo/final/critic"))}
    split = final_weights(two)
    for name in FINALS:
        assert whole[name].keys() == split[name].keys(), name
        for key, value in whole[name].items():
            noise = any(z in f"{name} {key}" for z in ZERO_GRADIENT)
            torch.testing.assert_close(split[name][key], value, rtol=RTOL, atol=ZERO_GRADIENT_ATOL if noise else WEIGHT_ATOL,
                                       msg=lambda m, name=name, key=key: f"{name} {key}: {m}")
    return one, two


def test_two_ranks_at_tp2_train_as_one_rank_without_tp_and_resume_exactly(models: Path, tmp_path: Path):
    """A LLaMA actor and an OPT reward model and critic: one rank without TP against 2 ranks at TP=2
    (one_rank_and_tp2). Then a copy stopped after PPO step 1 (and SFT step 2) resumes to the
    uninterrupted run's metrics and weights exactly."""
    import shutil

    from pipeline.tracking import read_metrics

    given = [f"model.actor={models / 'llama'}", f"model.reward={models / 'opt'}"]
    _, two = one_rank_and_tp2(given, tmp_path)
    split = final_weights(two)
    assert list(split["ppo/final/actor"]["model.layers.0.self_attn.q_proj.weight"].shape) == [64, 64]  # written whole

    # ---- stopped after SFT step 2 and PPO step 1
    stopped = tmp_path / "stopped"
    shutil.copytree(two, stopped)
    for stage, step in (("ppo", 1), ("sft", 2)):
        shutil.rmtree(stopped / stage / "final")
        (stopped / stage / "manifest.json").unlink()
        for folder in (stopped / stage / "checkpoints").glob("step_*"):
            if int(folder.name[5:]) > step:
                shutil.rmtree(folder)
        (stopped / stage / "checkpoints" / "latest").write_text(f"step_{step:06d}")
    proc = run_cli(*RUN, *given, *TP2, *PPO_TP2, f"run.output_dir={stopped}", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[sft] resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert "[ppo] resumed from" in proc.stdout and "at step 1" in proc.stdout
    for stage in ("sft", "rm", "ppo"):
        assert measured(read_metrics(stopped / stage / "metrics.jsonl")) == measured(read_metrics(two / stage / "metrics.jsonl")), stage
    resumed = final_weights(stopped)
    for name in FINALS:
        for key, value in split[name].items():
            assert torch.equal(resumed[name][key], value), f"{name} {key}"


def test_an_opt_actor_and_a_llama_critic_at_tp2_train_as_one_rank_without_tp(models: Path, tmp_path: Path):
    """The families the other way round: an OPT actor (AutoTP's name heuristics) and a LLaMA reward
    model and critic (the HF tp_plan, grouped-query attention, the value head left whole)."""
    _, two = one_rank_and_tp2([f"model.actor={models / 'opt'}", f"model.reward={models / 'llama'}"], tmp_path)
    assert list(final_weights(two)["rm/final"]["model.layers.0.self_attn.k_proj.weight"].shape) == [32, 64]  # 2 kv heads
