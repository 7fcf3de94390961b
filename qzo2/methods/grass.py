"""GRASS (arXiv 2406.17660): Adam on row-sparse projected gradients of the weight matrices.

For a trained nn.Linear weight W (m×n, m = out_features) the projection is Pᵀ = ρB, B selecting r rows `idx`,
ρ = diag(ρ_j): the projected gradient PᵀG = ρ·G[idx] is r×n, Adam's moments live in r×n, and the update
W[idx] ← W[idx] − lr·α·ρ·Adam(PᵀG) touches only those rows (AdamW-style decoupled weight decay on them too).
Every `grass_refresh` steps (step 0 included) one backward produces the full gradient of each matrix, one at a
time (a post-accumulate hook picks the rows and frees it), and `idx` is chosen:
  top     the r rows of largest ‖G_j‖ (ρ = I): the row selection closest to G in Frobenius norm;
  sample  r rows drawn with replacement, row j with probability q_j = ‖G_j‖ / Σ‖G_i‖, scaled ρ_j = 1/√(r·q_j) so
          that E[P·Pᵀ·G] = G. Among multinomial row samplers, q ∝ ‖G_j‖ minimizes E‖PPᵀG − G‖²_F (the
          variance Σ_j ‖G_j‖²/(r·q_j) − ‖G‖²/r is smallest, by Cauchy–Schwarz, at q_j ∝ ‖G_j‖).
Between refreshes a custom autograd function computes only ρ·(∂L/∂Y[:, idx])ᵀX for each matrix (never its m×n
gradient) besides the ∂L/∂X backprop needs. At a refresh the moments start again from zero (`grass_reset`, the
default) or keep the rows that stay selected.

What was available and what is ours: the paper (no code has been released; its repository holds a README only)
gives the projection Pᵀ = ρB, the Top-r and multinomial selections with ρ_jj = 1/√(r·q_j), the projected
gradient computed as ρ·dY[:, idx]ᵀX, Adam in r×n, the row-sparse update and the periodic refresh. Ours: the exact
sampling probabilities (q ∝ ‖G_j‖, chosen by the variance argument above, as the paper's text was not available
here), sampling with replacement, the defaults (r = 64, refresh every 100 steps, Top-r, α = 1, moments reset at a
refresh), decoupled weight decay on the selected rows, the full gradient of a refresh step computed one matrix at a
time, and 1-D tensors (biases, norm gains) trained by dense AdamW. GRASS needs dense weights: a quantized model's
codes cannot take a row update, so it is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..config import ConfigError, _f
from .base import generator, step_seed, to_dtype
from .first_order import FirstOrder, FirstOrderOptions, adamw_for
from .registry import BenchMode, register
SELECT = ("top", "sample")
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults


@dataclass
class GrassOptions(FirstOrderOptions):
    grass_rank: int = _f(64, "grass: rows r of each weight matrix whose projected gradient is trained", range="[1, inf)")
    grass_refresh: int = _f(100, "grass: steps between row selections (each takes one full gradient)", range="[1, inf)")
    grass_select: str = _f("top", "grass: top = the r largest-norm gradient rows; sample = r rows drawn with "
                                  "probability proportional to their norm, unbiased scaling", ("top", "sample"))
    grass_reset: bool = _f(True, "grass: restart the r x n Adam moments at each row selection (else keep the rows "
                                 "that stay selected)")
    grass_scale: float = _f(1.0, "grass: scale alpha of the row update", range="(0, inf)")

    def validate(self, cfg) -> None:
        if cfg.dtype == "fp16":  # its row-sparse backward has no loss scaler
            raise ConfigError("method=grass does not scale the loss, which fp16 needs: use dtype=bf16 or fp32")


def select_rows(row_norms: torch.Tensor, r: int, how: str, gen: torch.Generator | None = None):
    """(idx [r] long, rho [r] fp32) from the rows' gradient norms: Top-r with ρ = 1, or r draws with replacement
    with q ∝ norm and ρ = 1/√(r·q)."""
    if how == "top":
        idx = torch.topk(row_norms, r, sorted=True).indices
        return idx, torch.ones(r, dtype=torch.float32, device=row_norms.device)
    total = row_norms.sum()
    q = row_norms / total if total > 0 else torch.full_like(row_norms, 1.0 / row_norms.numel())
    idx = torch.multinomial(q, r, replacement=True, generator=gen)
    return idx, (1.0 / torch.sqrt(r * q[idx])).float()


class ProjectedLinear(torch.autograd.Function):
    """y = x·Wᵀ + b whose backward gives ∂L/∂x, ∂L/∂b and, for W, only the projected gradient
    ρ·(∂L/∂y[:, idx])ᵀx (r×n) as the gradient of the placeholder `proj`: no m×n gradient is ever formed."""

    @staticmethod
    def forward(ctx, x, weight, bias, proj, idx, rho):
        ctx.save_for_backward(x, weight, idx, rho)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, idx, rho = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ weight.to(dy2.dtype)).reshape(x.shape) if ctx.needs_input_grad[0] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dproj = None
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, x.shape[-1])
            dproj = (dy2[:, idx].t().float() @ x2.float()).mul_(rho.unsqueeze(1))
        return dx, None, db, dproj, None, None


@register("grass", help="GRASS: Adam on row-sparse projected gradients of the weight matrices.",
          options=GrassOptions, trains=("weights",), first_order=True,
          accumulates="each step's rows are selected and updated within the step",
          bench={"grass": BenchMode(quantized=False)},
          memory="activations + r rows of gradient and Adam moments per weight matrix")
class Grass(FirstOrder):
    def __init__(self, model, cfg, targets, kind):
        if any(t.name == "scales" for t in targets):
            raise ValueError("method=grass updates rows of dense weight matrices; a quantized model's int codes "
                             "cannot take a row update (train its scales with lomo/adalomo/adamw/hift, or GRASS on "
                             "an unquantized model)")
        super().__init__(model, cfg, targets, kind)
        self.r, self.refresh, self.how = cfg.grass_rank, cfg.grass_refresh, cfg.grass_select
        self.mats = [t for t in targets if isinstance(t.module, nn.Linear) and t.name == "weight" and not t.aliases]
        mat_ids = {id(t) for t in self.mats}
        self.dense = [t for t in targets if id(t) not in mat_ids]  # biases, norms, embeddings: plain AdamW
        self.dense_opt = adamw_for(self.dense, cfg) if self.dense else None
        self.handles = [t.tensor.register_post_accumulate_grad_hook(self._refresh_hook(t)) for t in self.mats]
        self.state = {}
        for t in self.mats:
            m, n = t.tensor.shape
            if self.r > m:
                raise ValueError(f"grass_rank {self.r} exceeds the {m} rows of {t.path}")
            dev = t.tensor.device
            self.state[t.path] = {
                "idx": torch.arange(self.r, device=dev), "rho": torch.ones(self.r, device=dev),
                "exp_avg": torch.zeros(self.r, n, device=dev), "exp_avg_sq": torch.zeros(self.r, n, device=dev),
                "step": torch.zeros((), dtype=torch.int64)}
            t.tensor.requires_grad_(False)
            t.proj = torch.zeros(self.r, n, device=dev, requires_grad=True)
            t.module.forward = self._forward(t)
        self.refreshing = False
        self.projected = {}  # path -> this step's projected gradient (r×n)
        self.seed = 0

    def _forward(self, t):
        module = t.module

        def forward(x):
            if self.refreshing:  # the full gradient, once per refresh
                return F.linear(x, module.weight, module.bias)
            st = self.state[t.path]
            return ProjectedLinear.apply(x, module.weight, module.bias, t.proj, st["idx"], st["rho"])

        return forward

    def _refresh_hook(self, t):
        def hook(tensor):
            g = tensor.grad.float()
            tensor.grad = None  # one matrix's full gradient at a time
            st = self.state[t.path]
            gen = generator(self.seed, t.index, 0, g.device) if self.how == "sample" else None
            idx, rho = select_rows(g.norm(dim=1), self.r, self.how, gen)
            self._remap(st, idx)
            st["idx"], st["rho"] = idx, rho
            self.projected[t.path] = g[idx].mul_(rho.unsqueeze(1))

        return hook

    def _remap(self, st: dict, idx: torch.Tensor) -> None:
        """At a refresh: zero moments (grass_reset), or carry each newly selected row's moments if it was selected
        before (first occurrence), zeros for rows new to the selection."""
        if self.cfg.grass_reset:
            st["exp_avg"].zero_()
            st["exp_avg_sq"].zero_()
            st["step"].zero_()
            return
        old = {int(j): p for p, j in reversed(list(enumerate(st["idx"].tolist())))}
        src = torch.tensor([old.get(int(j), -1) for j in idx.tolist()], device=idx.device)
        keep = src >= 0
        for key in ("exp_avg", "exp_avg_sq"):
            new = torch.zeros_like(st[key])
            new[keep] = st[key][src[keep]]
            st[key] = new

    @torch.no_grad()
    def _update(self, t, g: torch.Tensor, lr: float) -> None:
        """Adam (torch.optim.AdamW's arithmetic) on the r×n projected gradient, then W[idx] ← W[idx](1 − lr·wd) −
        lr·α·ρ·update; rows drawn twice get both updates."""
        st = self.state[t.path]
        st["step"] += 1
        step = int(st["step"])
        st["exp_avg"].lerp_(g, 1 - BETAS[0])
        st["exp_avg_sq"].mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
        denom = (st["exp_avg_sq"].sqrt() / (1 - BETAS[1] ** step) ** 0.5).add_(EPS)
        upd = (st["exp_avg"] / (1 - BETAS[0] ** step)).div_(denom).mul_(st["rho"].unsqueeze(1))
        rows, inverse = torch.unique(st["idx"], return_inverse=True)
        delta = torch.zeros(len(rows), upd.shape[1], device=upd.device).index_add_(0, inverse, upd)
        w = t.tensor
        new = w[rows].float()
        if self.cfg.weight_decay:
            new.mul_(1 - lr * self.cfg.weight_decay)
        new.add_(delta, alpha=-lr * self.cfg.grass_scale)
        w[rows] = to_dtype(new, w.dtype, self.seed, t.index)

    def step(self, batch, step: int) -> dict:
        lr, self.seed = self.lr_at(step), step_seed(self.cfg.seed, step)
        self.refreshing = step % self.refresh == 0
        for t in self.mats:
            t.tensor.requires_grad_(self.refreshing)
        self.projected = {}
        try:
            loss = self.loss(batch)
            value = self.global_value(loss)
            if not math.isfinite(value):
                return {"skipped": "nonfinite", "losses": [value]}
            loss.backward()
        finally:
            for t in self.mats:
                t.tensor.requires_grad_(False)
            self.refreshing = False
        with torch.no_grad():
            for t in self.mats:
                g = self.projected.pop(t.path, None)
                if g is None:
                    g, t.proj.grad = t.proj.grad, None
                    if g is not None:  # distributed: the r×n projected gradients are what crosses ranks
                        distributed.all_sum(g)
                if g is not None:
                    self._update(t, g, lr)
            if self.dense_opt is not None:
                for group in self.dense_opt.param_groups:
                    group["lr"] = lr
                self.dense_opt.step()
                self.dense_opt.zero_grad(set_to_none=True)
        return {"loss": value, "refresh": float(step % self.refresh == 0)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = dict(super().state_tensors())
        for path, st in self.state.items():
            out.update({f"{path}.grass_{k}": v for k, v in st.items()})
        if self.dense_opt is not None:
            for t in self.dense:
                out.update({f"{t.path}.{k}": v for k, v in self.dense_opt.state[t.tensor].items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)  # copies into the same tensors (idx, rho, moments keep their shapes)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for t in self.mats:
            if "forward" in vars(t.module):
                del t.module.forward
            t.proj = None
        super().close()
