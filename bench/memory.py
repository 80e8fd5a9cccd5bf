"""Memory model vs measurement: peak memory of real training steps, predicted vs measured.

    python bench/memory.py            # CPU: peak RSS of one process per shape (fp32, AdamW)
    python bench/memory.py --gpu      # CUDA: torch.cuda.max_memory_allocated, bf16, OPT-125m..1.3b
    python bench/memory.py --tp 2     # CPU: peak RSS per rank of 2 gloo ranks under DeepSpeed AutoTP
    python bench/memory.py --tp 1     # the same harness on one rank without tensor parallelism
    python bench/memory.py --tp 2 --parts   # the full-size step taken apart (step_parts)

Each shape runs in its own subprocess: a random-init OPT built from OPTConfig (dropout 0, as
the pipeline's model.dropout=0.0), plain torch AdamW, gradients kept between steps
(zero_grad(set_to_none=False), like DeepSpeed's persistent gradient buffers). The optimizer
states are created by a warm-up step on a tiny batch, then the measured step runs at full size.
Measured = peak minus the baseline taken after imports and a warm-up op, before the model exists;
glibc is told to return freed large blocks to the system (MALLOC_MMAP_THRESHOLD_), so the peak counts
live tensors, not freed blocks glibc keeps in its heap (0.2-0.35 GiB more on these shapes without it).
Predicted = pipeline.planner's formulas for a trained model at ZeRO-0 (params + grads + Adam
states + training activations); the planner adds headroom and runtime overhead on top of it.

--tp N: each shape runs under torchrun on N gloo ranks through the pipeline's own engine set-up
(pipeline.engine.initialize: DeepSpeed ZeRO-0 with "tensor_parallel": {"autotp_size": N}, torch
AdamW, gradient clipping), the model built whole on every rank as from_pretrained leaves it, then
split by deepspeed.initialize. The peak is taken over the steps only (VmHWM reset after the warm-up
step, /proc/self/clear_refs): the whole model a rank holds for a moment before the split is a load
transient the planner does not size. glibc is told to return freed large blocks to the system
(MALLOC_MMAP_THRESHOLD_), so the freed whole weights do not stay in the RSS. Measured = the larger
rank's peak minus its RSS before the model existed. Predicted = the planner's tensor-parallel terms:
weights, gradients and Adam states of P_t = split / N + whole parameters, training activations at
degree N, and DeepSpeed's ZeRO-0 reduce bucket as a transient beside them (the larger of the two:
pipeline.planner.training_transient_bytes). --parts adds, per shape, what autograd keeps (saved-tensor
hooks), the gradients and Adam states the engine holds, and the peak of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name, layers, hidden, heads, ffn, vocab, batch, seq, grad_ckpt
CPU_SHAPES = [
    ("L4-h256-V50k", 4, 256, 4, 1024, 50272, 8, 256, False),
    ("L8-h1024-V8k", 8, 1024, 16, 4096, 8192, 4, 512, False),
    ("L8-h1024-V8k ckpt", 8, 1024, 16, 4096, 8192, 4, 512, True),
    ("opt-125m", 12, 768, 12, 3072, 50272, 4, 256, False),
    ("opt-125m ckpt", 12, 768, 12, 3072, 50272, 4, 256, True),
]
GPU_SHAPES = [
    ("opt-125m", 12, 768, 12, 3072, 50272, 8, 512, False),
    ("opt-350m*", 24, 1024, 16, 4096, 50272, 8, 512, False),  # without the 512-d embedding projection
    ("opt-1.3b", 24, 2048, 32, 8192, 50272, 8, 512, False),
    ("opt-1.3b ckpt", 24, 2048, 32, 8192, 50272, 8, 512, True),
]


def _spec(layers, hidden, heads, ffn, vocab):
    from pipeline.catalog import ModelSpec

    return ModelSpec(name="bench", source="builtin:bench", family="opt", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, ffn_dim=ffn, vocab_size=vocab, max_positions=2048)


def predict(layers, hidden, heads, ffn, vocab, batch, seq, ckpt, dtype):
    from pipeline import planner as P

    spec = _spec(layers, hidden, heads, ffn, vocab)
    n = spec.num_params()
    st = P.trained_state_bytes(n, n, dtype, 0, False, 1)
    act = P.training_activation_bytes(spec, batch, seq, dtype, grad_ckpt=ckpt, lm_head=True, dropout=False)
    return {"params": n, "state": st["params"] + st["grads"] + st["optimizer"], "act": act,
            "total": st["params"] + st["grads"] + st["optimizer"] + act}


def predict_tp(layers, hidden, heads, ffn, vocab, batch, seq, ckpt, tp):
    from pipeline import planner as P

    spec = _spec(layers, hidden, heads, ffn, vocab)
    n = P.tensor_parallel_params(spec, tp)
    st = P.trained_state_bytes(n, n, "fp32", 0, False, 1)
    buf = P.comm_buffer_bytes(spec, n, n, "fp32", 0, tp, True, tp)
    act = P.training_activation_bytes(spec, batch, seq, "fp32", grad_ckpt=ckpt, lm_head=True, dropout=False, tp=tp)
    resident, transient = P.training_transient_bytes(act, buf, 0)
    state = st["params"] + st["grads"] + st["optimizer"] + resident
    return {"params": spec.num_params(), "local_params": n, "state": state, "act": act, "bucket": buf,
            "total": state + transient}


def _hwm() -> int:
    """This process's peak RSS since the last reset_hwm (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tp_child(args: dict, out: Path) -> None:
    """One rank of a --tp run (under torchrun): writes out/rank<r>.json."""
    import gc

    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from pipeline.config import load_config
    from pipeline.dist import init_distributed, rank
    from pipeline.engine import initialize

    tp = args["tp"]
    torch.manual_seed(0)
    cfg = load_config({"hardware": {"name": "cpu", "device": "cpu"}, "run": {"dtype": "fp32", "device": "cpu"},
                       "deployment": {"name": "single_node", "launcher": "torchrun", "procs_per_node": tp},
                       "stage": {"sft": {"strategy": {"zero_stage": 0, "tp_degree": tp, "offload": False,
                                                      "gradient_checkpointing": args["ckpt"]},
                                         "lora": {"dim": 0}, "optim": {"learning_rate": 1e-5, "lr_scheduler_type": "constant"}}}},
                      check_paths=False)
    init_distributed(cfg)
    x = torch.randn(256, 256)
    (x @ x).sum().item()
    del x
    base = _rss()
    model = OPTForCausalLM(OPTConfig(num_hidden_layers=args["layers"], hidden_size=args["hidden"],
                                     num_attention_heads=args["heads"], ffn_dim=args["ffn"], vocab_size=args["vocab"],
                                     max_position_embeddings=2048, word_embed_proj_dim=args["hidden"], dropout=0.0,
                                     attention_dropout=0.0, activation_dropout=0.0))
    model.config.use_cache = False
    engine = initialize(cfg, model, cfg.stage.sft, "stage.sft", micro_batch=args["batch"], grad_accum=1, total_steps=10)
    engine.train()

    def step(b, s):
        ids = torch.randint(0, args["vocab"], (b, s), generator=torch.Generator().manual_seed(b * s))  # same on every rank
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    step(1, 8)  # optimizer states and DeepSpeed's buffers
    gc.collect()
    local = sum(p.numel() for p in engine.module.parameters())
    if args.get("parts"):
        result = step_parts(engine, args, base)
    else:
        reset_hwm()
        t = time.time()
        step(args["batch"], args["seq"])
        result = {"measured": _hwm() - base, "seconds": time.time() - t}
    (out / f"rank{rank()}.json").write_text(json.dumps({**result, "local_params": local}))


