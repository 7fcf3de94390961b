"""The zeroth-order estimator: z from counters, one batched ±ε forward, DDC clip, update.

QZO (arXiv 2505.13430) trains the quantization scales Δ of every QuantLinear; MeZO trains ordinary weights. Both use
the same machinery:
  - z for (step seed, tensor index, pair) comes from a torch.Generator seeded by `mix_seed` of those integers, drawn
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
  - A bf16/fp16 tensor is updated by stochastic rounding (`round_stochastic`): at MeZO's lr 1e-6 an update is far
    below half a bf16 ulp (2^-9 relative) and round-to-nearest would drop nearly all of it; SR keeps it in
    expectation. fp32 masters would do it too, but cost 4 more host bytes per weight and, in ZO2 mode, twice the
    PCIe traffic. QZO's scales are fp32 masters already.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from quant.linear import QuantLinear

_M64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (splitmix64 rounds; never Python's salted hash())."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = ((x ^ (int(p) & _M64)) * 0xBF58476D1CE4E5B9) & _M64
        x ^= x >> 31
        x = (x * 0x94D049BB133111EB) & _M64
        x ^= x >> 29
    return x & ((1 << 63) - 1)


def step_seed(run_seed: int, step: int) -> int:
    return mix_seed(run_seed, step)


ROUNDING_STREAM = -1  # the `pair` counter of the random bits stochastic rounding uses (z uses pairs 0..k-1)


def _generator(seed: int, index: int, pair: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(seed, index, pair))


def z_for(shape, seed: int, index: int, pair: int, device="cpu") -> torch.Tensor:
    """N(0, I) of `shape` for (step seed, tensor index, pair), drawn in fp32 on `device`."""
    device = torch.device(device)
    return torch.randn(tuple(shape), generator=_generator(seed, index, pair, device), dtype=torch.float32,
                       device=device)


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """fp32 x -> `dtype`, rounding to one of the two neighbouring `dtype` values with probability proportional to
    proximity, so E[result] = x. bf16 is the top half of an fp32: add 16 uniform random bits below it and truncate.
    fp16: pick between the neighbours by a uniform draw."""
    if dtype == torch.float32:
        return x
    if dtype == torch.bfloat16:
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=gen)
        return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(dtype)
    y = x.to(dtype)
    low = torch.where(y.float() > x, torch.nextafter(y, torch.full_like(y, -float("inf"))), y)
    high = torch.nextafter(low, torch.full_like(low, float("inf")))
    gap = (high.float() - low.float()).clamp(min=torch.finfo(torch.float32).tiny)
    up = torch.rand(x.shape, device=x.device, generator=gen) * gap < (x - low.float())
    return torch.where(up, high, low)


@dataclass
class Target:
    """One trained tensor: `module.<name>` (a QuantLinear's scales, or a parameter), with a stable index."""

    index: int
    path: str  # "model.layers.0.self_attn.q_proj.scales"
    module: nn.Module
    name: str
    decay: bool = True  # weight decay applies (MeZO: not to biases and norm gains)
    aliases: list = field(default_factory=list)  # other (module, name) reading the same tensor (a tied lm_head)

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)


def qzo_targets(model: nn.Module) -> list[Target]:
    """The scales of every QuantLinear, in module order."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not mods:
        raise ValueError("the model has no quantized layers to train (QZO needs a quantized checkpoint)")
    return [Target(i, f"{n}.scales", m, "scales") for i, (n, m) in enumerate(mods)]


MEZO_KINDS = ("linear", "norm", "embedding")


def module_kind(m: nn.Module) -> str | None:
    return ("linear" if isinstance(m, nn.Linear) else "embedding" if isinstance(m, nn.Embedding)
            else "norm" if "norm" in type(m).__name__.lower() else None)


def mezo_targets(model: nn.Module, kinds: tuple[str, ...] = ("linear",)) -> list[Target]:
    """Weights (and biases) of the chosen module kinds, each tensor once; a tied lm_head counts as the embedding.
    A tensor read by several modules (a tied lm_head reads the embedding matrix) is one target whose `aliases`
    name the other readers, so the perturbation reaches all of them. Biases and norm gains get decay=False."""
    bad = set(kinds) - set(MEZO_KINDS)
    if bad:
        raise ValueError(f"unknown MeZO parameter kind(s) {sorted(bad)}; choose from {MEZO_KINDS}")
    # a tied lm_head is the embedding matrix: train it only when embeddings are asked for
    embeddings = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    out, owner = [], {}
    for n, m in model.named_modules():
        kind = module_kind(m)
        for pname, p in m.named_parameters(recurse=False):
            ptr = p.data_ptr()
            if ptr in owner:
                owner[ptr].aliases.append((m, pname))
                continue
            if kind not in kinds or (ptr in embeddings and "embedding" not in kinds):
                continue
            owner[ptr] = Target(len(out), f"{n}.{pname}", m, pname, decay=not (pname == "bias" or kind == "norm"))
            out.append(owner[ptr])
    if not out:
        raise ValueError(f"no parameters of kind {kinds} to train")
    return out


def perturbed(t: Target, seed: int, eps: float, n_pairs: int) -> list[torch.Tensor]:
    """[θ+εz_0, θ−εz_0, θ+εz_1, ...] for one target, out of place, in the tensor's dtype."""
    theta = t.tensor
    base = theta.float()
    out = []
    for j in range(n_pairs):
        ez = z_for(theta.shape, seed, t.index, j, theta.device).mul_(eps)
        out += [(base + ez).to(theta.dtype), (base - ez).to(theta.dtype)]
    return out


