"""Loading and saving models: tokenizer, causal LM (actor), reward model / critic (value head).

Everything loads through `from_pretrained`. The built-in tiny model is first written to the
run folder from its config (random init, seeded) and then loaded like any other folder.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.catalog import ModelSpec, resolve_model
from pipeline.dist import barrier, rank
from pipeline.engine import activation_checkpointing, set_activation_checkpointing
from pipeline.errors import UserError
from pipeline.files import atomic_dir

VALUE_HEAD_FILE = "value_head.safetensors"
REWARD_CONFIG_FILE = "reward_model.json"


class ModelUnavailable(UserError, RuntimeError):
    """A model or tokenizer is neither local, cached nor downloadable."""


# --------------------------------------------------------------------------- availability


def ensure_available(source: str, what: str) -> None:
    """Fail at once, with one line, when a hub id is not cached and the hub cannot be reached."""
    if source.startswith("builtin") or Path(source).expanduser().exists():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str) or isinstance(
        try_to_load_from_cache(source, "tokenizer_config.json"), str
    ):
        return
    hint = "or try the offline demo: python -m pipeline +experiment=demo"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelUnavailable(f"{what} {source!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(source, timeout=5)
    except Exception as err:  # network down, DNS failure, 404, gated repo ...
        reason = type(err).__name__
        raise ModelUnavailable(
            f"{what} {source!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({reason}); download it where there is network, pass a local folder, {hint}"
        ) from None


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(source: str, work_dir: Path, trust_remote_code: bool = False):
    """AutoTokenizer for `source`; "builtin" or builtin:<model> writes the built-in one first."""
    from transformers import AutoTokenizer

    if source == "builtin" or source.startswith("builtin:"):
        from pipeline.data.builtin import save_tokenizer

        path = work_dir / "builtin_tokenizer"
        if rank() == 0 and not (path / "tokenizer_config.json").exists():
            atomic_dir(path, save_tokenizer)
        barrier()
        source = str(path)
    ensure_available(source, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # GPT-2 and LLaMA: masks come from lengths, so eos can pad
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------- base weights


def materialize(name: str, work_dir: Path, vocab_size: int, seed: int) -> str:
    """Local path or hub id to load `name` from; built-in models are written from their config."""
    spec = resolve_model(name)
    if not spec.is_builtin:
        return spec.source
    vocab = max(spec.vocab_size, 8 * math.ceil(vocab_size / 8))
    path = work_dir / "base_models" / f"{spec.name}-v{vocab}-s{seed}"
    if rank() == 0 and not (path / "config.json").exists():  # rank 0 writes, the others wait
        atomic_dir(path, lambda tmp: _random_init(spec, vocab, seed).save_pretrained(tmp))
    barrier()
    return str(path)


def _random_init(spec: ModelSpec, vocab: int, seed: int):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        ffn_dim=spec.ffn_dim, num_attention_heads=spec.num_heads, max_position_embeddings=spec.max_positions,
        word_embed_proj_dim=spec.hidden_size, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return OPTForCausalLM(config)


def _model_config(source: str, dropout: float | None, trust_remote_code: bool):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if dropout is not None:
        for key in ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if hasattr(config, key):
                setattr(config, key, dropout)
    return config


def _fit_vocab(model, tokenizer) -> None:
    """Grow the embeddings (to a multiple of 8) when the tokenizer has more tokens than the model."""
    weight = model.get_input_embeddings().weight
    if len(tokenizer) > getattr(weight, "ds_shape", weight.shape)[0]:  # ds_shape: built under ZeRO-3, partitioned
        model.resize_token_embeddings(8 * math.ceil(len(tokenizer) / 8))


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_causal_lm(source: str, tokenizer, dtype: str = "fp32", dropout: float | None = 0.0, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    ensure_available(source, "model")
    config = _model_config(source, dropout, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source, config=config, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    _fit_vocab(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# --------------------------------------------------------------------------- reward model / critic


class RewardModel(nn.Module):
    """A transformer without LM head plus a scalar value head: a value per token.

    The sequence score is the value at the last real token (see pipeline.rl_math). Saved as
    the base model's Hugging Face folder plus `value_head.safetensors`; reload with
    `RewardModel.from_pretrained(path)`.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        config = base.config
        width = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
        self.v_head = nn.Linear(width, 1, bias=False, dtype=base.dtype)
        self.config = config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask: (B, L) -> values (B, L)."""
        kwargs = {"position_ids": position_ids} if position_ids is not None else {}
        hidden = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
        return self.v_head(hidden).squeeze(-1)

    def activation_checkpointing_enable(self, **_) -> None:
        set_activation_checkpointing(self.base, True)

    def activation_checkpointing_disable(self) -> None:
        set_activation_checkpointing(self.base, False)

    @property
    def is_activation_checkpointing(self) -> bool:
        return activation_checkpointing(self.base)

    @classmethod
    def from_base(cls, source: str, tokenizer, dtype: str = "fp32", dropout: float | None = 0.0, trust_remote_code: bool = False) -> "RewardModel":
        """A fresh value head on a pretrained transformer (the start of step 2)."""
        from transformers import AutoModel

        ensure_available(source, "reward model")
        config = _model_config(source, dropout, trust_remote_code)
        base = AutoModel.from_pretrained(source, config=config, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code)
        _fit_vocab(base, tokenizer)
        model = cls(base)
        nn.init.normal_(model.v_head.weight, std=1.0 / math.sqrt(model.v_head.in_features + 1))
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "fp32", dropout: float | None = 0.0, trust_remote_code: bool = False) -> "RewardModel":
        """Reload a reward model written by `save_pretrained` (weights as safetensors)."""
        from transformers import AutoModel

        path = Path(path)
        if not (path / VALUE_HEAD_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {VALUE_HEAD_FILE}: not a reward model written by this pipeline")
        config = _model_config(str(path), dropout, trust_remote_code)
        base = AutoModel.from_pretrained(path, config=config, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code)
        model = cls(base)
        model.v_head.load_state_dict({"weight": load_file(path / VALUE_HEAD_FILE)["weight"].to(base.dtype)})
        return model

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The base's Hugging Face folder plus the value head; `state_dict` (this module's keys) in
        place of the current weights, as transformers' save_pretrained takes one."""
        path = Path(path)
        if state_dict is None:
            state_dict = self.state_dict()
        self.base.save_pretrained(path, state_dict={k[len("base."):]: v for k, v in state_dict.items() if k.startswith("base.")})
        save_file({"weight": state_dict["v_head.weight"].detach().cpu().contiguous()}, path / VALUE_HEAD_FILE)
        (path / REWARD_CONFIG_FILE).write_text(json.dumps(
            {"score": "value_head(last_hidden_state) at the last real token", "value_head": VALUE_HEAD_FILE}, indent=2))