def step_parts(engine, args: dict, base: int) -> dict:
    """The full-size step of a --tp run, taken apart (bytes): what autograd keeps for the backward
    (unique storages, parameters excluded), by module suffix summed over the layers; the peak RSS above
    `base` in the forward + loss, in engine.backward (which flattens every gradient into DeepSpeed's
    reduce bucket, at any world size) and in engine.step; the gradients as backward leaves them;
    weights and AdamW states as the engine holds them."""
    import re

    import torch

    stack, saved = ["(outside)"], {}
    params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}

    def push(module, *_):
        stack.append(names[module])

    def pop(*_):
        stack.pop()

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in saved:
            saved[ptr] = (storage.nbytes(), re.sub(r"^.*layers\.\d+\.", "layer.", stack[-1]))
        return t

    names = {m: n or "(model)" for n, m in engine.module.named_modules()}
    hooks = [h for m in names for h in (m.register_forward_pre_hook(push), m.register_forward_hook(pop))]
    ids = torch.randint(0, args["vocab"], (args["batch"], args["seq"]), generator=torch.Generator().manual_seed(7))
    phases = {}
    t = time.time()
    reset_hwm()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = engine(input_ids=ids, labels=ids).loss
    phases["forward"] = _hwm() - base
    for h in hooks:
        h.remove()
    by_module: dict[str, int] = {}
    for nbytes, name in saved.values():
        by_module[name] = by_module.get(name, 0) + nbytes
    reduce = engine.allreduce_gradients

    def timed_reduce(*a, **k):  # the bucket flattening, after autograd's backward
        phases["backward"] = _hwm() - base
        reset_hwm()
        reduce(*a, **k)
        phases["reduce"] = _hwm() - base

    engine.allreduce_gradients = timed_reduce
    reset_hwm()
    engine.backward(loss)
    engine.allreduce_gradients = reduce
    if "reduce" not in phases:  # one rank: DeepSpeed skips the all-reduce
        phases["backward"] = _hwm() - base
    grads = sum(p.grad.nbytes for p in engine.module.parameters() if p.grad is not None)
    reset_hwm()
    engine.step()
    phases["step"] = _hwm() - base
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    states = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return {"measured": max(phases.values()), "seconds": time.time() - t, "phases": phases, "saved": sum(by_module.values()), "saved_by_module": by_module,
            "grads": grads, "weights": sum(p.nbytes for p in engine.module.parameters()), "optimizer": states,
            "logits": args["batch"] * args["seq"] * args["vocab"] * 4}


