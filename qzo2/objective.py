"""The losses and metrics every method shares: the chunked LM loss, candidate scores and their classification loss,
and the dev evaluation. A ZO step asks for the loss of each of its 2k perturbation chunks (`chunk_losses`); a
first-order step for one differentiable loss (`loss`, the same function with one chunk)."""
from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
import torch.nn.functional as F

from . import data as D
from . import distributed


def model_inputs(model, batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    device = model.get_input_embeddings().weight.device
    inputs = {k: batch[k].to(device) for k in keys if k in batch}
    inputs["use_cache"] = False  # no KV cache: a training forward never decodes
    return inputs


def candidate_logprobs(logits_last: torch.Tensor, batch: dict) -> torch.Tensor:
    """[B, C] mean log-prob of each candidate's tokens (a batch of data.encode_candidates), from the logits of the
    last n_last positions (more positions are fine: only the last n_last are read). Logit t predicts token t+1."""
    if "cand_ids" in batch:  # shared-prompt rows: the last position predicts every single-token candidate
        logp = torch.log_softmax(logits_last[:, -1].float(), -1)
        rows = logp.shape[0] // batch["cand_ids"].shape[0]  # a stacked (2k-chunk) batch repeats the examples
        return logp.gather(-1, batch["cand_ids"].repeat(rows, 1).to(logp.device))
    n = batch["n_last"]
    logits = logits_last[:, -n:-1].float()
    targets = batch["input_ids"][:, -n + 1:].to(logits.device)
    mask = batch["cand_mask"][:, -n + 1:].to(logits.device).bool()
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(mask, logp, torch.zeros_like(logp))  # padded rows may hold NaN logits: never multiply them in
    scores = logp.sum(-1) / mask.sum(-1)
    return scores.view(len(batch["labels"]), -1)


def classification_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the candidates' length-normalized log-likelihoods (MeZO's training as classification)."""
    return F.cross_entropy(scores, labels.to(scores.device))


def classification_scores(model, batch: dict) -> torch.Tensor:
    """[rows/C, C] mean candidate log-probs; only the last n_last positions' logits are computed."""
    out = model(**model_inputs(model, batch), logits_to_keep=batch["n_last"])
    return candidate_logprobs(out.logits.float(), batch)


HEAD_TOKENS = 512  # positions per LM-head call: bounds the [tokens, vocab] logits (0.26 GB of fp32 at Llama-3's 128k)


def _head_nll(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over positions of next-token cross-entropy per row (fp32) of one slice of rows and positions."""
    logits = head(hidden).float()
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=D.IGNORE, reduction="none").sum(dim=1)


def lm_chunk_sums(model, batch: dict, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ next-token cross-entropy, loss tokens) of each of `chunks` equal row chunks, float64. The decoder runs once;
    the LM head and the loss run on a slice of rows of every chunk (so a perturbed head still sees all its chunks)
    of about HEAD_TOKENS positions in all, so logits for the whole batch x vocab never exist at once. With
    gradients, each slice is checkpointed: its logits are recomputed in backward instead of kept."""
    hidden = model.get_decoder()(**model_inputs(model, batch)).last_hidden_state
    head = model.get_output_embeddings()
    labels = batch["labels"][:, 1:].to(hidden.device)
    per = hidden.shape[0] // chunks
    hs = hidden.view(chunks, per, *hidden.shape[1:])  # [chunks, rows per chunk, T, H]: slices, no index tensors
    ls = labels.view(chunks, per, -1)
    positions = hs.shape[2] - 1
    rows_per_head = max(1, HEAD_TOKENS // (chunks * max(positions, 1)))
    grad = torch.is_grad_enabled() and hidden.requires_grad
    sums = []
    for r in range(0, per, rows_per_head):
        e = min(r + rows_per_head, per)
        span = max(1, HEAD_TOKENS // (chunks * (e - r)))
        part = None
        for a in range(0, positions, span):
            b = min(a + span, positions)
            x = hs[:, r:e, a:b].reshape(-1, b - a, hs.shape[3])
            y = ls[:, r:e, a:b].reshape(-1, b - a)
            nll = (torch.utils.checkpoint.checkpoint(_head_nll, head, x, y, use_reentrant=False) if grad
                   else _head_nll(head, x, y))
            part = nll if part is None else part + nll
        sums.append(part.double().view(chunks, e - r))
    counts = (ls != D.IGNORE).sum(dim=2).double()
    return torch.cat(sums, dim=1).sum(1), counts.sum(1)


def lm_chunk_losses(model, batch: dict, chunks: int) -> torch.Tensor:
    """Mean next-token cross-entropy of each of `chunks` equal row chunks (float64)."""
    sums, counts = lm_chunk_sums(model, batch, chunks)
    return sums / counts.clamp(min=1)


def chunk_sums(model, kind: str, batch: dict, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([chunks] loss sums, [chunks] counts), float64, of `chunks` equal row chunks of a batch: the LM loss summed over
    loss tokens ("lm") or the candidates' cross-entropy summed over examples ("classification"). Sums and counts,
    not means, so that slices of one batch on several ranks add up to the batch (distributed.gather_sum)."""
    if kind == "lm":
        return lm_chunk_sums(model, batch, chunks)
    scores = classification_scores(model, batch)
    labels = batch["labels"]
    sums = [F.cross_entropy(s, labels[: s.shape[0]].to(s.device), reduction="none").double().sum()
            for s in scores.chunk(chunks)]
    return torch.stack(sums), torch.full((chunks,), float(scores.shape[0] // chunks), dtype=torch.float64,
                                         device=scores.device)


def chunk_losses(model, kind: str, batch: dict, chunks: int) -> torch.Tensor:
    """[chunks] float64 mean losses of `chunks` equal row chunks of a batch (see chunk_sums)."""
    sums, counts = chunk_sums(model, kind, batch, chunks)
    return sums / counts.clamp(min=1)


def loss(model, kind: str, batch: dict) -> torch.Tensor:
    """The batch's loss as one differentiable scalar (float64) for a first-order step."""
    return chunk_losses(model, kind, batch, 1)[0]


def loss_weight(kind: str, batch: dict) -> torch.Tensor:
    """What a micro-batch's mean loss counts in a sum over micro-batches: its loss tokens (lm) or examples, as a
    float64 scalar on the batch's device (counted there: no host sync)."""
    labels = batch["labels"]
    if kind == "lm":
        return (labels[:, 1:] != D.IGNORE).sum().double()
    return torch.tensor(float(len(labels)), dtype=torch.float64, device=labels.device)


@torch.no_grad()
def evaluate(model, kind: str, items: list, tokenizer, max_length: int, batch_size: int,
             scores: list | None = None) -> dict:
    """Dev metrics: accuracy, mean candidate loss and the rate at which each class is predicted (a 0.6 accuracy may
    be a label prior) for classification; token loss and perplexity for text. Under torch.distributed each rank scores
    its part of `items` and the sums are added across ranks, so every rank returns the metrics of all of them.
    `scores`, a list, receives each classification example's candidate scores (this rank's part, in order)."""
    if not items:
        return {}
    world = distributed.world()
    mine = world.eval_shard(items)
    if kind == "classification":
        # [correct, Σ loss, predicted per class...]: one float64 vector summed across ranks
        sums = torch.zeros(2 + len(items[0].candidates), dtype=torch.float64)
        for i in range(0, len(mine), batch_size):
            batch = D.encode_candidates(mine[i:i + batch_size], tokenizer, max_length)
            s = classification_scores(model, batch)
            pred = s.argmax(-1).cpu()
            if scores is not None:
                scores.extend(s.tolist())
            sums[0] += int((pred == batch["labels"]).sum())
            sums[1] += float(classification_loss(s, batch["labels"])) * len(batch["labels"])
            sums[2:] += torch.bincount(pred, minlength=len(sums) - 2).double()
        distributed.all_sum(sums)
        return {"accuracy": int(sums[0]) / len(items), "loss": float(sums[1]) / len(items),
                "predicted": [round(float(x), 4) for x in sums[2:] / len(items)]}  # how often each class is chosen
    sums = torch.zeros(2, dtype=torch.float64)  # [Σ token loss, tokens]
    for i in range(0, len(mine), batch_size):
        batch = D.collate_lm(mine[i:i + batch_size], D.pad_id(tokenizer))
        n = int((batch["labels"][:, 1:] != D.IGNORE).sum())
        sums[0] += float(lm_chunk_losses(model, batch, 1)[0]) * n
        sums[1] += n
    distributed.all_sum(sums)
    mean = float(sums[0]) / max(float(sums[1]), 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50))}


def dev_metric(metrics: dict) -> float:
    """Higher is better: accuracy where there is one, else minus the loss."""
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]
