"""What the first-order methods share: the FirstOrder base (trained tensors require grad, the loss of a batch split
over micro-batches and ranks, fp16 loss scaling, scales floored at scale_floor, one AdamW step), its options
(gradient clipping, the fp16 loss-scale window), and `adamw_for`, the torch.optim.AdamW AdamW and HiFT use."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import distributed, objective
from ..config import _f
from .base import Method


@dataclass
class FirstOrderOptions:
    clip_grad_norm: float = _f(0.0, "first-order: clip the global gradient norm (LOMO/AdaLomo: two backward passes, "
                                    "the first only measures); 0 = off", range="[0, inf)")
    clip_grad_value: float = _f(0.0, "first-order: clip each gradient entry to [-v, v]; 0 = off", range="[0, inf)")
    gradient_checkpointing: bool = _f(False, "first-order: keep only each decoder block's input and recompute the "
                                             "block in backward (less activation memory, one more forward; always on "
                                             "when blocks stream: offload)")
    loss_scale_window: int = _f(1000, "first-order, dtype=fp16: dynamic loss scale (from 2^16), halved and the step "
                                      "skipped on overflow, doubled after this many overflow-free steps", range="[1, inf)")


class DynamicLossScale:
    """fp16 loss scaling: start at `init`; an overflow halves the scale (not below 1) and skips the step; after
    `window` overflow-free steps in a row it doubles."""

    def __init__(self, window: int, init: float = 2.0 ** 16):
        self.scale = torch.tensor(init, dtype=torch.float64)
        self.good = torch.tensor(0, dtype=torch.int64)
        self.window = window

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale.copy_(max(float(self.scale) / 2, 1.0))
            self.good.zero_()
            return
        self.good += 1
        if int(self.good) >= self.window:
            self.scale.mul_(2)
            self.good.zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"loss_scale": self.scale, "loss_scale_good_steps": self.good}


class FirstOrder(Method):
    """What the first-order methods share: trained tensors require grad, the loss of a batch, fp16 loss scaling,
    scales floored at scale_floor (a quantized model), the per-step seed of stochastic rounding."""

    first_order = True

    def __init__(self, model, cfg, targets, kind):
        super().__init__(model, cfg, targets, kind)
        for t in targets:
            t.tensor.requires_grad_(True)
        self.scaler = DynamicLossScale(cfg.loss_scale_window) if cfg.dtype == "fp16" else None
        self.floor = cfg.scale_floor  # store() floors only quantization scales
        self.floored = {id(t.tensor) for t in targets if t.name == "scales"}
        self.world = distributed.world()
        # under torch.distributed: each gradient is summed across ranks the moment it is complete, by a hook
        # registered before any method's own, so every method (LOMO's fused update included) reads the global one
        # (with gradient accumulation only in the last micro-batch's backward, over the accumulated gradient, as
        # DDP's no_sync does: `self.sync` is off for the others)
        self.sync = True
        self.reduce_handles = [t.tensor.register_post_accumulate_grad_hook(self._all_sum_grad) for t in targets
                               ] if self.world.enabled else []

    def _all_sum_grad(self, tensor: torch.Tensor) -> None:
        if self.sync:
            distributed.all_sum(tensor.grad)

    def step_count(self, micro: list) -> torch.Tensor:
        """What the step's mean loss divides by: its loss tokens (lm) or examples, over all micro-batches and ranks
        (float64 scalar; on one process it stays on the batch's device)."""
        local = sum(objective.loss_weight(self.kind, b) for b in micro)
        if not self.world.enabled:
            return local
        return distributed.all_sum(local.reshape(1).cpu())[0]

    def loss(self, batch: dict, total: float | None = None) -> torch.Tensor:
        """This rank's share of the step's mean loss: its (micro-)batch's loss sum over `total`, the step's count on
        all ranks (default: this batch's), so the shares add up to the step's mean and the summed gradients to its
        gradient. One process, one batch: the batch's mean loss."""
        sums, _ = objective.chunk_sums(self.model, self.kind, batch, 1)
        count = self.step_count([batch]) if total is None else total
        return sums[0] / count.to(sums.device).clamp(min=1.0)

    def global_value(self, share: torch.Tensor) -> float:
        """Σ over ranks of a loss share (the step's mean loss; NaN on every rank when any rank's is), so every rank
        takes the same skip decision."""
        value = share.detach().double().reshape(1).cpu()
        return float(distributed.all_sum(value)[0]) if self.world.enabled else float(value[0])

    def adamw_step(self, optimizer, params: list, batch, lr: float) -> dict:
        """Backward over the (micro-)batches, unscale / overflow check (fp16), clip, one optimizer step at `lr`,
        gradients freed, scales floored: the step AdamW and HiFT (on its active group) share."""
        micro = batch if isinstance(batch, list) else [batch]
        total = self.step_count(micro)
        scale = float(self.scaler.scale) if self.scaler else 1.0
        loss_sum = 0.0
        for i, b in enumerate(micro):
            loss = self.loss(b, total)  # this micro-batch's share of the step's mean loss
            value = self.global_value(loss)
            if not math.isfinite(value):
                optimizer.zero_grad(set_to_none=True)
                return {"skipped": "nonfinite", "losses": [value]}
            self.sync = i == len(micro) - 1
            try:
                (loss * scale).backward()
            finally:
                self.sync = True
            loss_sum += value
        with torch.no_grad():
            if scale != 1.0:
                for p in params:
                    p.grad.mul_(1.0 / scale)
            out = {"loss": loss_sum}
            if self.scaler:
                overflow = not all(torch.isfinite(p.grad).all() for p in params)
                self.scaler.update(overflow)
                out["loss_scale"] = scale
                if overflow:
                    optimizer.zero_grad(set_to_none=True)
                    return {"skipped": "overflow", "losses": [loss_sum], "loss_scale": scale}
            if self.cfg.clip_grad_value:
                torch.nn.utils.clip_grad_value_(params, self.cfg.clip_grad_value)
            if self.cfg.clip_grad_norm:
                out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for p in params:
                if id(p) in self.floored:
                    p.clamp_(min=self.floor)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.scaler.state_tensors() if self.scaler else {}

    def close(self) -> None:
        for h in self.reduce_handles:
            h.remove()
        for t in self.targets:
            t.tensor.grad = None
            t.tensor.requires_grad_(False)


def adamw_for(targets, cfg, device=None) -> torch.optim.AdamW:
    """torch.optim.AdamW over the targets (weight decay only where t.decay), its state made up front (on `device`,
    default each tensor's own), so a checkpoint always holds the same tensors."""
    decay = [t.tensor for t in targets if t.decay]
    rest = [t.tensor for t in targets if not t.decay]
    groups = ([{"params": decay, "weight_decay": cfg.weight_decay}] if decay else []) + (
        [{"params": rest, "weight_decay": 0.0}] if rest else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, foreach=False)
    for t in targets:
        p = t.tensor
        dev = device or p.device
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(p.shape, dtype=p.dtype, device=dev),
                        "exp_avg_sq": torch.zeros(p.shape, dtype=p.dtype, device=dev)}
    return opt
