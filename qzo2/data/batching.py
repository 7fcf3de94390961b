"""Deterministic batches: seeded order (batch_at), tokenized rows and classification examples padded into tensors
(encode), and a rank's slice of a batch (batch_rows)."""
from __future__ import annotations

import functools
import random

import torch

from .formats import IGNORE, encode_prompt_and_candidates
from .sources import DataError
from .tasks import ClassificationExample


def shuffled(items, seed: int) -> list:
    """A new list: items shuffled by random.Random(seed)."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(shuffled(range(n), f"{seed}:{epoch}"))  # str seeds are hashed with sha512: stable across runs


def batch_at(items, batch_size: int, seed: int, step: int) -> list:
    """The batch of step `step`: a pure function of (items, batch_size, seed, step), so resuming needs only step.

    The stream is epoch 0's permutation, then epoch 1's, ... (each from (seed, epoch)); step s takes stream
    positions [s*batch_size, (s+1)*batch_size). Nothing is dropped: every batch is full, one may straddle two
    epochs, and over k*len(items)/batch_size steps each item appears exactly k times.
    """
    n = len(items)
    if n == 0 or batch_size < 1 or step < 0:
        raise ValueError(f"batch_at needs items, batch_size >= 1 and step >= 0 (got {n}, {batch_size}, {step})")
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(items[_epoch_order(n, seed, epoch)[i]])
    return out


def pad_id(tokenizer) -> int:
    """The id every padding position holds (always masked out, and IGNORE in labels): the tokenizer's pad token,
    else its EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def collate_lm(rows: list[dict], pad_id: int) -> dict:
    """Right-padded LongTensors input_ids, attention_mask, labels [B, T]; labels IGNORE on padding."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def encode_candidates(examples: list[ClassificationExample], tokenizer, max_length: int,
                      share_prompt: bool = True) -> dict:
    """Left-padded batch of every (example, candidate) pair, row b*C + c.

    When every candidate is a single token (" positive"/" negative") and `share_prompt`, one row per example holds
    only the prompt and `cand_ids` [B, C] the candidate tokens: the last position's logits score all of them, the
    same numbers as the per-candidate rows at 1/C of the compute.

    Returns input_ids, attention_mask, position_ids (cumsum(mask) - 1, clamped at 0), cand_mask [B*C, T] (1 on
    candidate tokens), labels [B] and n_last = longest candidate + 1: with left padding every row ends at T-1, so
    logits of the last n_last positions score all candidates (model(..., logits_to_keep=n_last)).
    Candidate tokens are those the candidate gets in context (encode_prompt_and_candidates; BOS as the tokenizer
    adds it to the prompt; no EOS). If prompt + longest candidate exceeds max_length, the prompt loses tokens from its LEFT (after BOS),
    the same for all of an example's candidates, so the end of the prompt stays next to the answer.
    """
    C = len(examples[0].candidates)
    if any(len(e.candidates) != C for e in examples):
        raise ValueError("all examples in a batch need the same number of candidates")
    seqs, cand_lens = [], []
    for e in examples:
        prefix, body, cands = encode_prompt_and_candidates(tokenizer, e.prompt, e.candidates)
        if any(not c for c in cands):
            raise DataError(f"a candidate of {e.candidates} tokenizes to nothing")
        keep = max_length - len(prefix) - max(map(len, cands))
        if keep < 0 or len(prefix) + min(keep, len(body)) == 0:
            raise DataError(f"max_length {max_length} leaves no prompt before candidates {e.candidates}")
        body = body[len(body) - keep:] if len(body) > keep else body
        for c in cands:
            seqs.append(prefix + body + c)
            cand_lens.append(len(c))
    cand_ids = None
    if share_prompt and all(n == 1 for n in cand_lens):
        cand_ids = torch.tensor([s[-1] for s in seqs]).view(len(examples), C)
        seqs, cand_lens = [s[:-1] for s in seqs[::C]], [0] * len(examples)
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    cand_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, cand_lens)):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
        if n:
            cand_mask[i, T - n:] = 1
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 cand_mask=cand_mask, labels=torch.tensor([e.label for e in examples]), n_last=max(cand_lens) + 1)
    if cand_ids is not None:
        batch["cand_ids"] = cand_ids
    return batch


def batch_rows(batch: dict, start: int, stop: int) -> dict:
    """Examples [start, stop) of an encoded batch (text rows or classification examples with their candidate rows),
    padded as the whole batch was, so a rank's slice computes what those rows computed in the whole batch."""
    examples, rows = batch["labels"].shape[0], batch["input_ids"].shape[0]
    per = rows // examples  # candidate rows per example (1 for text rows and shared-prompt candidates)
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() and v.shape[0] == rows:
            out[k] = v[start * per:stop * per]
        elif torch.is_tensor(v) and v.dim() and v.shape[0] == examples:
            out[k] = v[start:stop]
        else:
            out[k] = v
    return out


def encode(kind: str, items: list, tokenizer, max_length: int) -> dict:
    """A batch of tokenized text rows (kind "lm") or classification examples, as tensors."""
    if kind == "lm":
        return collate_lm(items, pad_id(tokenizer))
    return encode_candidates(items, tokenizer, max_length)
