"""Model loading and saving: reward models that transformers loads as sequence classifiers (same
scores), the layout written before, DeepSpeed-Chat's step-2 reward model and step-1/3 actors
(scores and logits equal to what its own code computes on the same weights), ZeRO-3 construction
and export of reward models, and one-line errors for model and tokenizer paths.

Tiny random-init OPT and LLaMA models (2 layers, hidden 64) built from a config; tolerance 1e-5
(fp32, CPU) wherever two code paths compute the same number.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import record_gathers, run_cli
from torch import nn

from pipeline.catalog import ModelPathError, UnknownModelError, looks_like_path, model_source, resolve_model
from pipeline.export import save_hf
from pipeline.models import NotARewardModel, RewardModel, ensure_available, load_causal_lm, load_tokenizer
from pipeline.rl_math import last_index

ATOL = 1e-5
SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128}


def tiny_causal_lm(family: str, vocab: int, folder: Path, seed: int = 0) -> Path:
    """A random-init 2-layer causal LM of `family` ("opt" | "llama") saved to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=vocab, ffn_dim=128, word_embed_proj_dim=64, **SHAPE))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, intermediate_size=128, num_key_value_heads=2, **SHAPE))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizers(shared_data, tmp_path_factory) -> dict:
    """OPT's tokenizer (pad <pad> apart from eos </s>) and GPT-2's (no pad: load_tokenizer makes it eos)."""
    work = tmp_path_factory.mktemp("tokenizers")
    return {name: load_tokenizer(str(shared_data / "tokenizers" / name), work) for name in ("opt", "gpt2")}


def families(tokenizers) -> list[tuple[str, object]]:
    return [("opt", tokenizers["opt"]), ("llama", tokenizers["gpt2"])]


def pair_batch(tokenizer, with_eos: bool) -> dict[str, torch.Tensor]:
    """A right-padded chosen/rejected pair as the RM stage batches it (masks from lengths)."""
    from pipeline.data.collate import collate_pairs

    prompt = tokenizer("\n\nHuman: what color is the cat ?\n\nAssistant:").input_ids
    eos = [tokenizer.eos_token_id] if with_eos else []
    chosen = prompt + tokenizer(" the cat is black", add_special_tokens=False).input_ids + eos
    rejected = prompt + tokenizer(" no", add_special_tokens=False).input_ids + eos
    return collate_pairs([{"chosen_input_ids": chosen, "rejected_input_ids": rejected}], tokenizer.pad_token_id)


