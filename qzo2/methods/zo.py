"""Zeroth-order methods (QZO, MeZO, ZO2 mode): z from counters, one batched ±ε forward, DDC clip, update.

QZO (arXiv 2505.13430) trains the quantization scales Δ of every QuantLinear; MeZO trains ordinary weights. Both use
the same machinery:
  - z for (step seed, tensor index, pair) comes from a torch.Generator seeded by `base.mix_seed` of those integers, drawn
    in fp32 on the device the tensor lives on, so it is the same in any order, with or without offload, after
    resume and on every rank of one device type. (CPU and CUDA generators differ, so a run resumed on the other
    device type continues with other -- equally valid -- directions. Drawing on the CPU and copying would keep
    them equal but costs 0.36 s/step for Llama-2-7B's 52M scales on this 2-core CPU, more than the whole GPU
    step, and ~47 s/step for a 6.7B-weight MeZO/ZO2 step.)
  - One stock HF forward over 2k copies of the batch: chunk 2j sees θ + εz_j, chunk 2j+1 sees θ − εz_j. Only the
    trained modules know: QuantLinear via `chunk_scales`, any other module by running each chunk with its tensor
    swapped. The perturbed tensors are built out of place, per module, during its own forward: nothing to restore,
    nothing drifts, and only one module's perturbed copies exist at a time.
  - d_j = (L+_j − L−_j) / 2ε; d'_j = clip(d_j, −C, C); θ ← θ − lr · mean_j(d'_j z_j) (− lr·wd·θ for MeZO);
    QZO clamps Δ at a floor so scales stay positive.
  - A bf16/fp16 tensor is updated by stochastic rounding (`base.round_stochastic`): at MeZO's lr 1e-6 an update is far
    below half a bf16 ulp (2^-9 relative) and round-to-nearest would drop nearly all of it; SR keeps it in
    expectation. fp32 masters would do it too, but cost 4 more host bytes per weight and, in ZO2 mode, twice the
    PCIe traffic. QZO's scales are fp32 masters already.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from quant.linear import QuantLinear

from .. import distributed, objective
from ..config import ConfigError, _f
from .base import Method, Target, generator, mix_seed, step_seed, store
from .registry import BenchMode, register


@dataclass
class ZOOptions:
    eps: float = _f(1e-3, "perturbation size epsilon", range="(0, inf)")
    n_pairs: int = _f(1, "independent +-eps pairs per step, averaged", range="[1, inf)")
    clip: float = _f(100.0, "DDC: clip the projected gradient to [-clip, clip] (with zo_normalize: in units of its "
                            "running RMS, e.g. 3); 0 disables", range="[0, inf)")
    zo_parallel: str = _f("batch", "ZO under torchrun / accelerate launch: batch = each rank runs the 2k chunks on its "
                                   "slice of every step's batch (batch_size stays the global batch); pairs = each "
                                   "rank runs the whole batch for the pairs j with j mod ranks == rank (raise "
                                   "n_pairs with the ranks: at least one pair each)", ("batch", "pairs"))
    zo_normalize: bool = _f(False, "ZO: divide each step's projected gradients by their running RMS (EMA of d^2, "
                                   "FZOO/MEAZO style): a scale-free step whose lr transfers")
    zo_rms_beta: float = _f(0.9, "ZO, zo_normalize: decay of the running mean of d^2", range="[0, 1)")
    zo_mask: str = _f("none", "ZO: perturb and update only a fixed subset: magnitude = the smallest-magnitude "
                              "entries (Sparse-MeZO; experimental), fisher = the largest diagonal Fisher from a gradient pass over "
                              "zo_mask_samples examples at batch 1 (SensZOQ); the rest stays bitwise unchanged",
                      ("none", "magnitude", "fisher"))
    zo_mask_fraction: float = _f(0.01, "ZO, zo_mask: fraction of the trained entries in the mask", range="(0, 1]")
    zo_mask_samples: int = _f(32, "ZO, zo_mask=fisher / zo_subspace: training examples of the one-off gradient "
                                   "pass (batch 1)", range="[1, inf)")
    zo_subspace: int = _f(0, "ZO: perturb only within the span of the per-example gradients of that one-off pass "
                             "(an orthonormal basis of up to this many directions, over the masked entries); 0 = off", range="[0, inf)")
    zo_orthogonal: bool = _f(False, "ZO, zo_subspace: the n_pairs directions of a step are orthogonal (rows of a random "
                                    "rotation of the subspace) instead of i.i.d.; n_pairs = zo_subspace gives the "
                                    "exact finite-difference gradient on the subspace", experimental=True)
    zo_precondition: str = _f("none", "ZO, zo_subspace: adam = a diagonally preconditioned basis P = D^1/2 Q, Q an "
                                      "orthonormal basis of the D^1/2-scaled gradients, D = 1/(s + 0.1 mean(s)) with s "
                                      "each entry's RMS gradient in the one-off pass (Adam's second moment): a "
                                      "full-rank step along the subspace gradient is then -D grad, Adam's direction, "
                                      "not the gradient's", ("none", "adam"), experimental=True)
    zo_one_sided: bool = _f(False, "ZO: probe one-sided, d_j = (L(theta+eps*z_j) - L(theta))/eps, from k+1 chunks of the "
                                   "batched forward instead of 2k (FZOO style; with n_pairs 8: 9 chunks, not 16)")
    zo_track: float = _f(0.0, "ZO, zo_subspace: track the subspace gradient across steps instead of stepping along "
                              "each step's own estimate: g += a*mean_j u_j(d_j - u_j.g), theta -= lr*B.g (LMS; one "
                              "r-vector of state; a = 1 from g = 0 is the plain first step); 0 = off", range="[0, 1]")

    def validate(self, cfg) -> None:
        if self.zo_precondition != "none" and not self.zo_subspace:
            raise ConfigError("zo_precondition shapes the basis of zo_subspace: set zo_subspace too")
        if self.zo_orthogonal and not self.zo_subspace:
            raise ConfigError("zo_orthogonal chooses the directions inside zo_subspace: set zo_subspace too")
        if self.zo_one_sided and self.zo_parallel == "pairs":
            raise ConfigError("zo_one_sided shares one unperturbed chunk among the pairs: use zo_parallel=batch")
        if self.zo_track and not self.zo_subspace:
            raise ConfigError("zo_track estimates the gradient inside zo_subspace: set zo_subspace too")
        if cfg.weight_decay and cfg.method == "qzo":
            raise ConfigError("weight_decay is not for method=qzo: QZO trains the scales without weight decay (as "
                              "the QZO paper), so set weight_decay=0")


@dataclass
class ZOTarget(Target):
    """A target with what the ZO options keep per tensor."""

    mask: torch.Tensor | None = None  # sorted flat indices of the entries perturbed and updated (None: all)
    basis: torch.Tensor | None = None  # zo_subspace: this target's rows of the orthonormal basis [entries, r]
    orthogonal: bool = False  # zo_subspace: the pairs' coefficients u are orthogonal, not i.i.d. (zo_orthogonal)

    @classmethod
    def of(cls, t: Target) -> "ZOTarget":
        return cls(**{f.name: getattr(t, f.name) for f in dataclasses.fields(Target)})


def as_zo(targets: list[Target]) -> list[ZOTarget]:
    """Targets as the ZO functions below read them (the same tensors; a plain Target has no mask nor basis). The
    functions that set a mask or basis (set_masks, set_basis, precondition_basis) need ZOTargets."""
    return [t if isinstance(t, ZOTarget) else ZOTarget.of(t) for t in targets]


Z_BLOCK = 1 << 24  # entries per block of z: a tensor larger than this is perturbed and updated a block at a time


def row_blocks(shape) -> list[tuple[int, int]]:
    """[start, end) ranges of the leading dim, each of at most Z_BLOCK entries (at least one row): the blocks in
    which z is drawn, a perturbation built and an update applied, so no full-size fp32 temporary of a large
    tensor ever exists (OPT-175B's 604M-entry fc1 would need 2.4 GB for each). One block for most tensors."""
    shape = tuple(shape)
    if not shape:
        return [(0, 1)]
    row = math.prod(shape[1:])
    per = max(1, Z_BLOCK // max(row, 1))
    return [(a, min(a + per, shape[0])) for a in range(0, shape[0], per)] or [(0, 0)]


def block_seed(seed: int, block: int) -> int:
    """The seed of a tensor's block `block`: the step seed itself for block 0 (so a one-block tensor draws exactly
    what it drew before blocks existed), a mix of both after it."""
    return seed if block == 0 else mix_seed(seed, block)


def z_block(shape, seed: int, index: int, pair: int, block: int, device="cpu") -> torch.Tensor:
    """Block `block` (rows row_blocks(shape)[block]) of z for (step seed, tensor index, pair), in fp32 on `device`:
    each block is its own counter-based stream, so any block can be drawn alone."""
    a, b = row_blocks(shape)[block]
    device = torch.device(device)
    return torch.randn((b - a,) + tuple(shape)[1:] if shape else (), dtype=torch.float32, device=device,
                       generator=generator(block_seed(seed, block), index, pair, device))


def z_for(shape, seed: int, index: int, pair: int, device="cpu") -> torch.Tensor:
    """N(0, I) of `shape` for (step seed, tensor index, pair), drawn in fp32 on `device` (the blocks of z_block)."""
    blocks = [z_block(shape, seed, index, pair, c, device) for c in range(len(row_blocks(shape)))]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


SUBSPACE_STREAM = -2  # the `index` of the shared coefficients u of a subspace step (tensors use 0, 1, ...)
ROTATION_STREAM = -3  # the `index` of the random rotations whose rows are orthogonal subspace directions


@functools.lru_cache(maxsize=16)
def _rotation(seed: int, block: int, r: int) -> torch.Tensor:
    """√r times a Haar-random orthogonal r x r matrix (rows), drawn in float64 on the CPU from (seed,
    ROTATION_STREAM, block): QR of a Gaussian matrix with the signs of R's diagonal moved into Q. Tiny (r <= a few
    hundred), so one CPU draw serves every target and device; cached because every target of a step asks for it."""
    g = torch.randn(r, r, generator=generator(seed, ROTATION_STREAM, block, "cpu"), dtype=torch.float64)
    q, rr = torch.linalg.qr(g)
    q = q * torch.where(torch.diagonal(rr) < 0, -1.0, 1.0)
    return (q.t() * math.sqrt(r)).float()


def subspace_u(seed: int, pair: int, r: int, orthogonal: bool, device="cpu") -> torch.Tensor:
    """The coefficients u [r] of pair `pair` of a subspace step: N(0, I_r), or (orthogonal) row pair mod r of the
    rotation of block pair // r, so pairs 0..r-1 are orthogonal with ‖u‖² = r (= E‖u‖² of the Gaussian one), and
    with n_pairs = r the mean of d_j·u_j is exactly the finite-difference gradient on the subspace. A function of
    (seed, pair, r) alone: the same in the forward and in the update, whatever the pair count or its order. Drawn on
    the CPU whatever `device` is (r numbers: free), so it is the same on every device type."""
    if not orthogonal:
        return z_for((r,), seed, SUBSPACE_STREAM, pair, "cpu").to(device)
    return _rotation(seed, pair // r, r)[pair % r].to(device, copy=True)


def target_z(t: Target, seed: int, pair: int) -> torch.Tensor:
    """z of a target for (step seed, pair): N(0, I) on every entry, or, with a mask, N(0, I) drawn only for the
    masked entries (from the same counter-based generator) and exactly 0 elsewhere. With a subspace basis
    (t.basis [entries, r], its rows the target's slice of one orthonormal basis of all targets) z = B·u with
    u ~ N(0, I_r) shared by every target (drawn from (seed, SUBSPACE_STREAM, pair)): SPSA on the r coordinates c of
    θ = θ₀ + B·c, so lr is that of SGD on c (E‖z‖² = r, not the number of entries: every bit of a step lands in a
    direction that matters, where an unrestricted z spreads it over all of them). t.orthogonal (zo_orthogonal): the
    pairs' u are orthogonal instead (subspace_u)."""
    theta = t.tensor
    if t.basis is not None:
        return masked_z(t, t.basis @ subspace_u(seed, pair, t.basis.shape[1], t.orthogonal, theta.device))
    if t.mask is None:
        return z_for(theta.shape, seed, t.index, pair, theta.device)
    return masked_z(t, z_for((len(t.mask),), seed, t.index, pair, theta.device) if len(t.mask) else None)


def masked_z(t: Target, vals: torch.Tensor | None) -> torch.Tensor:
    """Values of the perturbed entries as a full z: themselves without a mask, else scattered into zeros."""
    theta = t.tensor
    if t.mask is None:
        return vals.view(theta.shape)
    z = torch.zeros(theta.numel(), dtype=torch.float32, device=theta.device)
    if vals is not None:
        z[t.mask] = vals
    return z.view(theta.shape)


def pair_list(pairs) -> range | list[int]:
    """`pairs`: k (the pairs 0..k-1) or the pair indices themselves (one rank's share in the pair-parallel mode)."""
    return range(pairs) if isinstance(pairs, int) else list(pairs)


def perturbed(t: Target, seed: int, eps: float, pairs, one_sided: bool = False) -> list[torch.Tensor]:
    """[θ+εz_j, θ−εz_j for each pair j of `pairs`] for one target, out of place, in the tensor's dtype; one_sided
    (zo_one_sided): [θ, θ+εz_j for each j], k+1 chunks instead of 2k."""
    theta = t.tensor
    base = theta.float()
    out = [base.to(theta.dtype)] if one_sided else []  # θ itself, through the chunks' own rounding
    for j in pair_list(pairs):
        ez = target_z(t, seed, j).mul_(eps)
        out.append((base + ez).to(theta.dtype))
        if not one_sided:
            out.append((base - ez).to(theta.dtype))
    return out


def perturbed_pair(t: Target, seed: int, eps: float, pair: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ+εz, θ−εz) of one pair, in the tensor's dtype: the values of `perturbed`, built a z block at a time."""
    (t,) = as_zo([t])
    theta = t.tensor
    if t.mask is not None or t.basis is not None or len(row_blocks(theta.shape)) == 1:
        return tuple(perturbed(t, seed, eps, [pair]))
    plus, minus = torch.empty_like(theta), torch.empty_like(theta)
    for c, (a, b) in enumerate(row_blocks(theta.shape)):
        base = theta[a:b].to(torch.float32, copy=True)
        ez = z_block(theta.shape, seed, t.index, pair, c, theta.device).mul_(eps)
        plus[a:b] = base + ez
        minus[a:b] = base.sub_(ez)
    return plus, minus


def _chunked_forward(module: nn.Module, targets: list[tuple[str, Target]], seed: int, eps: float, pairs,
                     one_sided: bool = False):
    """A forward that runs input chunk c with each (attribute, target) tensor of `module` replaced by the target's
    c-th perturbation (the attribute is the target's own name, or the name an alias reads it under). A pair's two
    perturbed copies are built when its first chunk runs and dropped after its second: at most two per tensor."""
    cls_forward = type(module).forward
    pair_ids = pair_list(pairs)

    def values_for(c: int, held: dict) -> dict:
        if one_sided:  # chunk 0: θ itself; chunk c: θ + εz of pair c-1
            return {name: perturbed(t, seed, eps, [] if c == 0 else [pair_ids[c - 1]], True)[-1]
                    for name, t in targets}
        if c % 2 == 0:
            held.clear()
            held.update({name: perturbed_pair(t, seed, eps, pair_ids[c // 2]) for name, t in targets})
        return {name: pm[c % 2] for name, pm in held.items()}

    def forward(x, *args, **kwargs):
        m = n_chunks(pairs, one_sided)
        if x.shape[0] % m:
            raise ValueError(f"batch of {x.shape[0]} rows cannot be split into {m} perturbation chunks")
        stores = {name: module._parameters if name in module._parameters else module._buffers for name, _ in targets}
        originals = {name: where[name] for name, where in stores.items()}
        rows = x.shape[0]

        def chunk(v, c):  # every tensor argument that carries the batch is split with it
            return v[c * rows // m:(c + 1) * rows // m] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v

        outs, held = [], {}
        try:
            for c in range(m):
                for name, where in stores.items():  # perturbations are built from θ, not the previous chunk's
                    where[name] = originals[name]
                values = values_for(c, held)
                for name, where in stores.items():
                    where[name] = values[name]
                outs.append(cls_forward(module, chunk(x, c), *[chunk(a, c) for a in args],
                                        **{k: chunk(v, c) for k, v in kwargs.items()}))
        finally:
            for name, where in stores.items():
                where[name] = originals[name]
        return torch.cat(outs)

    return forward


def n_chunks(pairs, one_sided: bool = False) -> int:
    """Chunks of the batched forward: 2k (θ ± εz_j), or k+1 one-sided (θ, θ + εz_j)."""
    k = len(pair_list(pairs))
    return k + 1 if one_sided else 2 * k


@contextlib.contextmanager
def dual_forward(targets: list[Target], seed: int, eps: float, n_pairs=1, one_sided: bool = False):
    """Inside the context one forward of 2k stacked copies of a batch evaluates all 2k perturbations (n_pairs: k, or
    the list of the k pair indices to evaluate); one_sided: k+1 copies, the first unperturbed."""
    targets = as_zo(targets)
    handles, by_module = [], {}
    for t in targets:
        if isinstance(t.module, QuantLinear) and t.name == "scales":
            def pre(m, args, t=t):
                m.chunk_scales = perturbed(t, seed, eps, n_pairs, one_sided)

            def post(m, args, out):
                m.chunk_scales = None

            handles += [t.module.register_forward_pre_hook(pre), t.module.register_forward_hook(post)]
        else:
            by_module.setdefault(id(t.module), (t.module, []))[1].append((t.name, t))
        for module, name in t.aliases:  # every reader of a shared tensor sees the same perturbation
            by_module.setdefault(id(module), (module, []))[1].append((name, t))
    for module, ts in by_module.values():
        module.forward = _chunked_forward(module, ts, seed, eps, n_pairs, one_sided)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module, _ in by_module.values():
            del module.forward
        for t in targets:
            if isinstance(t.module, QuantLinear):
                t.module.chunk_scales = None


def projected_gradients(losses: torch.Tensor, eps: float, one_sided: bool = False) -> torch.Tensor:
    """losses [2k] ordered (+, −) per pair -> d [k] = (L+ − L−) / 2ε, in float64; one_sided: losses [k+1]
    (L(θ), L+_0, ...) -> d = (L+ − L(θ)) / ε, whose error ε/2·zᵀHz is odd in z: zero-mean, not cancelled."""
    if one_sided:
        losses = losses.double()
        return (losses[1:] - losses[0]) / eps
    losses = losses.double().view(-1, 2)
    return (losses[:, 0] - losses[:, 1]) / (2 * eps)


@torch.no_grad()
def apply_update(targets: list[Target], seed: int, coeffs: list[float], weight_decay: float = 0.0, lr: float = 0.0,
                 floor: float | None = None, subspace_step: torch.Tensor | None = None) -> None:
    """θ ← θ − Σ_j coeffs[j]·z_j − lr·wd·θ (wd only where t.decay), clamped at `floor`; z regenerated from the seed
    (coeffs[j] = lr·d'_j/k). `subspace_step` w [r] (zo_track): θ also moves by −B·w along the target's basis.
    Computed in fp32 and stored back stochastically rounded (base.store) when θ is bf16/fp16."""
    for t in as_zo(targets):
        theta = t.tensor
        if t.mask is None and subspace_step is None and len(row_blocks(theta.shape)) > 1:
            _update_blocks(t, seed, coeffs, weight_decay, lr, floor)
            continue
        new = theta.float() if theta.dtype != torch.float32 else theta.clone()
        for j, c in enumerate(coeffs):
            if c:
                new.sub_(target_z(t, seed, j).mul_(c))
        if subspace_step is not None:
            new.sub_(masked_z(t, t.basis @ subspace_step.to(t.basis.device, torch.float32)))
        if weight_decay and t.decay:
            decay = theta.float().mul(lr * weight_decay)
            if t.mask is not None:  # outside the mask nothing moves, decay included
                keep = torch.zeros(theta.numel(), dtype=torch.bool, device=theta.device)
                keep[t.mask] = True
                decay.view(-1).masked_fill_(~keep, 0.0)
            new.sub_(decay)
        if floor is not None and t.mask is not None and t.name == "scales":  # floored only where the update acted
            floor_t = torch.full_like(new, -float("inf"))
            floor_t.view(-1)[t.mask] = floor
            new = torch.maximum(new, floor_t)
            store(t, new, seed)
        else:
            store(t, new, seed, floor)


def _update_blocks(t: Target, seed: int, coeffs: list[float], weight_decay: float, lr: float,
                   floor: float | None) -> None:
    """apply_update of a large tensor (no mask, no subspace), one z block at a time: each block's rows are updated
    in fp32 from its own z blocks and stored back, rounded with the block's own random stream."""
    theta = t.tensor
    for c, (a, b) in enumerate(row_blocks(theta.shape)):
        new = theta[a:b].float() if theta.dtype != torch.float32 else theta[a:b].clone()
        for j, coef in enumerate(coeffs):
            if coef:
                new.sub_(z_block(theta.shape, seed, t.index, j, c, theta.device).mul_(coef))
        if weight_decay and t.decay:
            new.sub_(theta[a:b].float().mul_(lr * weight_decay))
        store(t, new, block_seed(seed, c), floor, rows=(a, b))


# ---- masks: which entries a ZO step perturbs (the rest stays bitwise unchanged) ------------------------------------------
def magnitude_scores(targets: list[Target]) -> list[torch.Tensor]:
    """Sparse-MeZO's gradient-free choice: the smallest-magnitude entries score highest."""
    return [-t.tensor.detach().float().abs().flatten() for t in targets]


def gradient_pass(model, targets: list[Target], kind: str, batches: list[dict], keep: bool = False,
                  masked: bool = False):
    """One backward per batch (one example each): -> (the diagonal empirical Fisher Σ_i (∂L_i/∂θ)² per target,
    and with `keep` the per-example gradients, [examples, entries] per target, else None; `masked`: only the
    entries of each target's mask are kept). Each gradient is folded by a post-accumulate hook and freed at once
    (LOMO-style), so the pass needs one example's activations plus one fp32 value per trained entry (and `keep`: one
    per kept entry and example)."""
    targets = as_zo(targets)
    acc = [torch.zeros(t.tensor.numel(), dtype=torch.float32, device=t.tensor.device) for t in targets]
    pick = [t.mask if masked and t.mask is not None else None for t in targets]
    rows = ([torch.zeros(len(batches), t.tensor.numel() if p is None else len(p), dtype=torch.float32,
                         device=t.tensor.device) for t, p in zip(targets, pick)]
            if keep else None)  # filled in place: no second copy of every gradient
    handles = []
    for i, (t, a) in enumerate(zip(targets, acc)):
        t.tensor.requires_grad_(True)

        def fold(tensor, a=a, i=i):
            g = tensor.grad.float().flatten()
            a.add_(g.pow(2))
            if rows is not None:  # `example`: the loop variable below, read when backward calls the hook
                rows[i][example] = g if pick[i] is None else g[pick[i]]
            tensor.grad = None

        handles.append(t.tensor.register_post_accumulate_grad_hook(fold))
    try:
        for example, b in enumerate(batches):
            objective.loss(model, kind, b).backward()
    finally:
        for t, h in zip(targets, handles):
            h.remove()
            t.tensor.grad = None
            t.tensor.requires_grad_(False)
    return acc, rows


def _perturbed_columns(targets: list[Target], grads: list[torch.Tensor], masked: bool) -> list[torch.Tensor]:
    """Each target's per-example gradients [examples, entries] on its perturbed entries: its mask's columns, unless
    `masked` says the gradients hold only those already."""
    return [g[:, t.mask] if t.mask is not None and not masked else g for g, t in zip(grads, targets)]


def set_basis(targets: list[Target], grads: list[torch.Tensor], rank: int, masked: bool = False) -> None:
    """An orthonormal basis of the per-example gradients (restricted to each target's mask), its rows split back per
    target as t.basis. With as many examples as the rank or fewer: their span (QR). With more: the top-`rank` right
    singular vectors of the [examples, N] gradient matrix, the rank-r subspace that holds most of the gradients'
    energy (a PCA of the per-example gradients, uncentred), rather than the span of whichever r came first.
    `masked`: the gradients hold only the masked entries already (gradient_pass(..., masked=True))."""
    cols = _perturbed_columns(targets, grads, masked)
    stacked = torch.cat([c.cpu() for c in cols], dim=1)  # [examples, N]
    if stacked.shape[0] <= rank:
        q, _ = torch.linalg.qr(stacked.t().double())  # [N, examples], orthonormal columns
    else:  # SVD through the small Gram matrix: G Gᵀ = U S² Uᵀ, V = Gᵀ U S⁻¹ (N can be millions, examples few)
        g = stacked.double()
        evals, u = torch.linalg.eigh(g @ g.t())
        top = evals.argsort(descending=True)[:rank]
        q = g.t() @ (u[:, top] / evals[top].clamp_min(1e-300).sqrt())
        q, _ = torch.linalg.qr(q)  # re-orthonormalize (rounding in the Gram route)
    q = q[:, :min(rank, q.shape[1])].float()
    start = 0
    for t, c in zip(targets, cols):
        t.basis = q[start:start + c.shape[1]].contiguous().to(t.tensor.device)
        start += c.shape[1]


PRECONDITION_DELTA = 0.1  # zo_precondition: D = 1/(s + δ·mean(s)), δ relative so it is free of the loss' units


def precondition_basis(targets: list[Target], grads: list[torch.Tensor], sq_sums: list[torch.Tensor],
                       rank: int, masked: bool = False) -> None:
    """zo_precondition=adam: t.basis = the target's rows of P = D^½·Q, Q an orthonormal basis (set_basis) of the
    gradients scaled by D^½, D = 1/(s + δ·mean s) per entry, s = √(Σ_i g_i² / n) the RMS gradient of the one-off
    pass (Adam's √v; mean over the perturbed entries). θ = θ₀ + P·c, so SPSA on c steps θ by −lr·P·Pᵀ∇L: where P
    spans everything that is −lr·D·∇L, Adam's direction (entries with small gradients move as much as large ones),
    where plain Q steps along −∇L. P is rescaled to ‖P‖_F² = r (= ‖Q‖_F²) so E‖z‖² and the lr keep their scale."""
    n = grads[0].shape[0]
    rms = [(q.float() / n).sqrt() for q in sq_sums]
    picked = torch.cat([(x[t.mask] if t.mask is not None else x).cpu() for x, t in zip(rms, targets)])
    offset = PRECONDITION_DELTA * float(picked.mean())
    half = [(x + offset).rsqrt() if offset > 0 else torch.ones_like(x) for x in rms]  # D^½, full entries
    half = [h[t.mask] if t.mask is not None else h for h, t in zip(half, targets)]  # of the perturbed entries
    cols = _perturbed_columns(targets, grads, masked)
    set_basis(targets, [g * h for g, h in zip(cols, half)], rank, masked=True)
    for t, h in zip(targets, half):
        t.basis = t.basis * h[:, None].to(t.basis.device)
    total = sum(float(t.basis.double().pow(2).sum()) for t in targets)
    r = targets[0].basis.shape[1]
    for t in targets:
        t.basis = (t.basis * math.sqrt(r / total)).contiguous()


def set_masks(targets: list[Target], scores: list[torch.Tensor], fraction: float) -> None:
    """Each target's mask: its entries among the top `fraction` of all scores (one global threshold, ties by
    order), as sorted flat indices."""
    flat = torch.cat([s.float().cpu() for s in scores])
    n = max(1, int(round(fraction * flat.numel())))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, n, sorted=False).indices] = True
    start = 0
    for t, s in zip(targets, scores):
        t.mask = chosen[start:start + s.numel()].nonzero().flatten().to(t.tensor.device)
        start += s.numel()


def repeat_batch(batch: dict, times: int) -> dict:
    """Stack `times` copies of every tensor of a batch along dim 0 (chunk c = rows [c·B, (c+1)·B))."""
    return {k: (v.repeat(times, *([1] * (v.dim() - 1))) if torch.is_tensor(v) and v.dim() > 0 else v)
            for k, v in batch.items()}


NO_ACCUMULATION = "a ZO step is one forward of the whole batch"


@register("mezo", help="MeZO: zeroth-order on the weights of an unquantized model; with offload, ZO2 (blocks "
                       "streamed from host memory, updated on arrival).", options=ZOOptions, trains=("weights",),
          accumulates=NO_ACCUMULATION, bench={"mezo": BenchMode(quantized=False),
                                              "zo2": BenchMode(quantized=False, offload=True)},
          memory="inference only (zo_mask=fisher / zo_subspace add one gradient pass at the start)")
@register("qzo", help="QZO: zeroth-order on the quantization scales: two forwards a step, no gradients, no "
                      "optimizer state (arXiv 2505.13430).", options=ZOOptions, trains=("scales",),
          accumulates=NO_ACCUMULATION, bench={"qzo": BenchMode(quantized=True),
                                              "qzo-offload": BenchMode(quantized=True, offload=True)},
          memory="inference only (zo_mask=fisher / zo_subspace add one gradient pass at the start)")
class ZeroOrder(Method):
    """QZO (scales of a quantized model) and MeZO / ZO2 (weights of an unquantized one): one step is
    seed_t = mix(seed, t); the batch stacked 2k times; one forward inside `dual_forward` gives the 2k chunk losses;
    d = (L+ − L−)/2ε per pair, clipped to [−C, C] (DDC); θ ← θ − lr·mean(d'·z). Everything that varies with the step
    (z, lr) is a pure function of (config, step); the little state the options keep (zo_normalize's RMS, zo_track's
    r-vector, masks, basis) is checkpointed, so a resume continues bit for bit.
    With a BlockStreamer on the model (ZO2 mode) the update of streamed tensors is deferred to their next upload."""

    def __init__(self, model, cfg, targets, kind):
        targets = as_zo(targets)
        super().__init__(model, cfg, targets, kind)
        self.by_key = {(id(t.module), t.name): t for t in targets}  # a streamer holds the plain Targets: ours
        self.name = cfg.method
        self.floor = cfg.scale_floor if cfg.method == "qzo" else None
        # zo_normalize: the EMA of mean_j d_j² (bias-corrected like Adam's v), one scalar of state
        self.rms = {"v": torch.zeros((), dtype=torch.float64), "t": torch.zeros((), dtype=torch.int64)}
        self.track: torch.Tensor | None = None  # zo_track: the tracked subspace gradient g [r], float64, made lazily
        for t in targets:
            t.orthogonal = cfg.zo_orthogonal
        if cfg.zo_mask == "magnitude":
            set_masks(targets, magnitude_scores(targets), cfg.zo_mask_fraction)
        world = distributed.world()
        if world.enabled and cfg.zo_parallel == "pairs" and cfg.n_pairs < world.size:
            raise ValueError(f"zo_parallel=pairs spreads the n_pairs ±eps pairs over the ranks: n_pairs {cfg.n_pairs} "
                             f"leaves ranks idle on {world.size} ranks (raise n_pairs, or use zo_parallel=batch)")

    @classmethod
    def shards(cls, cfg) -> bool:
        return cfg.zo_parallel != "pairs"

    def trained_count(self) -> int:
        return sum(t.tensor.numel() if t.mask is None else len(t.mask) for t in self.targets)

    def prepare(self, batch_at) -> None:
        cfg = self.cfg
        if cfg.zo_mask == "fisher" or cfg.zo_subspace:
            batches = [batch_at(i, 1) for i in range(cfg.zo_mask_samples)]
            masked = cfg.zo_mask != "none"
            if cfg.zo_mask == "fisher":  # the mask first, so the subspace pass keeps only its entries: with MeZO's
                # 10⁸ weights, 32 full gradients would take 13.6 GB, the masked ones a fraction of that
                set_masks(self.targets, gradient_pass(self.model, self.targets, self.kind, batches)[0],
                          cfg.zo_mask_fraction)
            if cfg.zo_subspace:
                scores, grads = gradient_pass(self.model, self.targets, self.kind, batches, keep=True, masked=masked)
                if cfg.zo_precondition == "adam":
                    precondition_basis(self.targets, grads, scores, cfg.zo_subspace, masked=masked)
                else:
                    set_basis(self.targets, grads, cfg.zo_subspace, masked=masked)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"zo.rms_v": self.rms["v"], "zo.rms_t": self.rms["t"]} if self.cfg.zo_normalize else {}
        if self.cfg.zo_mask != "none":
            out.update({f"{t.path}.zo_mask": t.mask for t in self.targets if t.mask is not None})
        if self.cfg.zo_subspace:
            out.update({f"{t.path}.zo_basis": t.basis for t in self.targets if t.basis is not None})
        if self.track is not None:
            out["zo.track"] = self.track
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        for t in self.targets:  # masks may differ in size from the ones made at init: take the checkpoint's
            if f"{t.path}.zo_mask" in tensors:
                t.mask = tensors.pop(f"{t.path}.zo_mask").to(t.tensor.device)
            if f"{t.path}.zo_basis" in tensors:
                t.basis = tensors.pop(f"{t.path}.zo_basis").to(t.tensor.device)
        if "zo.track" in tensors and self.cfg.zo_track:
            self.track = tensors.pop("zo.track").double().cpu()
        if self.cfg.zo_normalize:
            self.rms["v"].copy_(tensors.pop("zo.rms_v"))
            self.rms["t"].copy_(tensors.pop("zo.rms_t"))
        if tensors:
            raise ValueError(f"unexpected {self.name} state {sorted(tensors)[:3]}")

    def normalized(self, d: torch.Tensor) -> tuple[torch.Tensor, float]:
        """zo_normalize: d / √v̂ with v̂ the bias-corrected EMA of mean(d²) (updated with this step's d first), so
        the step is scale-free (a loss 100× larger gives the same update) -> (d / √v̂, √v̂)."""
        beta = self.cfg.zo_rms_beta
        self.rms["v"].mul_(beta).add_((1 - beta) * float(d.pow(2).mean()))
        self.rms["t"] += 1
        rms = math.sqrt(float(self.rms["v"]) / (1 - beta ** int(self.rms["t"])))
        return d / rms if rms > 0 else d, rms

    def tracked(self, dc: torch.Tensor, seed: int) -> torch.Tensor:
        """zo_track: one LMS step of the tracked subspace gradient g [r] toward this step's k measurements
        dc_j ≈ u_j·∇_c L: g ← g + a·mean_j u_j (dc_j − u_j·g) -> g. Plain SPSA steps along mean_j dc_j u_j, whose
        noise (‖u‖² = r per pair: the estimate's error is ~√(r/k) times the gradient) averages out only over many
        steps; g averages it over ~1/a steps while the gradient changes slowly, as the step moves θ by lr·B·g. With
        a = 1 from g = 0 the step is the plain one; stable for a < 2/(1 + (r+1)/k) (mean-square, Gaussian u), so
        with k = 1 keep a small (≲ 0.05 at r = 32)."""
        r = next(t.basis.shape[1] for t in self.targets if t.basis is not None)
        u = torch.stack([subspace_u(seed, j, r, self.cfg.zo_orthogonal) for j in range(len(dc))]).double()
        if self.track is None:
            self.track = torch.zeros(r, dtype=torch.float64)
        self.track += self.cfg.zo_track * ((dc.double().cpu() - u @ self.track)[:, None] * u).mean(0)
        return self.track

    def step_losses(self, batch: dict, seed: int) -> torch.Tensor:
        """The 2k chunk losses [L+_0, L−_0, L+_1, ...] (float64) of the step's batch, the same on every rank.
        One process: one forward of the batch stacked 2k times. Under torch.distributed, batch-sharded (`batch` is
        this rank's slice): the chunks' loss sums and counts summed over ranks in rank order; pair-parallel (`batch`
        is the whole batch): this rank's pairs only, the others' filled in by one all-reduce of zeros elsewhere."""
        k, world = self.cfg.n_pairs, distributed.world()
        pairs = list(range(k))
        if world.enabled and self.cfg.zo_parallel == "pairs":
            pairs = [j for j in range(k) if j % world.size == world.rank]
        one_sided = self.cfg.zo_one_sided
        m = n_chunks(pairs, one_sided)
        stacked = repeat_batch(batch, m)
        with torch.no_grad(), dual_forward(self.targets, seed, self.cfg.eps, pairs, one_sided):
            sums, counts = objective.chunk_sums(self.model, self.kind, stacked, m)
        if not world.enabled:  # the step's one host sync: everything after it is host arithmetic on 2k numbers
            return (sums / counts.clamp(min=1)).cpu()
        if self.cfg.zo_parallel == "pairs":
            losses = torch.zeros(2 * k, dtype=torch.float64)
            for i, j in enumerate(pairs):
                losses[2 * j:2 * j + 2] = (sums[2 * i:2 * i + 2] / counts[2 * i:2 * i + 2].clamp(min=1)).cpu()
            return distributed.all_sum(losses)
        both = distributed.gather_sum(torch.stack([sums, counts]).cpu())
        return both[0] / both[1].clamp(min=1)

    def step(self, batch: dict, step: int) -> dict:
        cfg, k = self.cfg, self.cfg.n_pairs
        seed = step_seed(cfg.seed, step)
        losses = self.step_losses(batch, seed)
        if not torch.isfinite(losses).all():
            return {"skipped": "nonfinite", "losses": [float(x) for x in losses]}
        d = projected_gradients(losses, cfg.eps, cfg.zo_one_sided)
        out = {"loss": float(losses[0] if cfg.zo_one_sided else losses.mean()), "d": float(d.abs().mean())}
        if cfg.zo_normalize:  # the clip is then in units of the running RMS
            d, out["d_rms"] = self.normalized(d)
        dc = d.clamp(-cfg.clip, cfg.clip) if cfg.clip else d
        lr = self.lr_at(step)
        if cfg.zo_track:
            g = self.tracked(dc, seed)
            self.apply_step_update(seed, [], cfg.weight_decay, lr, subspace_step=lr * g)
            out["track_norm"] = float(g.norm())
        else:
            self.apply_step_update(seed, [lr * float(x) / k for x in dc], cfg.weight_decay, lr)
        out["clip_rate"] = int((dc != d).sum()) / k
        return out

    def apply_step_update(self, seed: int, coeffs: list[float], weight_decay: float, lr: float,
                          subspace_step: torch.Tensor | None = None) -> None:
        """apply_update, now for resident targets; for the tensors a streamer streams (ZO2 mode), deferred until
        their block is next on the device (engine.BlockStreamer.defer), so the step needs no second upload."""
        update = functools.partial(apply_update, seed=seed, coeffs=coeffs, weight_decay=weight_decay, lr=lr,
                                   floor=self.floor, subspace_step=subspace_step)
        streamer = getattr(self.model, "qzo2_streamer", None)
        if streamer is None:
            return update(self.targets)
        update([t for t in self.targets if (id(t.module), t.name) not in streamer.streamed_keys])
        streamer.defer(lambda targets: update([self.by_key[id(t.module), t.name] for t in targets]))
