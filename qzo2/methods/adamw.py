"""AdamW: plain first-order torch.optim.AdamW after a full backward, the non-lean reference the memory-lean methods
are measured against; the only method with gradient accumulation."""
from __future__ import annotations

import torch

from .first_order import FirstOrder, FirstOrderOptions, adamw_for
from .registry import BenchMode, register


@register("adamw", help="AdamW: plain first-order torch.optim.AdamW (the non-lean reference).",
          options=FirstOrderOptions, first_order=True, bench={"adamw": BenchMode(quantized=True)},
          memory="activations + every gradient + two fp32 moments per trained value")
class AdamW(FirstOrder):
    """torch.optim.AdamW after a full backward (every gradient alive at once, two fp32 moments per trained value):
    the reference the memory-lean methods are measured against. Gradient accumulation: a step may be a list of
    micro-batches, each loss weighted by its share of the step's tokens (lm) or examples."""

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
