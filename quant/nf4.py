"""NF4 (bitsandbytes 4-bit NormalFloat) quantization and its checkpoint layout.

One quantized Linear (out_features N, in_features K, block size B, K % B == 0):
  codes  uint8 [N, K]    values 0..15, indices into NF4_TABLE
  absmax fp32  [N, K/B]  one scale per B consecutive elements of the row-major weight (not double-quantized)
  W[n, k] = absmax[n, k // B] * NF4_TABLE[codes[n, k]]

On disk (what `save_pretrained` of a `load_in_4bit` model writes for a `bnb.nn.Linear4bit`, compress_statistics=False):
  {prefix}.weight                               uint8 [N*K/2, 1]  two codes a byte, row-major flat order;
                                                                  element 2i in the HIGH nibble, 2i+1 in the low
  {prefix}.weight.absmax                        fp32  [N*K/B]
  {prefix}.weight.quant_map                     fp32  [16]        NF4_TABLE
  {prefix}.weight.quant_state.bitsandbytes__nf4 uint8 [L]         UTF-8 JSON:
      {"quant_type": "nf4", "blocksize": B, "dtype": "bfloat16", "shape": [N, K]}
The block size travels per tensor in that JSON; transformers' BitsAndBytesConfig has no block size field.
bitsandbytes is imported lazily (it takes seconds to import); dequantization and (de)serialization are plain torch.
"""
from __future__ import annotations

import json

import torch

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), sorted, code 7 is exactly 0.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_TABLE = torch.tensor(NF4_VALUES, dtype=torch.float32)

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes >= 0.46 (32 is new there)
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_DTYPES = ("float32", "float16", "bfloat16")


