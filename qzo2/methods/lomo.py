"""First-order methods: LOMO and AdaLomo (the update fused into backward: at most one gradient alive, no gradient
buffers), and plain AdamW (torch.optim, the non-lean reference).

LOMO (arXiv 2306.09782, OpenLMLab/LOMO): a `register_post_accumulate_grad_hook` on every trained tensor applies
θ ← θ(1 − lr·wd) − lr·g in fp32 the moment g is complete, and frees g. Clipping by value clamps g in the hook;
clipping by global norm needs the norm before the first update, so it takes two backward passes over one retained
graph (the first only sums ‖g‖² and frees each g; the second updates with coef = min(1, C/(‖g‖ + 1e-6))), computed
from the unclipped gradients as LOMO's code does. With fp16 the loss is scaled, and the first pass doubles as the
overflow check, so an overflow skips the whole step (LOMO's own code, without norm clipping, has already updated
part of the model when it finds one) and halves the scale; the scale doubles after `loss_scale_window` clean steps
(LOMO's only ever shrinks without a window reset). bf16 and fp32 need no scaler.

AdaLomo (arXiv 2310.10195): the same hooks around Adafactor's update without first moment: β₂ₜ = 1 − t^−0.8,
u = g² + 1e-30, a factored second moment (row and column means, fp32) for matrices and a full one for vectors,
update = g·rsqrt(r/mean(r))·rsqrt(c), divided by max(1, RMS(update)); the step is lr·max(1e-3, RMS(θ)) with weight
decay θ(1 − lr_eff·wd). Numerically `transformers.Adafactor(scale_parameter=True, relative_step=False,
warmup_init=False, beta1=None, clip_threshold=1.0, decay_rate=-0.8, eps=(1e-30, 1e-3))` (tested).

A tied tensor (SmolLM2's embedding is its head) is one target: autograd sums both uses' gradients before its one
AccumulateGrad, so its hook runs once per pass with the full gradient. Gradient accumulation cannot work with a
fused update (config refuses it). bf16/fp16 tensors are written back by stochastic rounding (base.store).
"""
from __future__ import annotations

import math

import torch

from .. import distributed, objective
from .base import Method, step_seed, store


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

    def step_count(self, micro: list) -> float:
        """What the step's mean loss divides by: its loss tokens (lm) or examples, over all micro-batches and ranks."""
        local = sum(objective.loss_weight(self.kind, b) for b in micro)
        if not self.world.enabled:
            return local
        return float(distributed.all_sum(torch.tensor([local], dtype=torch.float64))[0])

    def loss(self, batch: dict, total: float | None = None) -> torch.Tensor:
        """This rank's share of the step's mean loss: its (micro-)batch's loss sum over `total`, the step's count on
        all ranks (default: this batch's), so the shares add up to the step's mean and the summed gradients to its
        gradient. One process, one batch: the batch's mean loss."""
        sums, _ = objective.chunk_sums(self.model, self.kind, batch, 1)
        return sums[0] / max(self.step_count([batch]) if total is None else total, 1.0)

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


class Lomo(FirstOrder):
    name = "lomo"

    def __init__(self, model, cfg, targets, kind):
        super().__init__(model, cfg, targets, kind)
        self.handles = [t.tensor.register_post_accumulate_grad_hook(self._hook(t)) for t in targets]
        self.mode = "update"  # or "measure": the first of two passes
        self.inv_scale = 1.0
        self.coef = 1.0
        self.sq_norm = None
        self.lr = 0.0
        self.seed = 0
        self.max_grads_alive = 0  # the most trained tensors holding a .grad at once, seen inside the hooks

    def _hook(self, t):
        def hook(tensor):
            alive = sum(x.tensor.grad is not None for x in self.targets)
            self.max_grads_alive = max(self.max_grads_alive, alive)
            g = tensor.grad.to(torch.float32)  # the gradient itself when it is fp32: nobody else holds it now
            tensor.grad = None  # freed at once: the next tensor's gradient is the only one alive
            if self.inv_scale != 1.0:
                g.mul_(self.inv_scale)
            with torch.no_grad():
                if self.mode == "measure":
                    self.sq_norm += g.pow(2).sum().double()
                    return
                if self.cfg.clip_grad_value:
                    g.clamp_(-self.cfg.clip_grad_value, self.cfg.clip_grad_value)
                if self.coef != 1.0:
                    g.mul_(self.coef)
                self.update(t, g)

        return hook

    def update(self, t, g: torch.Tensor) -> None:
        """θ ← θ(1 − lr·wd) − lr·g, in fp32 (wd only where t.decay)."""
        new = t.tensor.detach().to(torch.float32, copy=True)
        if self.cfg.weight_decay and t.decay:
            new.mul_(1.0 - self.lr * self.cfg.weight_decay)
        new.add_(g, alpha=-self.lr)
        store(t, new, self.seed, self.floor)

    def begin_step(self) -> None:
        """Per-step work before the updating pass (AdaLomo counts its step)."""

    def step(self, batch: dict, step: int) -> dict:
        self.lr, self.seed = self.lr_at(step), step_seed(self.cfg.seed, step)
        loss = self.loss(batch)
        loss_value = self.global_value(loss)
        if not math.isfinite(loss_value):
            return {"skipped": "nonfinite", "losses": [loss_value]}
        scale = float(self.scaler.scale) if self.scaler else 1.0
        self.inv_scale, self.coef = 1.0 / scale, 1.0
        out = {"loss": loss_value}
        if self.cfg.clip_grad_norm or self.scaler:  # pass 1: the norm (and the overflow check), nothing updated
            self.mode, self.sq_norm = "measure", torch.zeros((), dtype=torch.float64, device=loss.device)
            (loss * scale).backward(retain_graph=True)
            norm = math.sqrt(float(self.sq_norm))
            if self.scaler:
                overflow = not math.isfinite(norm)
                self.scaler.update(overflow)
                out["loss_scale"] = scale
                if overflow:
                    return {"skipped": "overflow", "losses": [loss_value], "loss_scale": scale}
            out["grad_norm"] = norm
            if self.cfg.clip_grad_norm:
                self.coef = min(1.0, self.cfg.clip_grad_norm / (norm + 1e-6))
        self.mode = "update"
        self.begin_step()
        (loss * scale).backward()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        super().close()