def our_scores(rm: RewardModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        values = rm(batch["input_ids"], batch["attention_mask"])
    return values[torch.arange(values.shape[0]), last_index(batch["attention_mask"])]


# ---------------------------------------------------------------------- loadable by transformers


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_saved_reward_model_is_a_transformers_sequence_classifier_with_our_scores(tokenizers, tmp_path, family):
    """What step 2 writes loads with AutoModelForSequenceClassification and with transformers'
    text-classification pipeline, and both give our score of the same tokens: the value at the last
    real token. With a distinct pad (OPT) that holds for sequences ending in eos too; where pad == eos
    (GPT-2 style), transformers' pooling cannot tell a trailing eos from padding and scores the token
    before it (README, "Definitions we use")."""
    from transformers import AutoModelForSequenceClassification, pipeline

    tokenizer = dict(families(tokenizers))[family]
    base = tiny_causal_lm(family, 8 * -(-len(tokenizer) // 8), tmp_path / "base")
    rm = RewardModel.from_base(str(base), tokenizer).eval()
    save_hf(rm, tmp_path / "rm", tokenizer)

    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == [f"{'OPT' if family == 'opt' else 'Llama'}ForSequenceClassification"]
    assert config["pad_token_id"] == tokenizer.pad_token_id and len(config["id2label"]) == 1
    assert not (tmp_path / "rm" / "value_head.safetensors").exists()
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    reloaded = RewardModel.from_pretrained(tmp_path / "rm").eval()

    plain = pair_batch(tokenizer, with_eos=False)
    with torch.no_grad():
        theirs = classifier(**plain).logits[:, 0]
    ours = our_scores(rm, plain)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    torch.testing.assert_close(our_scores(reloaded, plain), ours, atol=0, rtol=0)
    assert abs(float(ours[0] - ours[1])) > 1e-3  # the pair is told apart: not a constant

    texts = ["\n\nHuman: what color is the cat ?\n\nAssistant: the cat is black", "Assistant: no"]
    scored = pipeline("text-classification", model=str(tmp_path / "rm"), function_to_apply="none", device="cpu")(texts)
    for text, result in zip(texts, scored, strict=True):
        batch = tokenizer([text], return_tensors="pt")
        assert result["score"] == pytest.approx(float(our_scores(rm, batch)[0]), abs=ATOL)

    ended = pair_batch(tokenizer, with_eos=True)  # as the RM stage trains: answers end with eos
    with torch.no_grad():
        theirs = classifier(**ended).logits[:, 0]
        values = rm(ended["input_ids"], ended["attention_mask"])
    ours = our_scores(rm, ended)
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    else:
        before_eos = values[torch.arange(2), last_index(ended["attention_mask"]) - 1]
        torch.testing.assert_close(theirs, before_eos, atol=ATOL, rtol=0)
        assert (theirs - ours).abs().min() > 1e-4


def test_reward_model_written_before_still_loads(tokenizers, tmp_path):
    """Run folders from before: the base model's folder plus value_head.safetensors."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    tokenizer = tokenizers["opt"]
    causal = tiny_causal_lm("opt", 50272, tmp_path / "causal")
    base = AutoModel.from_pretrained(causal)
    head = torch.randn(1, 64)
    base.save_pretrained(tmp_path / "old")
    save_file({"weight": head}, tmp_path / "old" / "value_head.safetensors")

    rm = RewardModel.from_pretrained(tmp_path / "old").eval()
    batch = pair_batch(tokenizer, with_eos=True)
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state @ head[0]
        torch.testing.assert_close(rm(batch["input_ids"], batch["attention_mask"]), expected, atol=ATOL, rtol=0)


def test_folders_that_are_not_reward_models_are_refused_in_one_line(tmp_path):
    from transformers import AutoModelForSequenceClassification

    causal = tiny_causal_lm("opt", 50272, tmp_path / "causal")
    with pytest.raises(NotARewardModel, match=r"^reward model '.*causal': a opt model without a value head.*run.stages=\[rm\]\)$"):
        RewardModel.from_pretrained(causal)
    AutoModelForSequenceClassification.from_pretrained(causal, num_labels=2).save_pretrained(tmp_path / "two")
    with pytest.raises(NotARewardModel, match=r"^reward model '.*two': OPTForSequenceClassification with 2 labels; "):
        RewardModel.from_pretrained(tmp_path / "two")


def test_a_critic_without_a_reward_model_may_start_from_a_causal_lm(tokenizers, tmp_path):
    """With a reward function the critic's start needs no value head: a causal LM gets a fresh one
    (its transformer weights kept as they are); a folder with a head keeps its own."""
    from transformers import AutoModel

    causal = tiny_causal_lm("opt", 50272, tmp_path / "causal")
    critic = RewardModel.from_pretrained(causal, fresh_head_tokenizer=tokenizers["opt"])
    base = AutoModel.from_pretrained(causal).state_dict()
    assert all(torch.equal(value, base[key]) for key, value in critic.base.state_dict().items())
    head = critic.v_head.weight
    assert head.shape == (1, 64) and head.std() > 0.05  # normal, std 1/sqrt(65): not zero, not transformers' 0.02
    critic.save_pretrained(tmp_path / "critic")
    again = RewardModel.from_pretrained(tmp_path / "critic", fresh_head_tokenizer=tokenizers["opt"])
    assert torch.equal(again.v_head.weight, head)


# ---------------------------------------------------------------------- DeepSpeed-Chat checkpoints


def write_deepspeed_chat_folder(folder: Path, state: dict[str, torch.Tensor], config, shared_data: Path) -> Path:
    """A folder as DeepSpeed-Chat's save_hf_format writes it: torch.save(model.state_dict()) to
    pytorch_model.bin, config.to_json_file (transformers 4 also recorded _name_or_path; DeepSpeed-Chat
    sets end_token_id and pad_token_id = eos), and tokenizer.save_vocabulary() (GPT-2 style BPE files)."""
    folder.mkdir(parents=True)
    torch.save(state, folder / "pytorch_model.bin")
    config.end_token_id = config.eos_token_id
    config.pad_token_id = config.eos_token_id
    config.to_json_file(folder / "config.json")
    written = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**written, "_name_or_path": "facebook/opt-350m"}))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data / "tokenizers" / "opt" / name, folder / name)
    return folder


def deepspeed_chat_values(state: dict[str, torch.Tensor], prefix: str, config, ids, mask) -> torch.Tensor:
    """DeepSpeed-Chat's RewardModel.forward_value(..., return_value_only=True) on the checkpoint's
    tensors: v_head(rwtranrsformer(ids, attention_mask=mask)[0]).squeeze(-1), (B, L)."""
    from transformers import AutoModel

    transformer = AutoModel.from_config(config).eval()
    transformer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    v_head = nn.Linear(state["v_head.weight"].shape[1], 1, bias=False)
    v_head.weight.data.copy_(state["v_head.weight"])
    with torch.no_grad():
        return v_head(transformer(ids, attention_mask=mask, use_cache=False)[0]).squeeze(-1)


def deepspeed_chat_end_index(ids: torch.Tensor, pad_id: int, prompt_length: int) -> torch.Tensor:
    """Where forward_value takes chosen_end_scores (step 3): per row, c_ind - 1 with c_ind the first pad
    of the answer (ids[prompt_length:]) or the sequence length. (B,)"""
    ends = []
    for row in ids:
        pads = (row[prompt_length:] == pad_id).nonzero()
        ends.append((pads[0].item() + prompt_length if len(pads) else ids.shape[1]) - 1)
    return torch.tensor(ends)


def deepspeed_chat_pair_index(ids: torch.Tensor, pad_id: int, num_padding_at_beginning: int) -> torch.Tensor:
    """Where forward() takes chosen/rejected_mean_scores (step 2): c_ind - 1 with c_ind the pad after the
    first num_padding_at_beginning ones (OPT's bos is its pad: 1), or the sequence length. (B,)"""
    ends = []
    for row in ids:
        pads = (row == pad_id).nonzero()
        ends.append((pads[num_padding_at_beginning].item() if len(pads) > num_padding_at_beginning else ids.shape[1]) - 1)
    return torch.tensor(ends)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("prefix", ["rwtranrsformer.", "rwtransformer."])
def test_deepspeed_chat_reward_model_loads_with_its_scores(tokenizers, shared_data, tmp_path, family, prefix):
    """DeepSpeed-Chat's step-2 folder (rwtranrsformer.* + v_head.weight in pytorch_model.bin) loads as a
    RewardModel whose values equal DeepSpeed-Chat's own forward_value on the same weights and inputs,
    at its step-3 score position (the token before the first pad of the answer; with OPT's pad == eos,
    the one before the eos, which its mask drops) and its step-2 one (num_padding_at_beginning=1: OPT's
    bos is its pad). Our own score sits on the eos: one position later (README)."""
    from transformers import AutoConfig, AutoModel

    causal = tiny_causal_lm(family, 50272, tmp_path / "causal")
    transformer = AutoModel.from_pretrained(causal)
    state = {prefix + k: v for k, v in transformer.state_dict().items()}
    state["v_head.weight"] = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    folder = write_deepspeed_chat_folder(tmp_path / "step2", state, AutoConfig.from_pretrained(causal), shared_data)
    rm = RewardModel.from_pretrained(folder).eval()

    # Step 3 as DeepSpeed-Chat runs it with OPT: pad = eos = bos = 2, prompts left-padded, answers
    # ending in eos then padding (or running to full length), attention_mask = seq != pad.
    pad = eos = 2
    tokenizer = tokenizers["opt"]
    prompt = [pad, pad] + tokenizer("\n\nHuman: what color is the cat ?\n\nAssistant:").input_ids  # bos is 2
    words = [tokenizer(text, add_special_tokens=False).input_ids
             for text in (" the cat is black", " it is", " the cat is black and white and small")]
    width = len(words[2])  # the last answer runs to full length, without eos
    answers = [w + [eos] + [pad] * (width - len(w) - 1) for w in words[:2]] + [words[2]]
    ids = torch.tensor([prompt + a for a in answers])
    mask = (ids != pad).long()
    theirs = deepspeed_chat_values(state, prefix, AutoConfig.from_pretrained(folder), ids, mask)
    with torch.no_grad():
        ours = rm(ids, mask)
    torch.testing.assert_close(ours * mask, theirs * mask, atol=ATOL, rtol=0)
    rows = torch.arange(len(answers))
    end = deepspeed_chat_end_index(ids, pad, len(prompt))
    torch.testing.assert_close(ours[rows, end], theirs[rows, end], atol=ATOL, rtol=0)
    # Their score: the answer's last token before its eos. Ours (masks from lengths keep the eos): the eos.
    eos_at = [len(prompt) + len(w) for w in words[:2]]
    assert end.tolist() == [eos_at[0] - 1, eos_at[1] - 1, ids.shape[1] - 1]

    # Step 2: pairs tokenized with padding="max_length" as its data pipeline does (bos 2 kept in the mask).
    rows_ids = [prompt[2:] + w for w in words[:2]]
    length = max(len(r) for r in rows_ids) + 3
    pairs = torch.tensor([r + [pad] * (length - len(r)) for r in rows_ids])
    pair_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows_ids])
    theirs = deepspeed_chat_values(state, prefix, AutoConfig.from_pretrained(folder), pairs, pair_mask)
    pair_end = deepspeed_chat_pair_index(pairs, pad, num_padding_at_beginning=1)
    with torch.no_grad():
        ours = rm(pairs, pair_mask)
    torch.testing.assert_close(ours[torch.arange(2), pair_end], theirs[torch.arange(2), pair_end], atol=ATOL, rtol=0)
    assert pair_end.tolist() == last_index(pair_mask).tolist()  # no eos in its step-2 data: the same token


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("writer", ["save_hf_format", "save_zero_three_model"])
def test_deepspeed_chat_actor_loads_with_its_logits(tokenizers, shared_data, tmp_path, family, writer):
    """DeepSpeed-Chat's step-1 / step-3 actor folder (save_hf_format: the state_dict; its ZeRO-3 and
    EMA writer save_zero_three_model: named_parameters, so the tied lm_head is absent) loads through the
    actor loader with the logits of the same weights loaded into the model by hand."""
    from transformers import AutoConfig, AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_pretrained(tiny_causal_lm(family, 50272, tmp_path / "causal"))
    state = causal.state_dict() if writer == "save_hf_format" else dict(causal.named_parameters())
    folder = write_deepspeed_chat_folder(tmp_path / "actor", state, AutoConfig.from_pretrained(tmp_path / "causal"), shared_data)
    actor = load_causal_lm(str(folder), tokenizers["opt"]).eval()

    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).eval()
    reference.load_state_dict(torch.load(folder / "pytorch_model.bin", weights_only=True), strict=False)
    reference.tie_weights()
    batch = pair_batch(tokenizers["opt"], with_eos=True)
    with torch.no_grad():
        ours = actor(**batch).logits
        theirs = reference(**batch).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert float(theirs.std()) > 0


def test_deepspeed_chat_folder_as_tokenizer_is_refused_in_one_line(shared_data, tmp_path):
    """Its folders hold only tokenizer.save_vocabulary() files: transformers would guess OPT's special
    tokens wrong (bos, eos and pad), so the folder is refused, naming the tokenizer to use instead."""
    from transformers import OPTConfig

    folder = write_deepspeed_chat_folder(tmp_path / "actor", {}, OPTConfig(), shared_data)
    with pytest.raises(ModelPathError, match=r"tokenizer '.*actor': the folder holds vocabulary files but no "
                       r"tokenizer_config.json or tokenizer.json .*model.tokenizer.*'facebook/opt-350m'"):
        load_tokenizer(str(folder), tmp_path)


# ---------------------------------------------------------------------- ZeRO-3


def test_reward_models_built_under_zero3_are_partitioned_and_export_whole(tokenizers, shared_data, tmp_path, monkeypatch):
    """Under zero3_construction (transformers' HfDeepSpeedConfig + zero.Init) every layout loads straight
    into partitions with the weights of a plain load, a fresh value head is initialised through a
    gather, and save_hf writes the model gathered one module at a time, loadable by transformers."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForSequenceClassification

    from pipeline.config import StrategySection, load_config
    from pipeline.dist import init_distributed
    from pipeline.engine import gathered_params, zero3_construction

    tokenizer = tokenizers["opt"]
    causal = tiny_causal_lm("opt", 50272, tmp_path / "causal")
    base = AutoModel.from_pretrained(causal)
    base.save_pretrained(tmp_path / "old")
    save_file({"weight": torch.randn(1, 64)}, tmp_path / "old" / "value_head.safetensors")
    state = {"rwtranrsformer." + k: v for k, v in base.state_dict().items()}
    state["v_head.weight"] = torch.randn(1, 64)
    write_deepspeed_chat_folder(tmp_path / "dschat", state, base.config, shared_data)
    RewardModel.from_base(str(causal), tokenizer).save_pretrained(tmp_path / "new")

    cfg = load_config({"run": {"output_dir": str(tmp_path / "run"), "dtype": "fp32"},
                       "hardware": {"name": "cpu", "device": "cpu"}, "model": {"tokenizer": "builtin"}})
    init_distributed(cfg)
    with zero3_construction(cfg, StrategySection(zero_stage=3, offload=False)):
        fresh = RewardModel.from_base(str(causal), tokenizer)
        sharded = {name: RewardModel.from_pretrained(tmp_path / name) for name in ("new", "old", "dschat")}
    for name, model in {"fresh": fresh, **sharded}.items():
        assert all(hasattr(p, "ds_id") for p in model.parameters()), name
        assert any(p.numel() == 0 for p in model.parameters()), name  # partitioned, not whole
    for name, model in sharded.items():
        plain = RewardModel.from_pretrained(tmp_path / name)
        with gathered_params(model):
            for (key, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
                assert torch.equal(p.detach(), q.detach()), (name, key)
    with gathered_params(fresh):
        head = fresh.v_head.weight.detach().clone()
    assert head.shape == (1, 64) and 0.05 < float(head.std()) < 0.3  # std 1/sqrt(65) = 0.124

    sizes = record_gathers(monkeypatch)
    save_hf(sharded["dschat"], tmp_path / "export", tokenizer)
    assert sizes and max(sizes) <= 4 < len(list(fresh.parameters()))  # one module's weights at a time
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    plain = RewardModel.from_pretrained(tmp_path / "dschat").eval()
    batch = pair_batch(tokenizer, with_eos=True)
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits[:, 0], our_scores(plain, batch), atol=ATOL, rtol=0)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["pad_token_id"] == tokenizer.pad_token_id


# ---------------------------------------------------------------------- paths (#15)


def test_paths_are_never_hub_ids(tmp_path, monkeypatch):
    """A name that can only be a path (/, ./, ../, ~, more than one '/', or a first part that exists)
    that is missing, or a folder without the model's files, fails in one line naming the key and the
    path; hub ids stay hub ids."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("/no/such/model", "./missing", "../missing", "~/missing-model-folder", "a/b/c", "outputs/sft"):
        assert looks_like_path(name), name
        with pytest.raises(ModelPathError, match=rf"^model\.actor={name}: no such folder \(a local path, so it is not "
                                                 rf"looked up on the Hugging Face hub\); check the path$"):
            resolve_model(name, key="model.actor")
        assert model_source(name) == str(Path(name).expanduser().resolve())
    for name in ("facebook/opt-1.3b", "someorg/some-model", "gpt2"):
        assert not looks_like_path(name) and model_source(name) == name
    assert resolve_model("facebook/opt-1.3b").hidden_size == 2048
    with pytest.raises(UnknownModelError, match="not in the catalog and not in the local Hugging Face cache"):
        resolve_model("someorg/some-model")
    with pytest.raises(ModelPathError, match=r"^model\.reward=empty: the folder holds no config.json, so no Hugging "
                                             r"Face model; check the path$"):
        resolve_model("empty", key="model.reward")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ModelPathError, match=r"^model 'file.bin': a file, not a folder"):
        resolve_model("file.bin")

    for what, name, why in (("tokenizer", "./no-tokenizer", "no such folder"),
                            ("model.tokenizer", str(tmp_path / "empty"), "the folder holds no tokenizer_config.json or tokenizer.json"),
                            ("reward model", "outputs/rm/final", "no such folder")):
        with pytest.raises(ModelPathError, match=rf"^{what} '{name}': {why}"):
            ensure_available(name, what)
    with pytest.raises(ModelPathError, match=r"^reward model '.*missing-rm': no such folder"):
        RewardModel.from_pretrained(tmp_path / "missing-rm")


@pytest.mark.parametrize("override", ["model.tokenizer=/no/such/tokenizer", "model.actor=./no-such-actor"])
def test_missing_model_folder_stops_the_cli_in_one_line_before_writing(tmp_path, override):
    out = tmp_path / "run"
    proc = run_cli("+experiment=demo", f"run.output_dir={out}", override, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr
    assert override.split("=", 1)[1].lstrip("./") in lines[-1] and "no such folder" in lines[-1]
    assert not out.exists() or not any(out.iterdir())  # nothing written (Hydra only creates the folder)
