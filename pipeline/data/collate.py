"""Batching. Attention masks come from lengths, never from comparing with the pad id:
OPT and GPT-2 tokenizers may share pad and eos, and the eos must stay visible."""

from __future__ import annotations

import torch


def _pad(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def collate_sft(batch: list[dict], pad_id: int, mask_prompt: bool) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels: (B, L); labels are -100 on padding (and the prompt if masked)."""
    ids, mask = _pad([b["input_ids"] for b in batch], pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    if mask_prompt:
        for row, b in enumerate(batch):
            labels[row, : b["prompt_len"]] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask: (2B, L), the B chosen rows first, then the B rejected rows."""
    seqs = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
    ids, mask = _pad(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def collate_prompts(batch: list[dict], pad_id: int) -> dict:
    """prompt input_ids, attention_mask: (B, Lp), left-padded so generation continues every row; and the
    rows' reference answers (a list of B strings) when the examples carry them."""
    ids, mask = _pad([b["prompt_input_ids"] for b in batch], pad_id, left=True)
    out = {"input_ids": ids, "attention_mask": mask}
    if "reference" in batch[0]:
        out["reference"] = [b["reference"] for b in batch]
    return out


def collate_text(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Plain text blocks for the PTX loss: input_ids, attention_mask, labels (B, L)."""
    ids, mask = _pad([b["input_ids"] for b in batch], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
