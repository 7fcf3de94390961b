"""Test helpers: an independent reference loader for GPTQ checkpoints (stock transformers + optimum + gptqmodel).

Not a test module. The reference forward uses gptqmodel's pure-torch kernel (``backend="gptq_torch"``, class
``TorchLinear``): every forward computes ``scales[g_idx] * (q - zero)`` from the module's live tensors, so edits to
``.scales`` are honoured. The product is taken in the dtype of ``scales`` (fp16 as stored), then cast to the
activation dtype. The CPU default kernel (``TorchAtenLinear``) repacks on first forward, ignores later edits to
``.scales``, and is ~4e-3 off in logits. The loader trusts ``checkpoint_format``: v1 bytes labelled "gptq_v2" load
silently with every zero off by one.
"""
from __future__ import annotations

import importlib.util
import os
import warnings


def gptqmodel_available() -> bool:
    """True when transformers can load GPTQ checkpoints here (needs both optimum and gptqmodel)."""
    return all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum"))


def load_gptq_with_transformers(path, *, fp32_scales: bool = False):
    """Load the GPTQ checkpoint directory `path` with AutoModelForCausalLM on the CPU, fp32, eval mode.

    fp32_scales=True casts each layer's fp16 scales to fp32, so that W = scale * (q - zero) is computed in fp32
    (exactly what a hand dequantization in fp32 gives) rather than rounded to fp16.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPTQConfig

    bits = AutoConfig.from_pretrained(path).quantization_config["bits"]
    # transformers keeps the checkpoint's own quantization_config and takes only the loading attributes
    # (backend, max_input_length) from this one.
    qcfg = GPTQConfig(bits=bits, backend="gptq_torch")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, dtype=torch.float32,
                                                     device_map="cpu")
    for module in model.modules():
        # TorchLinear.post_init wraps dequantize_weight in torch.compile (an instance attribute); on the CPU it
        # recompiles for every layer shape and runs ~10-100x slower than eager, so use the plain method.
        vars(module).pop("dequantize_weight", None)
        if fp32_scales and hasattr(module, "qweight") and hasattr(module, "scales"):
            module.scales.data = module.scales.data.float()
    return model.eval()
