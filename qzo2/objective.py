"""The losses and metrics every method shares: the chunked LM loss, candidate scores and their classification loss,
and the dev evaluation. A ZO step asks for the loss of each of its 2k perturbation chunks (`chunk_losses`); a
first-order step for one differentiable loss (`loss`, the same function with one chunk)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import data as D


def model_inputs(model, batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    device = model.get_input_embeddings().weight.device
    inputs = {k: batch[k].to(device) for k in keys if k in batch}
    inputs["use_cache"] = False  # no KV cache: a training forward never decodes
    return inputs


def classification_scores(model, batch: dict) -> torch.Tensor:
    """[rows/C, C] mean candidate log-probs; only the last n_last positions' logits are computed."""
    out = model(**model_inputs(model, batch), logits_to_keep=batch["n_last"])
    return D.candidate_logprobs(out.logits.float(), batch)


def lm_chunk_losses(model, batch: dict, chunks: int, rows_per_head: int = 2) -> torch.Tensor:
    """Mean next-token cross-entropy of each of `chunks` equal row chunks. The decoder runs once; the LM head and the
    loss run on a few rows of every chunk at a time (so a perturbed head still sees all its chunks), and logits for
    the whole batch x vocab never exist at once in a forward without gradients."""
    hidden = model.get_decoder()(**model_inputs(model, batch)).last_hidden_state
    head = model.get_output_embeddings()
    labels = batch["labels"][:, 1:].to(hidden.device)
    per = hidden.shape[0] // chunks
    hs = hidden.view(chunks, per, *hidden.shape[1:])  # [chunks, rows per chunk, T, H]: slices, no index tensors
    ls = labels.view(chunks, per, -1)
    sums = []
    for r in range(0, per, rows_per_head):
        e = min(r + rows_per_head, per)
        logits = head(hs[:, r:e, :-1].reshape(-1, hs.shape[2] - 1, hs.shape[3])).float()
        nll = F.cross_entropy(logits.transpose(1, 2), ls[:, r:e].reshape(-1, ls.shape[2]), ignore_index=D.IGNORE,
                              reduction="none")
        sums.append(nll.sum(dim=1).double().view(chunks, e - r))
    counts = (ls != D.IGNORE).sum(dim=2).double()
    return torch.cat(sums, dim=1).sum(1) / counts.sum(1).clamp(min=1)


def chunk_losses(model, kind: str, batch: dict, chunks: int) -> torch.Tensor:
    """[chunks] float64 losses of `chunks` equal row chunks of a batch: LM loss ("lm") or the candidates'
    cross-entropy ("classification")."""
    if kind == "lm":
        return lm_chunk_losses(model, batch, chunks)
    scores = classification_scores(model, batch)
    labels = batch["labels"]
    return torch.stack([D.classification_loss(s, labels[: s.shape[0]]).double() for s in scores.chunk(chunks)])


def loss(model, kind: str, batch: dict) -> torch.Tensor:
    """The batch's loss as one differentiable scalar (float64) for a first-order step."""
    return chunk_losses(model, kind, batch, 1)[0]


def loss_weight(kind: str, batch: dict) -> float:
    """What a micro-batch's mean loss counts in a sum over micro-batches: its loss tokens (lm) or examples."""
    if kind == "lm":
        return float((batch["labels"][:, 1:] != D.IGNORE).sum())
    return float(len(batch["labels"]))


@torch.no_grad()
def evaluate(model, kind: str, items: list, tokenizer, max_length: int, batch_size: int) -> dict:
    """Dev metrics: accuracy, mean candidate loss and the rate at which each class is predicted (a 0.6 accuracy may
    be a label prior) for classification; token loss and perplexity for text."""
    if not items:
        return {}
    if kind == "classification":
        correct, total, predicted = 0, 0.0, torch.zeros(len(items[0].candidates))
        for i in range(0, len(items), batch_size):
            batch = D.encode_candidates(items[i:i + batch_size], tokenizer, max_length)
            scores = classification_scores(model, batch)
            pred = scores.argmax(-1).cpu()
            correct += int((pred == batch["labels"]).sum())
            predicted += torch.bincount(pred, minlength=len(predicted)).float()
            total += float(D.classification_loss(scores, batch["labels"])) * len(batch["labels"])
        return {"accuracy": correct / len(items), "loss": total / len(items),
                "predicted": [round(float(x), 4) for x in predicted / len(items)]}  # how often each class is chosen
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = D.collate_lm(items[i:i + batch_size], D.pad_id(tokenizer))
        n = int((batch["labels"][:, 1:] != D.IGNORE).sum())
        total += float(lm_chunk_losses(model, batch, 1)[0]) * n
        count += n
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50))}


def dev_metric(metrics: dict) -> float:
    """Higher is better: accuracy where there is one, else minus the loss."""
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]
