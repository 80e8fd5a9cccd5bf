"""Step 3 on one GPU: OPT-1.3B actor + OPT-350M critic/reward at DeepSpeed-Chat's single-GPU settings,
random-init weights in the real shapes, bf16, no network. See bench/README.md for how to run it.

    python bench/gpu_step3.py --out $OUT                 # on the H200 (about 3-5 minutes)
    python bench/gpu_step3.py --out $OUT --cache static  # static KV cache: transformers compiles the decode step
    python bench/gpu_step3.py --device cpu --tiny        # CPU smoke test of the same code path
    python bench/gpu_step3.py --record FILE.json         # append FILE's figures to bench/RESULTS.md

Settings (DeepSpeed-Chat training_scripts/opt/single_gpu step 3): generation batch 16 = training
batch 16, prompt 256 + answer 256 tokens, actor LoRA dim 128 on the decoder layers with the base
trained too (DeepSpeed-Chat's default; merged into the weights for generation), actor gradient
checkpointing, ZeRO 0 for both, dropout 0, generation_batches 1, ppo_epochs 1. Differences: bf16
instead of fp16, the HF generate backend (no DeepSpeed inference kernels), gradient accumulation 1
(DeepSpeed-Chat's script uses 2), random prompts of exactly 256 tokens.

Reports: generation tokens/s against the memory-bandwidth roofline (a decode step must read every
weight of the actor once: roofline tokens/s = batch x bandwidth / weight bytes; the KV cache reads
are listed apart), training TFLOPs (PPOTrainer's FLOP count of the two updates / their time)
against the measured bf16 matmul peak, end-to-end seconds per step, and peak GPU memory.
Timed: the steps after `--warmup`; model writing, loading and engine set-up are excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

OPT_1_3B = dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, ffn_dim=8192, vocab_size=50272,
                max_position_embeddings=2048, word_embed_proj_dim=2048)
OPT_350M = dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, ffn_dim=4096, vocab_size=50272,
                max_position_embeddings=2048, word_embed_proj_dim=512, do_layer_norm_before=False)
TINY_ACTOR = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, ffn_dim=512, vocab_size=50272,
                  max_position_embeddings=2048, word_embed_proj_dim=128)
TINY_REWARD = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=256, vocab_size=50272,
                   max_position_embeddings=2048, word_embed_proj_dim=64)
H200_BANDWIDTH_GBPS = 4800.0  # conf/hardware/h200-141g.yaml


class StubTokenizer:
    """What RLHFEngine / RolloutEngine read from a tokenizer: OPT's ids and vocabulary size.
    (No tokenizer files are needed on the GPU machine: prompts are random token ids.)"""

    pad_token_id, eos_token_id, bos_token_id = 1, 2, 2

    def __len__(self) -> int:
        return 50265


def matmul_peak_tflops(device: str, dtype, n: int, iters: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def copy_bandwidth_gbps(device: str, mib: int, iters: int) -> float:
    """Measured device-memory bandwidth: bytes read + written by a large copy."""
    import torch

    x = torch.empty(mib * 2**20 // 2, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 2 * iters / (time.perf_counter() - t0) / 1e9


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def write_stub_tokenizer(folder: Path) -> None:
    """A tokenizer folder that passes model.tokenizer's check: the special tokens at StubTokenizer's ids.
    The benchmark never tokenizes text, so no vocabulary file has to be carried to the GPU machine."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": StubTokenizer.pad_token_id, "</s>": StubTokenizer.eos_token_id, "<unk>": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                        pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)


def write_models(work: Path, actor_shape: dict, reward_shape: dict, dtype, device: str) -> tuple[Path, Path]:
    from common import write_opt

    from pipeline.models import RewardModel

    actor = write_opt(work / "actor", actor_shape, seed=0, dtype=dtype, device=device)
    reward_base = write_opt(work / "reward_base", reward_shape, seed=1, dtype=dtype, device=device)
    write_stub_tokenizer(work / "tokenizer")
    reward = work / "reward"
    if not (reward / "config.json").exists():
        RewardModel.from_base(str(reward_base), StubTokenizer(), "bf16" if "bfloat16" in str(dtype) else "fp32").save_pretrained(reward)
    return actor, reward


