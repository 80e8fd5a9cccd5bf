"""The memory model: bytes one device (and its host) holds for a model in a layout. Pure arithmetic.

Memory model (bytes on one device; P = parameters, d = bytes per element of the compute dtype:
2 for bf16/fp16, 4 for fp32; N = data-parallel world size = world / t; t = tensor-parallel degree)
-----------------------------------------------------------------------------------------
Trained model, mixed precision (bf16/fp16), after DeepSpeed's ZeRO paper (Rajbhandari et al.):
    weights d*P = 2P, gradients 2P, Adam fp32 master copy + momentum + variance = 4+4+4 = 12P,
    so 16 bytes/param in all. bf16 at ZeRO 0/1 runs DeepSpeed's BF16_Optimizer, which keeps an
    extra fp32 gradient accumulator (+4P: 20 bytes/param).
Trained model, fp32: weights 4P, gradients 4P, Adam momentum + variance 8P (no master copy) = 16P.
ZeRO shards over N: stage 1 the optimizer states (12P/N), stage 2 also the gradients (2P/N),
    stage 3 also the weights (2P/N).
Offload (`strategy.offload`, ZeRO >= 1): optimizer states and the fp32 gradient partition move
    to host RAM (ZeRO-Offload: 16 bytes/param/N there); with ZeRO-3 the weights too
    (ZeRO-Infinity style, d*P/N of host RAM).
LoRA (dim r): the base weights are frozen (d*P, no gradient, no optimizer state); the adapters
    (r*(in+out) per targeted Linear: r*(10h+2f) per OPT layer) are trained at the full 16 bytes.
Communication buffers: ZeRO 1-2 with N > 1 hold one gradient reduce bucket (min(P, 5e8) elements
    of d, DeepSpeed's default reduce_bucket_size). ZeRO-0 with N > 1 flattens the gradients into such
    a bucket (engine.buffered_allreduce_fallback) after autograd's backward has freed the activations:
    a training transient, max(activations, bucket), not resident (measured, bench/memory.py --parts:
    the reduce phase holds weights + Adam states + gradients + bucket and < 0.05 GiB more; the
    forward's peak no bucket). With N = 1 (one rank, or one tensor-parallel group) pipeline.engine
    turns that all-reduce off: it would only copy every gradient. ZeRO-3 gathers one module at a
    time (prefetch is off, see engine.ds_config) and keeps a weight used twice in a forward (OPT's
    tied embedding and LM head) until its second use: budgeted as 2 * max(layer, embedding) * d,
    which covers both.
Frozen models (PPO reference, reward): d*P, sharded when their trained partner runs ZeRO-3 (ref
    follows the actor, reward the critic, as DeepSpeed-Chat). Offloaded (stage.ppo.offload_reference_model,
    offload_reward_model: a ZeRO-3 inference engine with parameter offload, at any partner layout)
    their weights sit in host RAM (d*P/N) and the device holds only the gather buffers.
EMA of the actor: an fp32 average of its trainable parameters (all P, or with LoRA the adapters
    only), 4 bytes each, over N under ZeRO-3 (each rank averages its partition); in host RAM when
    the actor or the reference model is offloaded.
Activations per transformer layer (Korthikanti et al. 2022, "Reducing Activation Recomputation"),
    per token in elements of d: attention 3h + 2*kv (QKV input, Q, K, V, out-proj input),
    MLP h + 2f (input, fc1 output, GeLU output; SwiGLU: h + 4f), LayerNorms 2h; for a GeLU model
    (f = 4h, kv = h) that is 16h elements = 34*s*b*h bytes minus the two dropout masks. OPT's MLP is
    h + f: its ReLU keeps only its output for the backward, which fc2 keeps too, and nothing keeps
    fc1's output (measured with saved-tensor hooks, bench/memory.py --parts: 12h per OPT layer).
    Dropout adds 2 bytes/token*h of masks. Eager attention adds the softmax a*s*s*b elements (and
    with attention dropout its output and mask: the paper's 5*a*s/h term); SDPA / flash attention
    (the default for transformers' OPT and LLaMA) stores none of it, so it is off by default.
    Gradient checkpointing keeps only each layer's input (d*s*b*h per layer) plus one layer's full
    activations during its recompute.
    Language-model head: logits s*b*V in d plus fp32 copies for the loss (upcast, log-softmax and
    its gradient): (d + 8) bytes per logit. Value heads: negligible.
Generation (PPO actor): KV cache 2 * layers * b * s * kv_heads*head_dim * d; with ZeRO-3 the
    rollout engine gathers the whole actor once per generation call (d*P on each device) when that
    fits, else fetches it module by module at every decode step (slow; never from host RAM, so not
    with parameter offload unless asked): Plan.apply writes the choice to
    stage.ppo.generation.gather_weights, which the rollout engine follows.
Tensor parallelism (DeepSpeed AutoTP, degree t; measured layouts in the TP research):
    split by t: every attention and MLP Linear: OPT q/k/v/out_proj and fc1/fc2 weights, q/k/v and
    fc1 biases; LLaMA q/k/v/o, gate/up/down, and an untied lm_head. Left whole on every rank: the
    embeddings (and OPT's positions, project_in/out), the LayerNorms, the row-parallel biases (OPT's
    out_proj.bias, fc2.bias), a tied LM head, the value head. Per rank P_t = split / t + whole
    (tensor_parallel_params; OPT-66B at t=8: 65.2e9 / 8 + 0.49e9 = 8.64e9); weights, gradients and
    optimizer states follow P_t, and ZeRO then partitions them over the N = world / t data-parallel
    ranks. The degree must divide the heads (enforced), so the split is even.
    Activations per layer: Q, K, V, the attention context and the MLP intermediates are split; the
    layer inputs, LayerNorm inputs and the residual stream stay whole (no sequence parallelism):
    per token 4h whole + (2h + 2kv + 2f) / t (OPT: f, SwiGLU: 4f); logits stay whole (an untied LLaMA
    head's V / t slice is all-gathered, so that slice comes on top). All-reduces (2 per layer forward,
    one per column-parallel Linear backward) run in place on the Linear's output or input gradient:
    no buffer (measured: the bytes autograd keeps outside the split terms, and the forward's transient
    above them, are the same at TP=2 as at TP=1, bench/memory.py --parts). The KV cache is split
    (kv heads / t). ZeRO-3 gathers each rank's shards only: generation gathering the actor holds P_t.
PPO peak = every model's resident state + max(generation, experience forward, training), since
    the phases run one after another (actor and critic backward are also sequential).
Fit: peak <= (1 - HEADROOM) * device memory - fixed overhead (CUDA context, cuBLAS/NCCL
    workspaces and allocator fragmentation: 1 GiB on GPU; the torch runtime: 0.5 GiB per CPU
    process). On CPU, the device memory is the job's RAM shared by the processes on a node.
"""

