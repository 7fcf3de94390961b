"""What every method shares: the trained tensors (targets), counter-based random streams, how a new fp32 value is
stored into a tensor, and the Method interface the trainer and `qzo2 bench` call.

What is trained follows the model: a quantized model trains the scales of its QuantLinears (fp32 masters; codes
never change, so the result still exports as GPTQ with only the scales changed), an unquantized one its weights of
the kinds in `params` (linear, norm, embedding). `trainable` narrows either by a regex on the tensor names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quant.linear import QuantLinear

from .. import gpu

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


def generator(seed: int, index: int, pair: int, device) -> torch.Generator:
    """The generator of the random stream (step seed, tensor index, pair) on `device`."""
    return gpu.generator(device).manual_seed(mix_seed(seed, index, pair))


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
    decay: bool = True  # weight decay applies (not to biases and norm gains)
    aliases: list = field(default_factory=list)  # other (module, name) reading the same tensor (a tied lm_head)

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)


def to_dtype(new: torch.Tensor, dtype: torch.dtype, seed: int, index: int) -> torch.Tensor:
    """An fp32 value as `dtype`: itself for fp32, stochastically rounded (the random stream of (seed, tensor index))
    for bf16/fp16."""
    if dtype == torch.float32:
        return new
    return round_stochastic(new, dtype, generator(seed, index, ROUNDING_STREAM, new.device))


@torch.no_grad()
def store(t: Target, new: torch.Tensor, seed: int, floor: float | None = None, rows: tuple | None = None) -> None:
    """Write the fp32 value `new` into the target (or into its rows [a, b) given as `rows`): clamped at `floor` if
    it is a quantization scale (scales stay positive; other tensors trained beside them are not floored),
    stochastically rounded (seeded by (seed, tensor index)) when the tensor is bf16/fp16, exact when it is fp32."""
    if floor is not None and t.name == "scales":
        new = new.clamp_(min=floor)
    dst = t.tensor if rows is None else t.tensor[rows[0]:rows[1]]
    dst.copy_(to_dtype(new, t.tensor.dtype, seed, t.index))


def scale_targets(model: nn.Module) -> list[Target]:
    """The scales of every QuantLinear, in module order."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not mods:
        raise ValueError("the model has no quantized layers to train (QZO needs a quantized checkpoint)")
    return [Target(i, f"{n}.scales", m, "scales") for i, (n, m) in enumerate(mods)]


WEIGHT_KINDS = ("linear", "norm", "embedding")



def module_kind(m: nn.Module) -> str | None:
    return ("linear" if isinstance(m, nn.Linear) else "embedding" if isinstance(m, nn.Embedding)
            else "norm" if "norm" in type(m).__name__.lower() else None)


def weight_targets(model: nn.Module, kinds: tuple[str, ...] = ("linear",)) -> list[Target]:
    """Weights (and biases) of the chosen module kinds, each tensor once; a tied lm_head counts as the embedding.
    A tensor read by several modules (a tied lm_head reads the embedding matrix) is one target whose `aliases`
    name the other readers, so a perturbation reaches all of them. Biases and norm gains get decay=False."""
    bad = set(kinds) - set(WEIGHT_KINDS)
    if bad:
        raise ValueError(f"unknown parameter kind(s) {sorted(bad)}; choose from {WEIGHT_KINDS}")
    # a tied lm_head is the embedding matrix: train it only when embeddings are asked for
    embeddings = {gpu.storage_key(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out, owner = [], {}
    for n, m in model.named_modules():
        kind = module_kind(m)
        for pname, p in m.named_parameters(recurse=False):
            ptr = gpu.storage_key(p)
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


class Method:
    """One optimization method, built once per run from (model, cfg, targets, kind), registered by name with
    `registry.register`. The trainer and `qzo2 bench` call only this:
      step(batch, step) -> metrics   one optimization step on an encoded batch. The dict holds "loss" and any
                                     scalars to log (averaged over the log window); "skipped": "nonfinite" (no
                                     update: a non-finite loss) or "overflow" (fp16 loss-scale overflow) with
                                     "losses" when the step changed nothing.
      lr_at(step)                    the learning rate of a step (the schedule; a method may change its clock)
      prepare(batch_at)              once before a new run's first step (e.g. a ZO mask from a gradient pass)
      state_tensors()                optimizer state as named tensors (a checkpoint's method.safetensors)
      load_state_tensors(tensors)    restore it, so a resumed run continues bit for bit
      flush()                        make every trained tensor current (ZO2 mode defers updates), before a save
      close()                        remove hooks; the model is then a plain model again
      trained_count()                entries training can change
      shards(cfg)                    (classmethod) does each rank take a slice of the batch under torchrun
    `self.cfg` is the run's TrainConfig; `self.cfg.<key>` also reads the method's own options.
    """

    name = ""
    first_order = False

    def __init__(self, model, cfg, targets: list[Target], kind: str):
        from ..config import lr_at

        self.model, self.cfg, self.targets, self.kind = model, cfg, targets, kind
        self._lr_at = lr_at

    def lr_at(self, step: int) -> float:
        return self._lr_at(self.cfg, step)

    @classmethod
    def shards(cls, cfg) -> bool:
        """Under torch.distributed: does each rank take a slice of the step's batch (else the whole batch)?"""
        return True

    @property
    def shards_batch(self) -> bool:
        return self.shards(self.cfg)

    def trained_count(self) -> int:
        """Entries training can change (a method that trains a subset says so)."""
        return sum(t.tensor.numel() for t in self.targets)

    def step(self, batch: dict, step: int) -> dict:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_tensors())
        if set(tensors) != expected:
            raise ValueError(f"{self.name} state does not match: expected {sorted(expected)[:3]}, "
                             f"got {sorted(tensors)[:3]}")
        with torch.no_grad():
            current = self.state_tensors()
            for k, v in tensors.items():
                current[k].copy_(v)

    def prepare(self, batch_at) -> None:
        """Once at the start of a new run (not on resume: what it computes is in the state tensors): batch_at(i,
        size) -> the i-th encoded batch of `size` training examples, for methods that look at data first (a ZO
        Fisher mask)."""

    def flush(self) -> None:
        streamer = getattr(self.model, "qzo2_streamer", None)
        if streamer is not None:
            streamer.flush()

    def close(self) -> None:
        pass