def run_tp(shapes, tp: int, parts: bool = False) -> list[dict]:
    """Every shape on tp gloo ranks (torchrun), predicted vs measured (parts: taken apart, in GiB)."""
    import tempfile

    from pipeline.dist import free_port

    rows = []
    print(f"{'shape':20s} {'params':>8s} {'per rank':>8s} {'b x s':>8s} {'pred GiB':>9s} {'meas GiB':>9s} {'ratio':>6s}"
          f"  (state / act pred)")
    for name, L, h, heads, f, V, b, s, ck in shapes:
        args = dict(layers=L, hidden=h, heads=heads, ffn=f, vocab=V, batch=b, seq=s, ckpt=ck, tp=tp, parts=parts)
        pred = predict_tp(L, h, heads, f, V, b, s, ck, tp)
        with tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   "MALLOC_MMAP_THRESHOLD_": "65536", "DS_ACCELERATOR": "cpu",
                   "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // tp))}
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}",
                                   f"--master_port={free_port()}", __file__, "--tp-child", json.dumps(args), "--out", out],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                print(name, "failed:", proc.stderr[-2000:])
                continue
            ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(tp)]
        assert all(r["local_params"] == pred["local_params"] for r in ranks), ([r["local_params"] for r in ranks], pred)
        measured = max(r["measured"] for r in ranks)
        ratio = pred["total"] / measured
        rows.append({"shape": name, "params": pred["params"], "local_params": pred["local_params"], "batch": b, "seq": s,
                     "grad_ckpt": ck, "tp": tp, "predicted_gib": pred["total"] / 2**30, "measured_gib": measured / 2**30,
                     "ratio": ratio, "step_s": max(r["seconds"] for r in ranks)})
        print(f"{name:20s} {pred['params'] / 1e6:7.1f}M {pred['local_params'] / 1e6:7.1f}M {b:>3d}x{s:<4d} "
              f"{pred['total'] / 2**30:9.2f} {measured / 2**30:9.2f} {ratio:6.2f}  "
              f"({pred['state'] / 2**30:.2f} / {pred['act'] / 2**30:.2f})", flush=True)
        if parts:
            r = max(ranks, key=lambda r: r["measured"])
            rows[-1]["parts"] = {k: r[k] for k in ("phases", "saved", "saved_by_module", "grads", "weights", "optimizer")}
            gib = {k: round(v / 2**30, 3) for k, v in {**r["phases"], "saved": r["saved"], "weights": r["weights"],
                                                         "grads": r["grads"], "adam": r["optimizer"],
                                                         "pred act": pred["act"], "pred bucket": pred["bucket"]}.items()}
            print("    GiB:", ", ".join(f"{k} {v}" for k, v in gib.items()))
            print("    saved:", ", ".join(f"{k} {v / 2**20:.0f}M" for k, v in r["saved_by_module"].items() if v > 2**20))
    return rows


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: dict) -> dict:
    import resource

    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from pipeline.engine import set_activation_checkpointing

    gpu = args["gpu"]
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if gpu else "cpu"
    # warm-up op so thread pools / kernels exist before the baseline
    x = torch.randn(256, 256, device=dev)
    (x @ x).sum().item()
    del x
    cfg = OPTConfig(num_hidden_layers=args["layers"], hidden_size=args["hidden"], num_attention_heads=args["heads"],
                    ffn_dim=args["ffn"], vocab_size=args["vocab"], max_position_embeddings=2048,
                    word_embed_proj_dim=args["hidden"], dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    model = OPTForCausalLM(cfg).to(dev)
    if gpu:
        model = model.to(torch.bfloat16)  # bf16 weights/grads; fp32 Adam states kept by hand below
    if args["ckpt"]:
        set_activation_checkpointing(model, True)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters()]
    if gpu:
        # Mixed precision like DeepSpeed: fp32 master copy + AdamW moments (12 B/param).
        master = [p.detach().float().clone().requires_grad_(True) for p in params]
        opt = torch.optim.AdamW(master, lr=1e-5, foreach=False)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)

    def step(b, s):
        ids = torch.randint(0, args["vocab"], (b, s), device=dev)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if gpu:
            for m, p in zip(master, params):
                m.grad = p.grad.float() if m.grad is None else m.grad.copy_(p.grad)
            opt.step()
            with torch.no_grad():
                for m, p in zip(master, params):
                    p.copy_(m)
        else:
            opt.step()
        opt.zero_grad(set_to_none=False)
        model.zero_grad(set_to_none=False)

    step(1, 8)  # creates optimizer states and gradient buffers
    t = time.time()
    step(args["batch"], args["seq"])
    secs = time.time() - t
    if gpu:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"measured": peak, "seconds": secs, "actual_params": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--tp", type=int, help="tensor-parallel degree: that many gloo ranks per shape through DeepSpeed (CPU)")
    ap.add_argument("--parts", action="store_true", help="with --tp: each step taken apart")
    ap.add_argument("--child")
    ap.add_argument("--tp-child")
    ap.add_argument("--out")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    if a.tp is not None:
        bad = [(name, heads) for name, _, _, heads, *_ in CPU_SHAPES if a.tp < 1 or heads % a.tp]
        if bad:
            ap.error(f"--tp {a.tp}: must be >= 1 and divide every shape's attention heads "
                     f"({', '.join(f'{name}: {heads}' for name, heads in bad)})")
    if a.parts and not a.tp:
        ap.error("--parts takes a --tp run apart; add --tp 1 or --tp 2")
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    if a.tp_child:
        tp_child(json.loads(a.tp_child), Path(a.out))
        return
    if a.tp:
        rows = run_tp(CPU_SHAPES, a.tp, a.parts)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
        if len(rows) < len(CPU_SHAPES):
            sys.exit(f"{len(CPU_SHAPES) - len(rows)} of {len(CPU_SHAPES)} shapes failed (their errors are above)")
        return
    shapes = GPU_SHAPES if a.gpu else CPU_SHAPES
    dtype = "bf16" if a.gpu else "fp32"
    rows = []
    print(f"{'shape':20s} {'params':>8s} {'b x s':>8s} {'pred GiB':>9s} {'meas GiB':>9s} {'ratio':>6s}  (state / act pred)")
    for name, L, h, heads, f, V, b, s, ck in shapes:
        args = dict(layers=L, hidden=h, heads=heads, ffn=f, vocab=V, batch=b, seq=s, ckpt=ck, gpu=a.gpu)
        pred = predict(L, h, heads, f, V, b, s, ck, dtype)
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                                  "MALLOC_MMAP_THRESHOLD_": "65536"})
        if out.returncode:
            print(name, "failed:", out.stderr[-2000:])
            continue
        m = json.loads(out.stdout.strip().splitlines()[-1])
        assert m["actual_params"] == pred["params"], (m["actual_params"], pred["params"])
        ratio = pred["total"] / m["measured"]
        rows.append({"shape": name, "params": pred["params"], "batch": b, "seq": s, "grad_ckpt": ck,
                     "predicted_gib": pred["total"] / 2**30, "measured_gib": m["measured"] / 2**30, "ratio": ratio,
                     "step_s": m["seconds"]})
        print(f"{name:20s} {pred['params'] / 1e6:7.1f}M {b:>3d}x{s:<4d} {pred['total'] / 2**30:9.2f} "
              f"{m['measured'] / 2**30:9.2f} {ratio:6.2f}  ({pred['state'] / 2**30:.2f} / {pred['act'] / 2**30:.2f})",
              flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if len(rows) < len(shapes):
        sys.exit(f"{len(shapes) - len(rows)} of {len(shapes)} shapes failed (their errors are above)")


if __name__ == "__main__":
    main()
