"""Run by tests/test_tp.py under `torchrun --nproc_per_node 2 tests/tp_ranks.py MODELS OUT`: the
pipeline's engine code with DeepSpeed AutoTP over the 2 gloo ranks (TP=2), each check against the
same model unsplit in this process (plain torch: AdamW, gradient clipping at 1.0, the same batches).
Every rank writes OUT/rank<r>.json; the test asserts the numbers.

MODELS holds tokenizer/ (the built-in one) and opt/, llama/ (tiny random-init causal LMs, saved once).
Stages are named as the runner would run them, in one process: sft (TP=2, ZeRO-1), rm (no TP: DP
over both ranks), dpo (TP=2 again, ZeRO-3 built under zero.Init, with a frozen TP=2 ZeRO-3 +
offload reference).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from pipeline.config import ConfigError, GenerationSection, RoleSection, StrategySection, load_config
from pipeline.dist import init_distributed, rank
from pipeline.engine import inference_engine, initialize, param_groups, unwrap, zero3_construction
from pipeline.export import save_hf
from pipeline.models import RewardModel, load_causal_lm, load_tokenizer
from pipeline.resume import check_tensor_parallel, written_tp_degree
from pipeline.rollout import RolloutEngine

MODELS, OUT = Path(sys.argv[1]), Path(sys.argv[2])
STEPS, LR = 3, 1e-3


def batch(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """4 rows of 12 tokens, the last one left-padded by 3: the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def reference_losses(model, role: RoleSection, data: dict) -> list[float]:
    """STEPS updates of the unsplit model as the engine makes them: AdamW on the same parameter groups,
    the global gradient norm clipped at optim.gradient_clipping."""
    opt = torch.optim.AdamW(param_groups(model, role.optim, role.lora), lr=LR, betas=tuple(role.optim.betas))
    losses = []
    for _ in range(STEPS):
        loss = model(**data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), role.optim.gradient_clipping)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def engine_losses(engine, data: dict) -> list[float]:
    losses = []
    for _ in range(STEPS):
        loss = engine(**data).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def written_vs(folder: Path, model) -> dict[str, float]:
    """Rank 0: how far the weights save_hf wrote are from `model`'s (every key present): the largest
    difference, and the largest excess over rtol 1e-4 (|a - b| - 1e-4 * |b|; its key: worst) apart for
    OPT's k_proj.bias, whose true gradient is 0 (see tests/test_tp.py's tolerances)."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    mine = model.state_dict()
    assert set(saved) == set(mine), set(saved) ^ set(mine)
    excess = {k: float(((saved[k] - mine[k]).abs() - 1e-4 * mine[k].abs()).max()) for k in mine}
    return {"max_abs": max(float((saved[k] - mine[k]).abs().max()) for k in mine), "worst": max(excess, key=excess.get),
            "beyond_rtol": max(v for k, v in excess.items() if not k.endswith("k_proj.bias")),
            "zero_gradient_beyond_rtol": max([v for k, v in excess.items() if k.endswith("k_proj.bias")], default=0.0)}


def greedy_tokens(model, tokenizer, vocab: int) -> list[list[int]]:
    """The rollout engine's greedy answers (8 tokens) to 2 prompts, one left-padded."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = tokenizer.pad_token_id
    gen = GenerationSection(max_new_tokens=8, do_sample=False)
    return RolloutEngine(model, tokenizer, gen, show_progress=False).generate(ids, mask).tolist()


