"""Training methods, one module each, each a `base.Method` registered by name (registry.py) that the trainer and
`qzo2 bench` drive the same way:

  zo.py           qzo (scales of a quantized model), mezo (weights of an unquantized one; ZO2 mode with offload)
  lomo.py         lomo, adalomo (first-order, update fused into backward)
  adamw.py        adamw (first-order reference)
  hift.py         hift (one group of layers per step, AdamW, the other groups' state in host memory)
  grass.py        grass (Adam on row-sparse projected gradients of the weight matrices)
  first_order.py  what the first-order ones share; base.py what all share; registry.py the table

Adding a method is one new module here plus its import below (docs/architecture.md).

`load_for_training(cfg)` loads the model, picks what is trained (the model decides: scales if it is quantized,
weights of the `params` kinds if not; `trainable` narrows by regex), places it and builds the method.
"""
from __future__ import annotations

import re
from pathlib import Path

from quant.linear import QuantLinear

from ..engine import place_model, set_cache_base
from ..model import DTYPES, is_quantized_dir, load_model, resolve_device, resolve_source
from ..run import TrainingError
from . import zo, lomo, adamw, hift, grass  # noqa: F401, I001  (each registers its methods, in this order)
from .base import Method, Target, scale_targets, weight_targets
from . import registry
from .registry import BenchMode, MethodSpec, register, unregister


__all__ = ["BenchMode", "Method", "MethodSpec", "Target", "build_method", "load_for_training", "objective_kind",
           "register", "select_targets", "unregister"]


def objective_kind(cfg) -> str:
    """The loss a run trains: candidates' cross-entropy for a task trained as classification, else the LM loss."""
    return "classification" if cfg.task and cfg.objective == "classification" else "lm"


def select_targets(cfg, model, quantized: bool) -> list[Target]:
    """Scales of a quantized model (plus the `also_train` kinds of its unquantized tensors), or the weights of
    `params` kinds of an unquantized one; `trainable` filters by regex, keeping each target's index in the full
    list (so z does not depend on the filter)."""
    if quantized:
        targets = scale_targets(model)
        kinds = tuple(k.strip() for k in cfg.also_train.split(",") if k.strip())
        if kinds:  # unquantized tensors beside the scales, indexed after them (the scales' z stay the same)
            extra = weight_targets(model, kinds)
            for i, t in enumerate(extra):
                t.index = len(targets) + i
            targets = targets + extra
    else:
        targets = weight_targets(model, tuple(k.strip() for k in cfg.params.split(",") if k.strip()))
    if cfg.trainable:
        targets = [t for t in targets if re.search(cfg.trainable, t.path)]
        if not targets:
            raise TrainingError(f"trainable={cfg.trainable!r} matches no trainable tensor")
    return targets


def build_method(cfg, model, targets: list[Target], kind: str) -> Method:
    return cfg.spec.cls(model, cfg, targets, kind)


def load_for_training(cfg):
    """cfg -> (model, tokenizer, method): the model loaded (eval mode: dropout off, no gradients but the trained
    tensors'), placed on its device (blocks streamed when offload says so), the method built."""
    source = resolve_source(cfg.model)
    if cfg.model not in ("", "default") and not Path(source).exists():
        raise TrainingError(f"model {cfg.model} does not exist")
    quantized = is_quantized_dir(Path(source))
    if cfg.also_train and not quantized:
        raise TrainingError(f"also_train adds unquantized tensors to a quantized model's scales; {source} is not "
                            f"quantized (choose its trained kinds with params)")
    spec = cfg.spec
    if "weights" not in spec.trains and not quantized:
        raise TrainingError(f"method={cfg.method} trains the scales of a quantized model; {source} is not one "
                            f"(run `qzo2 quantize {cfg.model if cfg.model != 'default' else ''} -o DIR` first)")
    if "scales" not in spec.trains and quantized:
        others = ", ".join(s.name for s in registry.specs().values() if "scales" in s.trains)
        raise TrainingError(f"method={cfg.method} trains full weights; {source} is quantized (train its scales with "
                            f"one of: {others})")
    model, tokenizer = load_model(source, dtype=DTYPES[cfg.dtype])
    model.eval()  # dropout off: every ZO forward is deterministic, and first-order steps see the same model
    for p in model.parameters():
        p.requires_grad_(False)
    targets = select_targets(cfg, model, quantized)
    device = resolve_device(cfg.device)
    if quantized:
        set_cache_base(cfg.cache_base, [m for m in model.modules() if isinstance(m, QuantLinear)], device)
    place_model(model, device, cfg.offload, cfg.gpu_memory, cfg.prefetch_depth, targets,
                first_order=spec.first_order,
                checkpoint=spec.first_order and getattr(cfg.options, "gradient_checkpointing", False))
    return model, tokenizer, build_method(cfg, model, targets, objective_kind(cfg))
