"""LOMO and AdaLomo: first-order, the update fused into backward (at most one gradient alive, no gradient buffers).

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

from .base import step_seed, store
from .first_order import FirstOrder, FirstOrderOptions
from .registry import BenchMode, register

NO_ACCUMULATION = ("{} updates each tensor inside backward, as soon as its gradient exists, so there is nothing to "
                   "accumulate into")


@register("lomo", help="LOMO: first-order SGD with the update fused into backward (at most one gradient alive).",
          options=FirstOrderOptions, first_order=True, accumulates=NO_ACCUMULATION.format("LOMO"),
          bench={"lomo": BenchMode(quantized=True), "lomo-offload": BenchMode(quantized=True, offload=True)},
          memory="activations + one gradient at a time")
class Lomo(FirstOrder):
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


@register("adalomo", help="AdaLomo: LOMO with Adafactor's factored second moment (the recommended method).",
          options=FirstOrderOptions, first_order=True, accumulates=NO_ACCUMULATION.format("AdaLomo"),
          bench={"adalomo": BenchMode(quantized=True), "adalomo-offload": BenchMode(quantized=True, offload=True)},
          memory="activations + one gradient at a time + factored second moments (rows + columns)")
class AdaLomo(Lomo):
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
        lr = self._rms(new).clamp_(min=self.EPS[1]).mul_(self.lr)  # on the device: no host sync per tensor
        if self.cfg.weight_decay and t.decay:
            new.mul_(1.0 - lr * self.cfg.weight_decay)
        new.sub_(upd.mul_(lr))
        store(t, new, self.seed, self.floor)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"adalomo.t": self.t, **super().state_tensors()}
        for path, m in self.moments.items():
            out.update({f"{path}.exp_avg_sq_{k}": v for k, v in m.items()})
        return out