def config(work: Path, args) -> dict:
    p_len, a_len, batch = (16, 16, 4) if args.tiny else (256, 256, 16)
    lora = {"dim": 8 if args.tiny else 128, "only_optimize_lora": False,
            "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    return {
        "run": {"output_dir": str(work / "run"), "stages": ["ppo"], "dtype": args.dtype, "seed": 1234, "device": args.device},
        "model": {"actor": str(work / "actor"), "reward": str(work / "reward"), "tokenizer": str(work / "tokenizer"), "dropout": 0.0},
        "data_blend": {"max_prompt_len": p_len, "max_answer_len": a_len},
        "hardware": ({"name": "h200-141g", "device": "cuda", "memory_gib": 139.8, "bf16": True, "fp16": True,
                      "peak_tflops": 989, "bandwidth_gbps": H200_BANDWIDTH_GBPS} if args.device == "cuda"
                     else {"name": "cpu", "device": "cpu"}),
        "stage": {"ppo": {
            "per_device_generation_batch_size": batch, "per_device_training_batch_size": batch,
            "generation_batches": 1, "ppo_epochs": 1, "unsup_coef": 0.0,
            "generation": {"max_new_tokens": a_len, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "backend": "hf",
                           "merge_lora": True, "cache": args.cache},
            "actor": {"optim": {"learning_rate": 9.65e-6, "num_warmup_steps": 0}, "lora": lora,
                      "strategy": {"zero_stage": 0, "offload": False, "gradient_checkpointing": True}},
            "critic": {"optim": {"learning_rate": 5e-6, "num_warmup_steps": 0}, "lora": {"dim": 0},
                       "strategy": {"zero_stage": 0, "offload": False, "gradient_checkpointing": False}}}},
    }


def run(args) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.dist import init_distributed
    from pipeline.rlhf import PPOTrainer, RLHFEngine

    dev = args.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t_start = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak_tflops(dev, dtype, 256 if args.tiny else 8192, 5 if args.tiny else 50)
    bandwidth = copy_bandwidth_gbps(dev, 16 if args.tiny else 4096, 3 if args.tiny else 20)
    print(f"measured: matmul peak {peak:.1f} TFLOP/s ({args.dtype}), copy bandwidth {bandwidth:.0f} GB/s", flush=True)

    write_models(work, TINY_ACTOR if args.tiny else OPT_1_3B, TINY_REWARD if args.tiny else OPT_350M, dtype,
                 dev if dev == "cuda" else "cpu")
    print(f"models written ({time.time() - t_start:.0f} s)", flush=True)
    cfg = load_config(config(work, args))
    p = cfg.stage.ppo
    optimizer = "torch AdamW(fused=True)" if dev == "cuda" else "torch AdamW"
    init_distributed(cfg)
    n_steps = args.warmup + args.steps
    torch.manual_seed(0)
    engine = RLHFEngine(actor_model_name_or_path=work / "actor", critic_model_name_or_path=work / "reward",
                        tokenizer=StubTokenizer(), num_total_iters=n_steps, args=cfg)
    trainer = PPOTrainer(engine=engine, args=cfg)
    print(f"engines ready ({time.time() - t_start:.0f} s)", flush=True)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batch, p_len = p.per_device_generation_batch_size, cfg.data_blend.max_prompt_len
    gen = torch.Generator().manual_seed(0)
    t = {"step_s": 0.0, "generation_s": 0.0, "experience_s": 0.0, "training_s": 0.0, "positions": 0.0,
         "training_flops": 0.0, "answer_tokens": 0.0, "kv_bytes": 0.0, "decode_steps": 0.0}
    for s in range(n_steps):
        ids = torch.randint(3, 50265, (batch, p_len), generator=gen)
        prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        sync(dev)
        t0 = time.perf_counter()
        exp = trainer.generate_experience(prompt)
        sync(dev)
        t1 = time.perf_counter()
        trainer.train_rlhf(exp)
        sync(dev)
        t2 = time.perf_counter()
        c = trainer.pop_counters()
        new = exp.seq.shape[1] - p_len
        print(f"step {s + 1}/{n_steps}: {t2 - t0:.2f} s (generation {c['generation_s']:.2f} s for {new} tokens x {batch}, "
              f"experience {c['experience_s']:.2f} s, training {t2 - t1:.2f} s)", flush=True)
        if s >= args.warmup:
            t["step_s"] += t2 - t0
            t["generation_s"] += c["generation_s"]
            t["experience_s"] += c["experience_s"]
            t["training_s"] += t2 - t1
            t["positions"] += c["generated_positions"]
            t["decode_steps"] += new
            t["training_flops"] += c["training_flops"]
            t["answer_tokens"] += c["answer_tokens"]
    steps = args.steps
    n_actor, layers, hidden, _ = engine.sizes["actor"]
    # Merged LoRA: the generation layout holds base-shaped weights; count the base parameters only.
    base_params = sum(q.numel() for n, q in engine.actor.module.named_parameters() if "lora_" not in n)
    weight_bytes = base_params * (2 if args.dtype == "bf16" else 4)
    tokens_per_s = t["positions"] / t["generation_s"]
    nominal = H200_BANDWIDTH_GBPS if dev == "cuda" else bandwidth
    roofline = batch * nominal * 1e9 / weight_bytes
    # mean KV-cache bytes read per decode step (keys + values, every layer, average context)
    avg_ctx = p_len + (t["decode_steps"] / steps) / 2
    kv_bytes = 2 * layers * hidden * avg_ctx * batch * (2 if args.dtype == "bf16" else 4)
    result = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "tiny": args.tiny, "dtype": args.dtype,
        "batch": batch, "prompt_len": p_len, "max_new_tokens": p.generation.max_new_tokens, "steps": steps,
        "warmup": args.warmup, "step_s": t["step_s"] / steps,
        "generation_frac": t["generation_s"] / t["step_s"], "experience_frac": t["experience_s"] / t["step_s"],
        "training_frac": t["training_s"] / t["step_s"],
        "generation_tokens_per_s": tokens_per_s, "ms_per_decode_step": 1e3 * t["generation_s"] / t["decode_steps"],
        "actor_weight_bytes": weight_bytes, "kv_bytes_per_decode_step": kv_bytes,
        "bandwidth_nominal_gbps": nominal, "bandwidth_measured_gbps": bandwidth,
        "roofline_tokens_per_s": roofline, "roofline_frac": tokens_per_s / roofline,
        "roofline_frac_measured_bw": tokens_per_s / (batch * bandwidth * 1e9 / weight_bytes),
        "training_tflops": t["training_flops"] / t["training_s"] / 1e12, "matmul_peak_tflops": peak,
        "training_mfu": t["training_flops"] / t["training_s"] / 1e12 / peak,
        "answer_len": t["answer_tokens"] / (steps * batch),
        "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30) if dev == "cuda" else None,
        "total_s": time.time() - t_start, "actor_params": n_actor, "optimizer": optimizer, "cache": args.cache,
    }
    return result


