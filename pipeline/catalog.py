"""Model catalog: short names -> hub id and architecture numbers, with no download.

The planner needs sizes before any weight is fetched, and users want to write
`model.actor=opt-66b`. A name resolves, in order, to
  1. a catalog alias (below),
  2. a local folder holding a Hugging Face `config.json`,
  3. a hub id (`org/name`), whose numbers are read from the local HF cache when present.
A name that can only be a path (see looks_like_path) is never sent to the hub: when it does not
exist, or holds no model, that is said in one line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import UserError

# Vocabulary of the tiny built-in model; equals the built-in tokenizer's size rounded up.
BUILTIN_VOCAB = 512


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of a decoder-only transformer."""

    name: str  # what the user wrote
    source: str  # hub id, local path, or "builtin:<name>"
    family: str  # "opt" | "llama" | other model_type from config.json
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_dim: int
    vocab_size: int
    max_positions: int
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    embed_dim: int | None = None  # OPT-350m projects embeddings to 512; None = hidden_size
    tied_embeddings: bool = True

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")

    def num_params(self) -> int:
        """Parameter count from the architecture numbers (exact for OPT and LLaMA)."""
        h, f, v, n = self.hidden_size, self.ffn_dim, self.vocab_size, self.num_layers
        e = self.embed_dim or h
        if self.family == "llama":
            kv = (self.num_kv_heads or self.num_heads) * (h // self.num_heads)
            per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
            head = 0 if self.tied_embeddings else v * h
            return v * h + n * per_layer + h + head
        # OPT layout: biased attention and MLP, two LayerNorms per layer, learned positions (+2 offset).
        per_layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
        embeddings = v * e + (self.max_positions + 2) * h
        projections = 2 * e * h if e != h else 0
        return embeddings + projections + n * per_layer + 2 * h


def _opt(size: str, layers: int, hidden: int, heads: int, embed_dim: int | None = None) -> ModelSpec:
    return ModelSpec(
        name=f"opt-{size}", source=f"facebook/opt-{size}", family="opt", num_layers=layers,
        hidden_size=hidden, num_heads=heads, ffn_dim=4 * hidden, vocab_size=50272,
        max_positions=2048, embed_dim=embed_dim,
    )


def _llama2(size: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int) -> ModelSpec:
    return ModelSpec(
        name=f"llama-2-{size}", source=f"meta-llama/Llama-2-{size}-hf", family="llama",
        num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
        ffn_dim=ffn, vocab_size=32000, max_positions=4096, tied_embeddings=False,
    )


CATALOG: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _opt("125m", 12, 768, 12),
        _opt("350m", 24, 1024, 16, embed_dim=512),
        _opt("1.3b", 24, 2048, 32),
        _opt("2.7b", 32, 2560, 32),
        _opt("6.7b", 32, 4096, 32),
        _opt("13b", 40, 5120, 40),
        _opt("30b", 48, 7168, 56),
        _opt("66b", 64, 9216, 72),
        _opt("175b", 96, 12288, 96),
        _llama2("7b", 32, 4096, 32, 32, 11008),
        _llama2("13b", 40, 5120, 40, 40, 13824),
        _llama2("70b", 80, 8192, 64, 8, 28672),
        # Random-init OPT built from this config: the offline demo and the tests.
        ModelSpec(
            name="tiny-opt", source="builtin:tiny-opt", family="opt", num_layers=2, hidden_size=64,
            num_heads=4, ffn_dim=256, vocab_size=BUILTIN_VOCAB, max_positions=512,
        ),
    ]
}
# The hub ids resolve to the same entries, so `facebook/opt-1.3b` is sized without a download.
_BY_HUB_ID = {s.source: s for s in CATALOG.values() if not s.is_builtin}


class UnknownModelError(UserError, ValueError):
    pass


class ModelPathError(UserError, FileNotFoundError):
    """A model or tokenizer given as a local path that does not exist, or a folder that holds none.
    Not an UnknownModelError: an unsized hub id may be fine, a missing folder never is."""


def looks_like_path(name: str) -> bool:
    """Whether `name` can only mean a local path: it starts with /, ./, ../ or ~, has more than one
    '/' (a hub id is `org/name`), or its first part exists here (`outputs/run` beside `outputs/`)."""
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        return True
    if name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).exists()


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
VOCABULARY_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "spiece.model")


