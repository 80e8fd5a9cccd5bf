"""Loading and saving models: tokenizer, causal LM (actor), reward model / critic (value head).

Everything loads through `from_pretrained`. The built-in tiny model is first written to the
run folder from its config (random init, seeded) and then loaded like any other folder. Reward
models are saved as transformers' own sequence classifiers (AutoModelForSequenceClassification
loads them); the layout this pipeline wrote before and DeepSpeed-Chat's are read too.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.catalog import ModelSpec, fitted_vocab, local_folder, resolve_model
from pipeline.dist import barrier, rank
from pipeline.engine import activation_checkpointing, gathered_params, set_activation_checkpointing
from pipeline.errors import UserError
from pipeline.files import atomic_dir


class ModelUnavailable(UserError, RuntimeError):
    """A model or tokenizer is neither local, cached nor downloadable."""


# --------------------------------------------------------------------------- availability


def ensure_available(source: str, what: str) -> None:
    """Fail at once, with one line naming `what` (a config key or a kind of model; a tokenizer when it
    says "tokenizer") and `source`, when a local path is missing or holds no model (or no tokenizer),
    or a hub id is not cached and the hub cannot be reached."""
    if source.startswith("builtin") or local_folder(source, f"{what} {source!r}", tokenizer="tokenizer" in what):
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


def _builtin_task(source: str):
    """The built-in task module whose tokenizer `source` names, or None: builtin:pick is the verifiable
    task's (pipeline.data.pick), builtin and builtin:<model> the preference task's (pipeline.data.builtin)."""
    if source != "builtin" and not source.startswith("builtin:"):
        return None
    from pipeline.data import builtin, pick

    return pick if source == pick.TOKENIZER else builtin


def load_tokenizer(source: str, work_dir: Path, trust_remote_code: bool = False):
    """AutoTokenizer for `source`; "builtin" or builtin:<model> writes the built-in one first."""
    from transformers import AutoTokenizer

    task = _builtin_task(source)
    if task is not None:
        path = work_dir / f"{task.__name__.rsplit('.', 1)[-1]}_tokenizer"
        if rank() == 0 and not (path / "tokenizer_config.json").exists():
            atomic_dir(path, task.save_tokenizer)
        barrier()
        source = str(path)
    ensure_available(source, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # GPT-2 and LLaMA: masks come from lengths, so eos can pad
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=8)
def tokenizer_size(source: str, trust_remote_code: bool = False) -> int | None:
    """len() of the tokenizer at `source` (what the models' embeddings are fitted to), read without
    writing anything: built-in ones are built in a temporary folder, hub ids only from the local
    cache. None when it cannot be read here (load_tokenizer says why when the run starts)."""
    from transformers import AutoTokenizer

    task = _builtin_task(source)
    if task is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return len(AutoTokenizer.from_pretrained(str(task.save_tokenizer(tmp))))
    try:
        return len(AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- base weights


def materialize(name: str, work_dir: Path, vocab_size: int, seed: int) -> str:
    """Local path or hub id to load `name` from; built-in models are written from their config."""
    spec = resolve_model(name)
    if not spec.is_builtin:
        return spec.source
    vocab = fitted_vocab(spec.vocab_size, vocab_size)
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
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ds_shape: built under ZeRO-3, partitioned
    if fitted_vocab(rows, len(tokenizer)) != rows:
        model.resize_token_embeddings(fitted_vocab(rows, len(tokenizer)))


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

VALUE_HEAD_FILE = "value_head.safetensors"  # the layout this pipeline wrote before: base + this file
# DeepSpeed-Chat's RewardModel keeps the transformer as `rwtranrsformer` (so spelled in its
# training/ tree, which wrote the checkpoints in circulation; its later dschat/ package spells it
# rwtransformer) beside `v_head`, all in one torch.save'd pytorch_model.bin.
DEEPSPEED_CHAT_WEIGHTS = "pytorch_model.bin"
DEEPSPEED_CHAT_PREFIXES = ("rwtranrsformer.", "rwtransformer.")


class NotARewardModel(UserError, ValueError):
    """A folder given as a reward model or critic holds some other kind of model."""


def _deepspeed_chat_prefix(folder: Path | None) -> str | None:
    """The transformer's key prefix when `folder` holds a DeepSpeed-Chat reward model, else None.
    Reads only the keys (tensors on the meta device), with torch.load's weights_only unpickler."""
    weights = folder / DEEPSPEED_CHAT_WEIGHTS if folder else None
    if weights is None or not weights.is_file():
        return None
    keys = torch.load(weights, map_location="meta", weights_only=True).keys()
    if "v_head.weight" not in keys:
        return None
    return next((p for p in DEEPSPEED_CHAT_PREFIXES if any(k.startswith(p) for k in keys)), None)


def _load_classifier(source: str, config, dtype: str, trust_remote_code: bool, fresh_head: bool):
    """transformers' sequence classifier from `source` in any of the three layouts, and whether its
    score head came from the files (else transformers initialised it; with `fresh_head` any head in
    the files is dropped). Every other weight must be in the files: a layout read wrong would
    otherwise run on random weights."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoModelForSequenceClassification

    what = f"reward model {source!r}"
    if fresh_head or not any(a.endswith("ForSequenceClassification") for a in config.architectures or ()):
        config.num_labels = 1  # a causal LM's or a bare transformer's config says 2 (transformers' default)
    if not trust_remote_code and type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise NotARewardModel(f"{what}: transformers has no sequence-classification model for model_type "
                              f"{config.model_type!r}, which reward models here are built on")
    folder = local_folder(source, what)
    kwargs = {"ignore_mismatched_sizes": True} if fresh_head else {}
    prefix = _deepspeed_chat_prefix(folder)
    if prefix:
        base_prefix = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)].base_model_prefix
        kwargs["key_mapping"] = {f"^{prefix.replace('.', '[.]')}": f"{base_prefix}.", r"^v_head[.]": "score."}
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        source, config=config, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code,
        weights_only=True, output_loading_info=True, **kwargs)
    missing = [key for key in info["missing_keys"] if key != "score.weight"]
    if missing:
        raise NotARewardModel(f"{what}: {len(missing)} weights are not in its files (e.g. {missing[0]}); not a "
                              f"{type(classifier).__name__} checkpoint in a layout read here")
    head = getattr(classifier, "score", None)
    if not isinstance(head, nn.Linear) or head.bias is not None or config.num_labels != 1:
        raise NotARewardModel(f"{what}: {type(classifier).__name__} with {config.num_labels} labels"
                              f"{' and a biased head' if getattr(head, 'bias', None) is not None else ''}; a reward "
                              f"model has one score from a bias-free Linear head named score")
    head_loaded = not fresh_head and "score.weight" not in info["missing_keys"]
    if not head_loaded and not fresh_head and folder is not None and (folder / VALUE_HEAD_FILE).is_file():
        with gathered_params(classifier, [head.weight], modifier_rank=0):  # ZeRO-3: into its partition
            head.weight.data.copy_(load_file(folder / VALUE_HEAD_FILE)["weight"])
        head_loaded = True
    return classifier, head_loaded


class RewardModel(nn.Module):
    """A transformer without LM head plus a scalar value head: a value per token.

    The sequence score is the value at the last real token (see pipeline.rl_math). Built from and
    saved as transformers' XForSequenceClassification (`base` is its base model, `v_head` its
    `score`): `AutoModelForSequenceClassification.from_pretrained(path)` loads what
    `save_pretrained` writes, and pools the same score when the tokenizer's pad differs from eos.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.base = classifier.base_model
        self.v_head = classifier.score
        self.config = classifier.config
        self.classifier_class = type(classifier)  # what save_pretrained writes

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
    def from_base(cls, source: str, tokenizer, dtype: str = "fp32", dropout: float | None = 0.0, trust_remote_code: bool = False) -> RewardModel:
        """A fresh value head on a pretrained transformer (the start of step 2): a causal LM, or a
        reward model in any layout from_pretrained reads (its head is not kept)."""
        ensure_available(source, "reward model")
        config = _model_config(source, dropout, trust_remote_code)
        config.pad_token_id = tokenizer.pad_token_id  # transformers' pooling finds the last real token by it
        classifier, _ = _load_classifier(source, config, dtype, trust_remote_code, fresh_head=True)
        model = cls(classifier)
        _fit_vocab(model.base, tokenizer)
        weight = model.v_head.weight
        with gathered_params(model, [weight], modifier_rank=0):
            nn.init.normal_(weight, std=1.0 / math.sqrt(weight.shape[1] + 1))
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "fp32", dropout: float | None = 0.0, trust_remote_code: bool = False,
                        fresh_head_tokenizer=None) -> RewardModel:
        """Reload a reward model or critic: a sequence classifier with one label (what save_pretrained
        writes), the base + value_head.safetensors this pipeline wrote before, or DeepSpeed-Chat's
        step-2/3 folder (pytorch_model.bin with rwtranrsformer.* and v_head.weight, read with
        torch.load's weights_only unpickler). A model without a value head is refused, unless
        `fresh_head_tokenizer` is given: then it gets a fresh one (from_base), as a critic that no
        reward model shares its start with may (veRL starts its critic from the policy so)."""
        ensure_available(str(path), "reward model")
        config = _model_config(str(path), dropout, trust_remote_code)
        classifier, head_loaded = _load_classifier(str(path), config, dtype, trust_remote_code, fresh_head=False)
        if not head_loaded and fresh_head_tokenizer is not None:
            return cls.from_base(str(path), fresh_head_tokenizer, dtype, dropout, trust_remote_code)
        if not head_loaded:
            raise NotARewardModel(
                f"reward model {str(path)!r}: a {config.model_type} model without a value head: neither a "
                f"sequence classifier's score, {VALUE_HEAD_FILE}, nor DeepSpeed-Chat's v_head.weight in "
                f"{DEEPSPEED_CHAT_WEIGHTS}; train one with step 2 (run.stages=[rm])")
        return cls(classifier)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write transformers' sequence classifier (config.json with num_labels 1 and the pad id, and
        safetensors); `state_dict` (this module's keys) in place of the current weights, as
        transformers' save_pretrained takes one. The classifier is built on the meta device: it only
        carries the config and names, the weights come from the state dict."""
        if state_dict is None:
            state_dict = self.state_dict()
        prefix = self.classifier_class.base_model_prefix
        weights = {f"{prefix}.{k[len('base.'):]}": v for k, v in state_dict.items() if k.startswith("base.")}
        weights["score.weight"] = state_dict["v_head.weight"]
        with torch.device("meta"):
            shell = self.classifier_class(copy.deepcopy(self.config)).to(weights["score.weight"].dtype)
        shell.save_pretrained(Path(path), state_dict=weights)