def report(r: dict) -> str:
    return "\n".join([
        f"device {r['device']}, {r['dtype']}, batch {r['batch']}, prompt {r['prompt_len']} + answer {r['max_new_tokens']}, "
        f"{r['steps']} timed steps after {r['warmup']} warm-up; optimizer {r.get('optimizer', '-')}; "
        f"{r.get('cache', 'dynamic')} KV cache",
        f"end-to-end        {r['step_s']:.2f} s/step (generation {100 * r['generation_frac']:.0f}%, experience forwards "
        f"{100 * r['experience_frac']:.0f}%, training {100 * r['training_frac']:.0f}%)",
        f"generation        {r['generation_tokens_per_s']:.0f} tokens/s, {r['ms_per_decode_step']:.1f} ms per decode step; "
        f"roofline {r['roofline_tokens_per_s']:.0f} tokens/s ({r['actor_weight_bytes'] / 2**30:.2f} GiB of weights per "
        f"step at {r['bandwidth_nominal_gbps']:.0f} GB/s) -> {100 * r['roofline_frac']:.1f}% "
        f"({100 * r['roofline_frac_measured_bw']:.1f}% of the measured {r['bandwidth_measured_gbps']:.0f} GB/s); "
        f"KV cache adds {r['kv_bytes_per_decode_step'] / 2**20:.0f} MiB per step (not in the roofline)",
        f"training          {r['training_tflops']:.1f} TFLOP/s = {100 * r['training_mfu']:.1f}% of the measured matmul peak "
        f"{r['matmul_peak_tflops']:.3g} TFLOP/s",
        f"peak GPU memory   {r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "peak GPU memory   - (cpu)",
        f"targets: generation >= 30% of the roofline: {'met' if r['roofline_frac'] >= 0.3 else 'NOT met'}",
    ])


def record(r: dict) -> None:
    from common import append_result

    append_result(
        "GPU step 3: OPT-1.3B actor + OPT-350M critic/reward (one H200)",
        "`python bench/gpu_step3.py` (bench/README.md): random-init weights in the real shapes, bf16, DeepSpeed-Chat's "
        "single-GPU step-3 settings (batch 16, prompt 256 + answer 256, actor LoRA 128 + gradient checkpointing, "
        "ZeRO 0), HF generate backend. Roofline = batch x HBM bandwidth / actor weight bytes per decode step.",
        ["device", "KV cache", "s/step", "gen / exp / train", "gen tokens/s", "% of roofline (nominal / measured BW)",
         "training TFLOP/s", "% of matmul peak", "peak GiB"],
        [r["device"], r.get("cache", "dynamic"), f"{r['step_s']:.2f}", f"{100 * r['generation_frac']:.0f}% / {100 * r['experience_frac']:.0f}% / "
         f"{100 * r['training_frac']:.0f}%", f"{r['generation_tokens_per_s']:.0f}",
         f"{100 * r['roofline_frac']:.1f}% / {100 * r['roofline_frac_measured_bw']:.1f}%",
         f"{r['training_tflops']:.1f}", f"{100 * r['training_mfu']:.1f}% of {r['matmul_peak_tflops']:.0f}",
         f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and lengths (CPU smoke test)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--work", default="/tmp/gpu_step3")
    ap.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="stage.ppo.generation.cache")
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="write gpu_step3.json and .txt here (gpu_step3_static.* with --cache static)")
    ap.add_argument("--record", metavar="JSON", help="append a result file to bench/RESULTS.md and exit")
    args = ap.parse_args()
    if args.record:
        r = json.loads(Path(args.record).read_text())
        print(report(r))
        record(r)
        return
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    r = run(args)
    text = report(r)
    print(text, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "gpu_step3" if args.cache == "dynamic" else f"gpu_step3_{args.cache}"
        (out / f"{name}.json").write_text(json.dumps(r, indent=1))
        (out / f"{name}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