class AdaLomo(Lomo):
    name = "adalomo"
    EPS = (1e-30, 1e-3)
    DECAY_RATE = -0.8
    CLIP_THRESHOLD = 1.0

    def __init__(self, model, cfg, targets, kind):
        super().__init__(model, cfg, targets, kind)
        self.t = torch.tensor(0, dtype=torch.int64)  # updates applied (skipped steps do not count)
        self.moments = {}
        for x in targets:
            shape, dev = x.tensor.shape, x.tensor.device
            if len(shape) >= 2:
                self.moments[x.path] = {"row": torch.zeros(shape[:-1], dtype=torch.float32, device=dev),
                                        "col": torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=dev)}
            else:
                self.moments[x.path] = {"full": torch.zeros(shape, dtype=torch.float32, device=dev)}

    def begin_step(self) -> None:
        self.t += 1
        self.beta2 = 1.0 - math.pow(int(self.t), self.DECAY_RATE)

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        return x.norm(2) / (x.numel() ** 0.5)

    def update(self, t, g: torch.Tensor) -> None:
        m, beta = self.moments[t.path], self.beta2
        u = g * g + self.EPS[0]
        if "row" in m:
            m["row"].mul_(beta).add_(u.mean(dim=-1), alpha=1.0 - beta)
            m["col"].mul_(beta).add_(u.mean(dim=-2), alpha=1.0 - beta)
            r = (m["row"] / m["row"].mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            upd = torch.mul(r, m["col"].unsqueeze(-2).rsqrt()).mul_(g)
        else:
            m["full"].mul_(beta).add_(u, alpha=1.0 - beta)
            upd = m["full"].rsqrt().mul_(g)
        upd.div_((self._rms(upd) / self.CLIP_THRESHOLD).clamp_(min=1.0))
        new = t.tensor.detach().to(torch.float32, copy=True)
        lr = self.lr * max(self.EPS[1], float(self._rms(new)))
        if self.cfg.weight_decay and t.decay:
            new.mul_(1.0 - lr * self.cfg.weight_decay)
        new.add_(upd, alpha=-lr)
        store(t, new, self.seed, self.floor)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"adalomo.t": self.t, **super().state_tensors()}
        for path, m in self.moments.items():
            out.update({f"{path}.exp_avg_sq_{k}": v for k, v in m.items()})
        return out


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


class AdamW(FirstOrder):
    """torch.optim.AdamW after a full backward (every gradient alive at once, two fp32 moments per trained value):
    the reference the memory-lean methods are measured against. Gradient accumulation: a step may be a list of
    micro-batches, each loss weighted by its share of the step's tokens (lm) or examples."""

    name = "adamw"

    def __init__(self, model, cfg, targets, kind):
        super().__init__(model, cfg, targets, kind)
        self.optimizer = adamw_for(targets, cfg)

    def step(self, batch, step: int) -> dict:
        return self.adamw_step(self.optimizer, [t.tensor for t in self.targets], batch, self.lr_at(step))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = dict(super().state_tensors())
        for t in self.targets:
            for k, v in self.optimizer.state[t.tensor].items():
                out[f"{t.path}.{k}"] = v
        return out