def local_folder(name: str, who: str, tokenizer: bool = False) -> Path | None:
    """The local folder `name` names (~ expanded), or None when it names no local path (an alias or a
    hub id). Raise ModelPathError, one line starting with `who`, when it is clearly a path that does
    not exist, is not a folder, or holds no model (config.json) or, with `tokenizer`, no tokenizer."""
    path = Path(name).expanduser()
    if not path.exists():
        if looks_like_path(name):
            raise ModelPathError(f"{who}: no such folder (a local path, so it is not looked up on the Hugging "
                                 f"Face hub); check the path")
        return None
    needs = TOKENIZER_FILES if tokenizer else ("config.json",)
    if not path.is_dir():
        raise ModelPathError(f"{who}: a file, not a folder; give the folder that holds {needs[0]}")
    if any((path / need).is_file() for need in needs):
        return path
    if tokenizer and any((path / vocab).is_file() for vocab in VOCABULARY_FILES):
        # DeepSpeed-Chat's save_hf_format writes tokenizer.save_vocabulary() only: loaded from that,
        # transformers guesses the special tokens (OPT's bos, eos and pad all come out wrong).
        trained_with = _config_name_or_path(path)
        raise ModelPathError(
            f"{who}: the folder holds vocabulary files but no {' or '.join(TOKENIZER_FILES)} (as DeepSpeed-Chat "
            f"saves models), so its special tokens are unknown; set model.tokenizer to the tokenizer it was "
            f"trained with{f' ({trained_with!r}, per its config.json)' if trained_with else ''}")
    raise ModelPathError(f"{who}: the folder holds no {' or '.join(needs)}, so no Hugging Face "
                         f"{'tokenizer' if tokenizer else 'model'}; check the path")


def _config_name_or_path(folder: Path) -> str | None:
    """The `_name_or_path` a folder's config.json records (the model it started from), if any."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_name_or_path") or None
    except (OSError, ValueError, AttributeError):
        return None


def _spec_from_config_json(name: str, source: str, path: Path) -> ModelSpec:
    cfg = json.loads(path.read_text())
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    return ModelSpec(
        name=name, source=source, family=cfg.get("model_type", "unknown"),
        num_layers=cfg.get("num_hidden_layers") or cfg.get("n_layer"), hidden_size=hidden,
        num_heads=heads, ffn_dim=cfg.get("ffn_dim") or cfg.get("intermediate_size") or 4 * hidden,
        vocab_size=cfg["vocab_size"],
        max_positions=cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048,
        num_kv_heads=cfg.get("num_key_value_heads"),
        embed_dim=cfg.get("word_embed_proj_dim") if cfg.get("word_embed_proj_dim") != hidden else None,
        tied_embeddings=cfg.get("tie_word_embeddings", True),
    )


def _cached_config_json(hub_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    found = try_to_load_from_cache(hub_id, "config.json")
    return Path(found) if isinstance(found, (str, os.PathLike)) else None


def fitted_vocab(model_vocab: int, tokenizer_tokens: int) -> int:
    """Embedding rows a model has once loaded with a tokenizer of `tokenizer_tokens` tokens: grown to the
    next multiple of 8 (what GPU matmul kernels prefer) when the tokenizer has more, else unchanged."""
    return model_vocab if tokenizer_tokens <= model_vocab else 8 * math.ceil(tokenizer_tokens / 8)


def resolve_model(name: str, key: str | None = None) -> ModelSpec:
    """Resolve an alias, local folder or hub id to its spec; raise UnknownModelError if unsized, and
    ModelPathError for a path that is missing or holds no model. `key`: the config key that gave
    `name` (e.g. model.actor), named in the ModelPathError."""
    if name in CATALOG:
        return CATALOG[name]
    path = local_folder(name, f"{key}={name}" if key else f"model {name!r}")
    if path is not None:
        return _spec_from_config_json(name, str(path.resolve()), path / "config.json")
    if name in _BY_HUB_ID:
        return replace(_BY_HUB_ID[name], name=name)
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        cached = _cached_config_json(name)
        if cached is not None:
            return _spec_from_config_json(name, name, cached)
        raise UnknownModelError(
            f"{name!r} is not in the catalog and not in the local Hugging Face cache, so its size is "
            f"unknown; download it first or pass a local folder"
        )
    raise UnknownModelError(
        f"unknown model {name!r}: use a catalog alias ({', '.join(CATALOG)}), a hub id like "
        f"facebook/opt-1.3b, or a local folder with config.json"
    )


def model_source(name: str) -> str:
    """Hub id, absolute local path or builtin:<name> for `name` (an OmegaConf resolver). A path stays a
    path even when missing (resolve_model and models.ensure_available say so in one line), never a
    hub id."""
    if name in CATALOG:
        return CATALOG[name].source
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() or looks_like_path(name) else name