def bnb_nf4_table() -> torch.Tensor:
    """The NF4 code table as bitsandbytes itself builds it (fp32, CPU); should equal NF4_TABLE bit for bit."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device="cpu").to(torch.float32)


def _check_blocksize(blocksize: int, k: int | None = None) -> None:
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"unsupported NF4 blocksize={blocksize}; bitsandbytes supports {SUPPORTED_BLOCKSIZES}")
    if k is not None and k % blocksize:
        raise ValueError(
            f"in_features {k} is not a multiple of blocksize {blocksize}; qzo2 needs whole blocks per row "
            f"(absmax [N, K/blocksize]) - pick a blocksize that divides {k}"
        )


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) -> bitsandbytes packed uint8 [N*K/2, 1]: element 2i high nibble, 2i+1 low nibble."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        raise ValueError(f"NF4 packing needs an even number of elements, got {flat.numel()}")
    return ((flat[0::2] << 4) | (flat[1::2] & 0xF)).unsqueeze(1)


def unpack_nf4(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """bitsandbytes packed weight (any quant_storage dtype) -> codes uint8 [N, K]."""
    n, k = shape
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8 is a reinterpretation of the bytes
        flat = flat.contiguous().view(torch.uint8)
    if flat.numel() * 2 < n * k:
        raise ValueError(f"packed weight has {flat.numel()} bytes, too few for shape {tuple(shape)}")
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[: n * k].reshape(n, k)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] -> (codes uint8 [N, K], absmax fp32 [N, K/blocksize]) via bitsandbytes.quantize_4bit.

    Each element gets the nearest NF4 code of weight / absmax(block); absmax is kept fp32, not double-quantized.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_nf4 expects a 2-D [out_features, in_features] weight, got {tuple(weight.shape)}")
    n, k = weight.shape
    _check_blocksize(blocksize, k)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        weight = weight.float()
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(
        weight.detach().contiguous(), blocksize=blocksize, compress_statistics=False, quant_type="nf4"
    )
    return unpack_nf4(packed, (n, k)), state.absmax.to(torch.float32).reshape(n, k // blocksize)


def dequant_nf4(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes [N, K], absmax [N, K/B]) -> weight [N, K]; computed in fp32 (as bitsandbytes does), then cast.

    Differentiable in absmax, so the scales can be trained.
    """
    n, k = codes.shape
    if absmax.dim() != 2 or absmax.shape[0] != n or k % absmax.shape[1]:
        raise ValueError(f"absmax shape {tuple(absmax.shape)} does not fit codes {tuple(codes.shape)}")
    g = absmax.shape[1]
    values = NF4_TABLE.to(codes.device)[codes.long()]
    out = values.view(n, g, k // g) * absmax.to(torch.float32).unsqueeze(-1)
    return out.reshape(n, k).to(dtype)


def nf4_tensors(
    prefix: str, codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, dtype: str = "bfloat16"
) -> dict[str, torch.Tensor]:
    """The state-dict entries of one bnb Linear4bit (nf4, compress_statistics=False) under `prefix`.

    `dtype` is the original weight dtype recorded in the quant state ("float32"/"float16"/"bfloat16"); it is the
    default output dtype of bnb.functional.dequantize_4bit, the forward pass itself computes in the input dtype.
    """
    n, k = codes.shape
    _check_blocksize(blocksize, k)
    if tuple(absmax.shape) not in ((n, k // blocksize), (n * k // blocksize,)):
        raise ValueError(f"absmax shape {tuple(absmax.shape)} does not fit codes {(n, k)} with blocksize {blocksize}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": dtype, "shape": [n, k]}
    state_bytes = json.dumps(state).encode("utf-8")  # same json.dumps call as bitsandbytes.utils.pack_dict_to_tensor
    return {
        f"{prefix}.weight": pack_nf4(codes).contiguous(),
        f"{prefix}.weight.absmax": absmax.detach().to(torch.float32).reshape(-1).contiguous(),
        f"{prefix}.weight.quant_map": NF4_TABLE.clone(),
        f"{prefix}.weight.{QUANT_STATE_KEY}": torch.tensor(list(state_bytes), dtype=torch.uint8),
    }


def read_quant_state(prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Parse the packed JSON quant state of `prefix` (keys quant_type, blocksize, dtype, shape)."""
    key = f"{prefix}.weight.{QUANT_STATE_KEY}"
    if key not in tensors:
        fp4 = f"{prefix}.weight.quant_state.bitsandbytes__fp4"
        raise ValueError(f"{prefix}: no NF4 quant state ({key})" + (" - it is FP4, not NF4" if fp4 in tensors else ""))
    return json.loads(bytes(tensors[key].to(torch.uint8).tolist()).decode("utf-8"))


def nf4_from_tensors(
    prefix: str, tensors: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int]]:
    """Read one bnb 4-bit Linear back: (codes uint8 [N, K], absmax fp32 [N, K/B], blocksize, (N, K))."""
    state = read_quant_state(prefix, tensors)
    if state.get("quant_type") != "nf4":
        raise ValueError(f"{prefix}: quant_type {state.get('quant_type')!r}, expected 'nf4'")
    if f"{prefix}.weight.nested_absmax" in tensors:
        raise ValueError(f"{prefix}: absmax is double-quantized (bnb_4bit_use_double_quant); qzo2 needs fp32 absmax")
    blocksize = int(state["blocksize"])
    n, k = (int(s) for s in state["shape"])
    if k % blocksize:
        raise ValueError(f"{prefix}: in_features {k} is not a multiple of blocksize {blocksize}")
    quant_map = tensors.get(f"{prefix}.weight.quant_map")
    if quant_map is not None and not torch.equal(quant_map.float().cpu(), NF4_TABLE):
        raise ValueError(f"{prefix}: quant_map differs from the NF4 table")
    codes = unpack_nf4(tensors[f"{prefix}.weight"], (n, k))
    absmax = tensors[f"{prefix}.weight.absmax"].to(torch.float32).reshape(n, k // blocksize)
    return codes, absmax, blocksize, (n, k)


def nf4_quantization_config(
    blocksize: int, compute_dtype: str = "bfloat16", skip_modules: list[str] | None = None
) -> dict:
    """config.json `quantization_config` for a qzo2 NF4 checkpoint (transformers BitsAndBytesConfig.to_dict()).

    `blocksize` is only validated: transformers has no block size setting and takes it from each tensor's quant
    state. `skip_modules` (llm_int8_skip_modules) lists Linear modules left unquantized; when given it REPLACES
    transformers' default skip list (lm_head / output embeddings), so include "lm_head" yourself.
    """
    _check_blocksize(blocksize)
    if compute_dtype not in _DTYPES:
        raise ValueError(f"compute_dtype must be one of {_DTYPES}, got {compute_dtype!r}")
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": list(skip_modules) if skip_modules is not None else None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }
