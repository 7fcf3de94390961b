"""HiFT (arXiv 2401.15207, misonsky/HiFT): hierarchical full-parameter fine-tuning, one group of units per step.

Units, found generically: the input embedding (token and position embeddings), each decoder block, and everything
after the blocks (the final norm with the LM head); units holding no trained tensor (the embedding of a quantized
model, whose trained tensors are the blocks' scales) are left out. Groups are `hift_group_size` consecutive units in
the order of `hift_strategy`: down2up (embedding to head, HiFT's default), up2down, or random (one permutation fixed
at the start, seeded, as HiFT shuffles once). Step t trains group t mod k (k groups): only its tensors require
grad, so backward stops at its lowest unit and keeps nothing below it, and the inner optimizer is AdamW (state in the
trained dtype). The state of the other groups lives in host memory (pinned on CUDA) and comes to the device only for its
group's step. The lr schedule advances once per full cycle ("delayed lr update"): step t uses the schedule's value
at the start of its cycle, t − (t mod k), so every group of a cycle sees the same lr and the schedule still ends at
`steps` (HiFT's code builds its scheduler for max_steps but steps it per cycle, so its lr never decays fully; we
keep the decay on the `steps` clock). `steps` counts group steps: each unit is updated steps / k times.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from quant.checkpoint import decoder_blocks

from .. import gpu
from ..config import _f
from .base import Target
from .first_order import FirstOrder, FirstOrderOptions, adamw_for
from .registry import BenchMode, register


@dataclass
class HiFTOptions(FirstOrderOptions):
    hift_group_size: int = _f(1, "hift: units (embedding, each decoder block, norm + head) trained together per step", range="[1, inf)")
    hift_strategy: str = _f("down2up", "hift: order of the groups: down2up (embedding to head), up2down, random (one "
                                       "seeded permutation)", ("down2up", "up2down", "random"))

STRATEGIES = ("down2up", "up2down", "random")


def hift_units(model, targets: list[Target]) -> list[list[Target]]:
    """Targets by unit, input side first: [embeddings], block 0, ..., block n−1, [final norm, head, ...]."""
    prefix, blocks = decoder_blocks(model)
    units = [[] for _ in range(len(blocks) + 2)]
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}
    in_block = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    for t in targets:
        m = in_block.match(t.path)
        if m:
            units[int(m.group(1)) + 1].append(t)
        elif id(t.tensor) in embedding or "embed" in t.path.rsplit(".", 2)[-2]:
            units[0].append(t)
        else:
            units[-1].append(t)
    return [u for u in units if u]


def hift_groups(units: list[list[Target]], size: int, strategy: str, seed: int) -> list[list[Target]]:
    order = list(range(len(units)))
    if strategy == "up2down":
        order.reverse()
    elif strategy == "random":
        random.Random(f"hift:{seed}").shuffle(order)
    elif strategy != "down2up":
        raise ValueError(f"unknown hift_strategy {strategy!r}; choose from {STRATEGIES}")
    return [[t for u in order[i:i + size] for t in units[u]] for i in range(0, len(order), size)]


@register("hift", help="HiFT: one group of layers per step, trained by AdamW; the other groups' state waits in "
                       "host memory.", options=HiFTOptions, first_order=True,
          accumulates="each step trains another group of layers, so gradients of one group never add up",
          bench={"hift": BenchMode(quantized=True)},
          memory="activations + the active group's gradients and AdamW moments")
class HiFT(FirstOrder):
    def __init__(self, model, cfg, targets, kind):
        super().__init__(model, cfg, targets, kind)
        self.groups = hift_groups(hift_units(model, targets), cfg.hift_group_size, cfg.hift_strategy, cfg.seed)
        self.k = len(self.groups)
        for t in targets:
            t.tensor.requires_grad_(False)  # only the active group's tensors require grad, during its step
        pin = any(gpu.is_gpu(t.tensor.device) for t in targets)
        self.optimizers = [adamw_for(g, cfg, device="cpu") for g in self.groups]
        if pin:
            for opt in self.optimizers:
                for st in opt.state.values():
                    for key in ("exp_avg", "exp_avg_sq"):
                        st[key] = gpu.pinned(st[key])
        self.on_device: set[int] = set()  # groups whose optimizer state is on the device (only during a step)

    def lr_at(self, step: int) -> float:
        return super().lr_at(step - step % self.k)

    def group_at(self, step: int) -> int:
        return step % self.k

    def _move_state(self, g: int, to_device: bool) -> None:
        """Group g's AdamW moments to its tensors' device for the step, or back into their host buffers."""
        opt = self.optimizers[g]
        for t in self.groups[g]:
            st = opt.state[t.tensor]
            for key in ("exp_avg", "exp_avg_sq"):
                if to_device:
                    st[f"host_{key}"] = st[key]
                    st[key] = st[key].to(t.tensor.device, non_blocking=True)
                else:
                    host = st.pop(f"host_{key}")
                    if host is not st[key]:
                        host.copy_(st[key], non_blocking=True)
                    st[key] = host
        if to_device:
            self.on_device.add(g)
        else:
            cuda = [t.tensor.device for t in self.groups[g] if gpu.is_gpu(t.tensor.device)]
            if cuda:
                gpu.current_stream(cuda[0]).synchronize()  # the host copies are complete before the next step
            self.on_device.discard(g)

    def step(self, batch, step: int) -> dict:
        g = self.group_at(step)
        params = [t.tensor for t in self.groups[g]]
        for p in params:
            p.requires_grad_(True)
        self._move_state(g, to_device=True)
        try:
            out = self.adamw_step(self.optimizers[g], params, batch, self.lr_at(step))
        finally:
            self._move_state(g, to_device=False)
            for p in params:
                p.grad = None
                p.requires_grad_(False)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = dict(super().state_tensors())
        for opt, group in zip(self.optimizers, self.groups):
            for t in group:
                for k, v in opt.state[t.tensor].items():
                    out[f"{t.path}.{k}"] = v
        return out