def main() -> None:
    tokenizer = load_tokenizer(str(MODELS / "tokenizer"), OUT)
    cfg = load_config({
        "model": {"actor": str(MODELS / "llama"), "reward": str(MODELS / "opt"), "tokenizer": str(MODELS / "tokenizer")},
        "hardware": {"name": "cpu", "device": "cpu"}, "run": {"dtype": "fp32", "device": "cpu"},
        "deployment": {"name": "single_node", "launcher": "torchrun", "procs_per_node": 2},
        "stage": {name: {"strategy": {"zero_stage": zero, "tp_degree": tp, "offload": False, "gradient_checkpointing": False},
                         "lora": {"dim": 0}, "optim": {"learning_rate": LR, "lr_scheduler_type": "constant"}}
                  for name, zero, tp in (("sft", 1, 2), ("rm", 1, 1), ("dpo", 3, 2))},
    })
    init_distributed(cfg)
    res: dict = {"rank": rank()}
    kept: dict = {}  # engines a later check uses

    def check(name, fn):
        try:
            res[name] = fn()
        except Exception as err:
            res[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}

    # ---- stage sft: TP=2 + ZeRO-1, tiny OPT (name heuristics) and LLaMA with GQA (HF tp_plan)
    def sft(family: str) -> dict:
        s, path = cfg.stage.sft, str(MODELS / family)
        reference = load_causal_lm(path, tokenizer)
        model = load_causal_lm(path, tokenizer)
        engine = initialize(cfg, model, s, "stage.sft", micro_batch=4, grad_accum=1, total_steps=STEPS)
        out = {"q_proj": list(next(p for n, p in unwrap(engine).named_parameters() if "q_proj.weight" in n).shape)}
        save_hf(engine, OUT / f"{family}_start", tokenizer)
        if rank() == 0:
            out["start_written_vs_unsplit"] = written_vs(OUT / f"{family}_start", reference)
        out["tokens"], out["tokens_unsplit"] = greedy_tokens(engine, tokenizer, 64), greedy_tokens(reference, tokenizer, 64)
        data = batch(64)
        out["losses"], out["losses_unsplit"] = engine_losses(engine, data), reference_losses(reference, s, data)
        save_hf(engine, OUT / f"{family}_trained", tokenizer)
        if rank() == 0:
            out["trained_written_vs_unsplit"] = written_vs(OUT / f"{family}_trained", reference)
        out["tokens_trained"], out["tokens_trained_unsplit"] = (greedy_tokens(engine, tokenizer, 64),
                                                                greedy_tokens(reference, tokenizer, 64))
        return out

    check("sft_opt", lambda: sft("opt"))
    check("sft_llama", lambda: sft("llama"))

    # ---- stage rm: no TP (the groups of sft released): DP over both ranks, each its own rows
    def rm() -> dict:
        model = RewardModel.from_base(str(MODELS / "opt"), tokenizer)
        engine = kept["rm"] = initialize(cfg, model, cfg.stage.rm, "stage.rm", micro_batch=2, grad_accum=1, total_steps=1)
        data = batch(64, seed=10 + rank())
        values = engine(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
        loss = values[:, -1].mean()
        engine.backward(loss)
        engine.step()
        return {"dp_world_size": engine.dp_world_size, "q_proj": list(unwrap(engine).base.decoder.layers[0].self_attn.q_proj.weight.shape),
                "loss": float(loss)}

    check("rm", rm)

    # ---- stage dpo: TP=2 again, ZeRO-3 under zero.Init, and a frozen TP=2 reference (ZeRO-3 + offload)
    def dpo() -> dict:
        s, path = cfg.stage.dpo, str(MODELS / "llama")
        reference = load_causal_lm(path, tokenizer)
        with zero3_construction(cfg, s.strategy):
            model = load_causal_lm(path, tokenizer)
        engine = initialize(cfg, model, s, "stage.dpo", micro_batch=4, grad_accum=1, total_steps=STEPS)
        frozen = inference_engine(cfg, lambda: load_causal_lm(path, tokenizer), s.strategy, offload=True)
        data = batch(64, seed=3)
        with torch.no_grad():
            logits = frozen(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
            logits_unsplit = reference(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        out = {"frozen_logits_vs_unsplit": float((logits - logits_unsplit).abs().max())}
        out["losses"], out["losses_unsplit"] = engine_losses(engine, data), reference_losses(reference, s, data)
        out["tokens"], out["tokens_unsplit"] = greedy_tokens(engine, tokenizer, 64), greedy_tokens(reference, tokenizer, 64)
        save_hf(engine, OUT / "llama_zero3", tokenizer)
        if rank() == 0:
            out["trained_written_vs_unsplit"] = written_vs(OUT / "llama_zero3", reference)
        # its checkpoint: resumable at TP=2, refused by key into a TP=1 engine (before DeepSpeed reads it)
        engine.save_checkpoint(str(OUT / "step" / "actor"), tag="state", save_latest=False)
        out["checkpoint_degree"] = written_tp_degree(OUT / "step" / "actor")
        check_tensor_parallel(OUT / "step", {"actor": engine}, "dpo")
        try:
            check_tensor_parallel(OUT / "step", {"actor": kept["rm"]}, "dpo")
            out["other_degree_resume"] = "accepted"
        except ConfigError as err:
            out["other_degree_resume"] = str(err)
        # another degree inside the same stage: refused by name before DeepSpeed sees it
        try:
            initialize(cfg, load_causal_lm(path, tokenizer), RoleSection(strategy=StrategySection(zero_stage=1, tp_degree=1)),
                       "stage.dpo", micro_batch=4, grad_accum=1, total_steps=1)
            out["mixed_degrees"] = "accepted"
        except ConfigError as err:
            out["mixed_degrees"] = str(err)
        return out

    check("dpo", dpo)
    (OUT / f"rank{rank()}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