from __future__ import annotations

from pipeline.catalog import ModelSpec

GIB = 2**30
HEADROOM = 0.10
OVERHEAD_GIB = {"cuda": 1.0, "cpu": 0.5}
DEFAULT_LORA_DIM = 128
REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size, elements
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# MLP intermediates (f wide) a layer keeps for its backward: OPT's ReLU keeps its output only (fc1's
# output is dropped), SwiGLU keeps the gate and up outputs, the SiLU output and their product; a GeLU
# MLP (the default) keeps fc1's output and the GeLU's.
MLP_KEPT = {"opt": 1, "llama": 4}
# Assumed host RAM per node, as a multiple of the node's total GPU memory, when the profile
# does not say (DGX A100/H100: 2 TB for 640 GB of GPU memory).
HOST_RAM_PER_GPU_RAM = 3.0


def lora_params(spec: ModelSpec, dim: int) -> int:
    """Trainable adapter parameters for LoRA of rank `dim` on every attention and MLP Linear.

    A Linear(in, out) gets A (dim x in) and B (out x dim): dim * (in + out).
    OPT layer: q, k, v, out (h -> h) and fc1 (h -> f), fc2 (f -> h): dim * (10h + 2f).
    LLaMA layer: q, o (h -> h), k, v (h -> kv), gate, up (h -> f), down (f -> h): dim * (9h + 2kv + 3f).
    """
    if dim <= 0:
        return 0
    h, f = spec.hidden_size, spec.ffn_dim
    if spec.family == "llama":
        kv = (spec.num_kv_heads or spec.num_heads) * (h // spec.num_heads)
        per_layer = 9 * h + 2 * kv + 3 * f
    else:
        per_layer = 10 * h + 2 * f
    return dim * per_layer * spec.num_layers


def reward_params(spec: ModelSpec) -> int:
    """A reward / critic model: the transformer without LM head plus a Linear(h, 1) value head."""
    head = 0 if spec.tied_embeddings else spec.vocab_size * spec.hidden_size
    return spec.num_params() - head + spec.hidden_size


def layer_params(spec: ModelSpec) -> int:
    h, f = spec.hidden_size, spec.ffn_dim
    kv = (spec.num_kv_heads or spec.num_heads) * (h // spec.num_heads)
    if spec.family == "llama":
        return 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return 4 * (h * h + h) + 2 * h * f + f + h + 4 * h


def tensor_parallel_split(spec: ModelSpec, lm: bool = True) -> tuple[int, int]:
    """(parameters AutoTP splits over the tensor-parallel ranks, parameters it leaves whole on each) of
    a causal LM, or (lm=False) of its reward model: no LM head, a Linear(h, 1) value head. They add up
    to spec.num_params() (reward_params(spec)).

    LLaMA layer: q, o (h x h), k, v (kv x h), gate, up, down (h x f) split; 2 RMSNorms (h) whole;
    embedding and final norm whole; an untied lm_head split (column-parallel), a tied one whole.
    OPT layer: q, k, v, out_proj (h x h) and fc1, fc2 (h x f) weights, q/k/v and fc1 biases split
    (4h^2 + 3h + 2hf + f); out_proj and fc2 biases and 2 LayerNorms whole (6h); token and position
    embeddings, project_in/out, the final LayerNorm and the tied head whole.
    """
    h, f, n, v = spec.hidden_size, spec.ffn_dim, spec.num_layers, spec.vocab_size
    if spec.family == "llama":
        kv = (spec.num_kv_heads or spec.num_heads) * (h // spec.num_heads)
        split = n * (2 * h * h + 2 * h * kv + 3 * h * f) + (v * h if lm and not spec.tied_embeddings else 0)
    else:
        split = n * (4 * h * h + 3 * h + 2 * h * f + f)
    total = spec.num_params() if lm else reward_params(spec)
    return split, total - split


def tensor_parallel_params(spec: ModelSpec, tp: int, lm: bool = True) -> float:
    """Parameters on one rank of a tensor-parallel group of tp: split / tp + whole."""
    split, whole = tensor_parallel_split(spec, lm)
    return split / max(1, tp) + whole


def trained_state_bytes(n_params: int, n_trainable: int, dtype: str, zero: int, offload: bool,
                        world: int) -> dict[str, float]:
    """Weights, gradients and optimizer states of a trained model on one device, and in host RAM.

    n_params counts every weight (frozen base + adapters) on one rank (under tensor parallelism its
    shards: tensor_parallel_params); n_trainable those with gradients; world the data-parallel ranks
    ZeRO partitions over (world / tp). Returns {"params", "grads", "optimizer", "host"} in bytes
    (host: per rank).
    """
    d = DTYPE_BYTES[dtype]
    n = max(1, world)
    mixed = dtype != "fp32"
    offload = offload and zero >= 1
    params = n_params * d / (n if zero >= 3 else 1)
    grads = n_trainable * d / (n if zero >= 2 else 1)
    if mixed and dtype == "bf16" and zero <= 1:
        grads += n_trainable * 4  # BF16_Optimizer's fp32 gradient accumulator
    optim = n_trainable * (12 if mixed else 8) / (n if zero >= 1 else 1)
    host = 0.0
    if offload:
        # ZeRO-Offload: optimizer states and the fp32 gradient partition live in host RAM;
        # the device keeps only its low-precision gradient partition while it is reduced.
        host += optim + n_trainable * 4 / n
        optim = 0.0
        grads = n_trainable * d / n if zero >= 2 else grads
        if zero >= 3:
            host += params
            params = 0.0
    return {"params": params, "grads": grads, "optimizer": optim, "host": host}


def frozen_state_bytes(n_params: int, dtype: str, zero: int, offload: bool, world: int) -> dict[str, float]:
    """A frozen model (reference, reward): weights only, sharded with ZeRO-3, in host RAM with offload."""
    d = DTYPE_BYTES[dtype]
    params = n_params * d / (max(1, world) if zero >= 3 else 1)
    host = 0.0
    if zero >= 3 and offload:
        host, params = params, 0.0
    return {"params": params, "grads": 0.0, "optimizer": 0.0, "host": host}


def comm_buffer_bytes(spec: ModelSpec, n_params: int, n_trainable: int, dtype: str, zero: int,
                      world: int, trained: bool, tp: int = 1) -> float:
    """ZeRO-3 gather buffers (current + prefetched layer; under tensor parallelism a layer's shards
    and its whole parts) or the ZeRO 0-2 reduce bucket (ZeRO-0: with more than one data-parallel
    replica, a training transient: see training_transient_bytes). world: every rank."""
    d = DTYPE_BYTES[dtype]
    if zero >= 3:  # also at N = 1: the gathered layer is a fresh tensor next to the shard
        emb = spec.vocab_size * (spec.embed_dim or spec.hidden_size)
        split, whole = _layer_split(spec)
        return float(2 * max(split / max(1, tp) + whole, emb) * d)
    if trained and zero == 0:  # pipeline.engine skips the all-reduce on one data-parallel replica
        return min(n_trainable, REDUCE_BUCKET) * d if world // max(1, tp) > 1 else 0.0
    if trained and world > 1:
        return min(n_trainable, REDUCE_BUCKET) * d
    return 0.0


def training_transient_bytes(activations: float, buffers: float, zero: int) -> tuple[float, float]:
    """(resident buffer bytes, training transient bytes) of a trained model: ZeRO-0's reduce bucket is
    allocated after autograd's backward has freed the activations (DeepSpeed's engine flattens the
    gradients in its backward epilogue), so it and the activations peak apart; other buffers
    (ZeRO-1/2's buckets, ZeRO-3's gathers) are counted resident beside the activations."""
    if zero == 0:
        return 0.0, max(activations, buffers)
    return buffers, activations


def _layer_split(spec: ModelSpec) -> tuple[int, int]:
    """(parameters AutoTP splits, parameters it leaves whole) of one transformer layer."""
    h, f = spec.hidden_size, spec.ffn_dim
    if spec.family == "llama":
        kv = (spec.num_kv_heads or spec.num_heads) * (h // spec.num_heads)
        return 2 * h * h + 2 * h * kv + 3 * h * f, 2 * h
    return 4 * h * h + 3 * h + 2 * h * f + f, 6 * h


def layer_activation_bytes(spec: ModelSpec, batch: int, seq: int, dtype: str, *, dropout: bool = False,
                           eager_attention: bool = False, tp: int = 1) -> float:
    """Activations one transformer layer keeps for its backward (Korthikanti et al.), bytes, on one
    rank of a tensor-parallel group of tp: the attention input, MLP input and LayerNorm inputs (4h per
    token) whole, Q, K, V, the context and the MLP intermediates (MLP_KEPT * f) split."""
    d = DTYPE_BYTES[dtype]
    h, f, a = spec.hidden_size, spec.ffn_dim, spec.num_heads
    kv = (spec.num_kv_heads or a) * (h // a)
    split = 2 * h + 2 * kv + MLP_KEPT.get(spec.family, 2) * f
    per_token = (4 * h + split / max(1, tp)) * d
    if dropout:
        per_token += 2 * h  # two 1-byte dropout masks (attention output, MLP output)
    total = per_token * seq * batch
    if eager_attention:
        total += a * seq * seq * batch * d / max(1, tp)  # softmax output
    return float(total)


def training_activation_bytes(spec: ModelSpec, batch: int, seq: int, dtype: str, *, grad_ckpt: bool,
                              lm_head: bool, dropout: bool = False, eager_attention: bool = False, tp: int = 1) -> float:
    """Peak activation memory of one training micro-batch (forward + loss + backward), bytes.

    No checkpointing: layers * per-layer activations. Checkpointing: each layer's input
    (d*s*b*h) plus one layer's activations while it is recomputed. Plus embeddings and final
    norm (2*d*s*b*h) and, for a language model, logits s*b*V at (d + 8) bytes. Tensor parallelism
    (tp > 1): per-layer activations as layer_activation_bytes, layer inputs and logits whole, plus an
    untied LLaMA head's local s*b*V/tp slice before its gather (the all-reduces run in place).
    """
    d = DTYPE_BYTES[dtype]
    sbh = seq * batch * spec.hidden_size
    layer = layer_activation_bytes(spec, batch, seq, dtype, dropout=dropout, eager_attention=eager_attention, tp=tp)
    body = spec.num_layers * d * sbh + layer if grad_ckpt else spec.num_layers * layer
    head = seq * batch * spec.vocab_size * (d + 8) if lm_head else seq * batch * 4
    if tp > 1 and lm_head and spec.family == "llama" and not spec.tied_embeddings:
        head += seq * batch * spec.vocab_size * d / tp
    return float(body + 2 * d * sbh + head)


def kv_cache_bytes(spec: ModelSpec, batch: int, seq: int, dtype: str, tp: int = 1) -> float:
    """KV cache: 2 (K and V) * layers * b * s * kv_heads * head_dim * d, the kv heads split over tp."""
    d = DTYPE_BYTES[dtype]
    head_dim = spec.hidden_size // spec.num_heads
    kv = (spec.num_kv_heads or spec.num_heads) * head_dim
    return float(2 * spec.num_layers * batch * seq * kv * d / max(1, tp))


def forward_transient_bytes(spec: ModelSpec, batch: int, seq: int, dtype: str, *, lm_head: bool, tp: int = 1) -> float:
    """A no-grad forward (PPO experience, generation prefill): one layer's working set (its MLP
    intermediate split over tp) plus the full-sequence logits and their fp32 log-softmax (lm_head) —
    nothing is kept per layer."""
    d = DTYPE_BYTES[dtype]
    work = seq * batch * (2 * spec.hidden_size + spec.ffn_dim / max(1, tp)) * d
    head = seq * batch * spec.vocab_size * (d + 8) if lm_head else 0
    return float(work + head)
