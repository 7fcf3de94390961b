"""GPTQ quantization through gptqmodel 7.6.0 (optional extra: pip install 'qzo2[gptq]').

Saved (model.safetensors, config.json, quantize_config.json, tokenizer): v1, checkpoint_format and format "gptq" for
sym and asym. Zeros are stored as zero - 1 by one int32 subtraction per word (4-bit: 0x11111111; sym words 0x77777777);
an asym zero of 0 borrows into the next field, so decode v1 as word + 0x11111111 mod 2^32, not +1 per nibble.
Per Linear: qweight int32 [K*b/32, N], qzeros int32 [K/G, N*b/32], scales fp16 [K/G, N], g_idx int32 [K] (k // G unless
desc_act), bias if present; other tensors keep the load dtype. quantize_config.json == config.json quantization_config
= {bits, group_size, desc_act, sym, lm_head, quant_method "gptq", method, format, checkpoint_format, pack_dtype "int32",
meta {damp_percent, true_sequential, static_groups, act_group_aware, ...}}.
"""
from __future__ import annotations

import os
import tempfile

_MISSING = "GPTQ quantization needs the 'gptq' extra: pip install 'qzo2[gptq]'"


def _calibration(tokenizer, texts: list[str], nsamples: int, seqlen: int) -> list[dict]:
    """Concatenate the texts, tokenize, and cut up to nsamples chunks of seqlen tokens."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    n = min(nsamples, len(ids) // seqlen)
    if n == 0:  # text shorter than one chunk: use it whole
        chunks = [ids]
    else:
        chunks = [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]
    return [{"input_ids": c, "attention_mask": [1] * len(c)} for c in chunks]


def quantize_with_gptqmodel(model_dir: str, out_dir: str, *, bits: int, group_size: int, sym: bool,
                            desc_act: bool, calib_texts: list[str], nsamples: int = 128, seqlen: int = 512,
                            damp_percent: float = 0.01, trust_remote_code: bool = False) -> None:
    """GPTQ-quantize the HF model in model_dir on the CPU and save gptqmodel's checkpoint to out_dir. Code the
    directory names (auto_map) runs only with trust_remote_code."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as e:
        raise ImportError(_MISSING) from e
    import torch

    from .checkpoint import load_tokenizer

    model_dir, out_dir = os.path.abspath(model_dir), os.path.abspath(out_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    calib = _calibration(tokenizer, calib_texts, nsamples, seqlen)
    qcfg = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                          damp_percent=damp_percent, device="cpu")
    # gptqmodel would otherwise load the source weights as bfloat16 on the CPU
    model = GPTQModel.load(model_dir, qcfg, dtype=torch.float32, trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="qzo2-gptqmodel-logs-") as scratch:
        cwd = os.getcwd()
        os.chdir(scratch)  # gptqmodel writes ./logs/*.log into the working directory
        try:
            model.quantize(calib, tokenizer=tokenizer, batch_size=1)
        finally:
            os.chdir(cwd)
    os.makedirs(out_dir, exist_ok=True)
    model.save(out_dir)