def _chunked_forward(module: nn.Module, targets: list[tuple[str, Target]], seed: int, eps: float, n_pairs: int):
    """A forward that runs input chunk c with each (attribute, target) tensor of `module` replaced by the target's
    c-th perturbation (the attribute is the target's own name, or the name an alias reads it under)."""
    cls_forward = type(module).forward

    def forward(x, *args, **kwargs):
        values = {name: perturbed(t, seed, eps, n_pairs) for name, t in targets}
        m = 2 * n_pairs
        if x.shape[0] % m:
            raise ValueError(f"batch of {x.shape[0]} rows cannot be split into {m} perturbation chunks")
        stores = {name: module._parameters if name in module._parameters else module._buffers for name, _ in targets}
        originals = {name: store[name] for name, store in stores.items()}
        rows = x.shape[0]

        def chunk(v, c):  # every tensor argument that carries the batch is split with it
            return v[c * rows // m:(c + 1) * rows // m] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v

        outs = []
        try:
            for c in range(m):
                for name, store in stores.items():
                    store[name] = values[name][c]
                outs.append(cls_forward(module, chunk(x, c), *[chunk(a, c) for a in args],
                                        **{k: chunk(v, c) for k, v in kwargs.items()}))
        finally:
            for name, store in stores.items():
                store[name] = originals[name]
        return torch.cat(outs)

    return forward


@contextlib.contextmanager
def dual_forward(targets: list[Target], seed: int, eps: float, n_pairs: int = 1):
    """Inside the context one forward of 2k stacked copies of a batch evaluates all 2k perturbations."""
    handles, by_module = [], {}
    for t in targets:
        if isinstance(t.module, QuantLinear) and t.name == "scales":
            def pre(m, args, t=t):
                m.chunk_scales = perturbed(t, seed, eps, n_pairs)

            def post(m, args, out):
                m.chunk_scales = None

            handles += [t.module.register_forward_pre_hook(pre), t.module.register_forward_hook(post)]
        else:
            by_module.setdefault(id(t.module), (t.module, []))[1].append((t.name, t))
        for module, name in t.aliases:  # every reader of a shared tensor sees the same perturbation
            by_module.setdefault(id(module), (module, []))[1].append((name, t))
    for module, ts in by_module.values():
        module.forward = _chunked_forward(module, ts, seed, eps, n_pairs)
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


def projected_gradients(losses: torch.Tensor, eps: float) -> torch.Tensor:
    """losses [2k] ordered (+, −) per pair -> d [k] = (L+ − L−) / 2ε, in float64."""
    losses = losses.double().view(-1, 2)
    return (losses[:, 0] - losses[:, 1]) / (2 * eps)


@torch.no_grad()
def apply_update(targets: list[Target], seed: int, coeffs: list[float], weight_decay: float = 0.0, lr: float = 0.0,
                 floor: float | None = None) -> None:
    """θ ← θ − Σ_j coeffs[j]·z_j − lr·wd·θ (wd only where t.decay), clamped at `floor`; z regenerated from the seed
    (coeffs[j] = lr·d'_j/k).
    Computed in fp32 and stored back stochastically rounded (round_stochastic) when θ is bf16/fp16."""
    for t in targets:
        theta = t.tensor
        new = theta.float() if theta.dtype != torch.float32 else theta.clone()
        for j, c in enumerate(coeffs):
            if c:
                new.sub_(z_for(theta.shape, seed, t.index, j, theta.device).mul_(c))
        if weight_decay and t.decay:
            new.sub_(theta.float().mul(lr * weight_decay))
        if floor is not None:
            new.clamp_(min=floor)
        if theta.dtype != torch.float32:
            new = round_stochastic(new, theta.dtype, _generator(seed, t.index, ROUNDING_STREAM, theta.device))
        theta.copy_(new)


def repeat_batch(batch: dict, times: int) -> dict:
    """Stack `times` copies of every tensor of a batch along dim 0 (chunk c = rows [c·B, (c+1)·B))."""
    return {k: (v.repeat(times, *([1] * (v.dim() - 1))) if torch.is_tensor(v) and v.dim() > 0 else v)
            for k, v in batch.items()}
