"""GGUF's 32-weight blocks <-> qzo2's codes, zero points and scales, without re-quantizing.

llama.cpp stores a weight [N, K] row by row, each row in blocks of 32 consecutive weights along K (the input dim), with
one fp16 scale d (and for Q4_1 an fp16 offset m) per block:
  Q4_0  18 bytes: d, then 16 bytes qs with qs[j] = q[j] | q[j + 16] << 4;   w = d · (q − 8),  q in [0, 15]
  Q4_1  20 bytes: d, m, then qs as Q4_0;                                     w = d · q + m,    q in [0, 15]
  Q8_0  34 bytes: d, then 32 int8 q;                                         w = d · q,        q in [−128, 127]
qzo2's grids (quant/format.py) are W = s · (q − z) with one s per group of G input channels. When G is a multiple of
32 and g_idx is the contiguous k // G, every block lies inside one group, so its d is the group's fp16 scale and:
  4-bit symmetric (z = 8)    -> Q4_0, exactly;
  8-bit symmetric (z = 128)  -> Q8_0, exactly (q − 128 is the int8 code);
  4-bit asymmetric           -> Q4_1 with m = fp16(−s · z): exact up to the fp16 rounding of m (reported).
The reverse (a GGUF's blocks -> codes) is exact for Q4_0 and Q8_0. A Q4_1 block's zero −m/d is a fraction in general,
which a GPTQ zero point (an integer) cannot hold, so a Q4_1 source is dequantized and quantized again instead.

Written here rather than taken from `gguf.quants.quantize`: that function re-quantizes floats (choosing its own d and
codes), while the point of this module is to keep the codes and trained scales exactly. `gguf.quants.dequantize` is
the independent reference the tests decode these blocks with.
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 32
TYPES = ("q4_0", "q4_1", "q8_0")
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
GRID = {"q4_0": (4, True), "q4_1": (4, False), "q8_0": (8, True)}  # bits, symmetric
DECODABLE = ("q4_0", "q8_0")  # the types whose blocks map back onto integer zero points exactly
SYM_ZERO = {4: 8, 8: 128}


class NotExact(ValueError):
    """A layer's grid has no GGUF block type that holds it exactly."""


def exact_type(bits: int, sym: bool, group_size: int, in_features: int, act_order: bool = False,
               codebook: bool = False) -> str:
    """The GGUF block type that holds this grid exactly, or NotExact saying why."""
    if codebook:
        raise NotExact("NF4 codes (a codebook, not an integer grid) have no GGUF block type")
    if act_order:
        raise NotExact("act-order (desc_act) groups are not contiguous 32-weight blocks")
    if group_size % BLOCK or in_features % BLOCK:
        raise NotExact(f"group size {group_size} (in_features {in_features}) is not a multiple of {BLOCK}")
    for name, grid in GRID.items():
        if grid == (bits, sym):
            return name
    raise NotExact(f"{bits}-bit {'symmetric' if sym else 'asymmetric'} codes have no exact GGUF block type "
                   f"(Q4_0: 4-bit symmetric, Q4_1: 4-bit asymmetric, Q8_0: 8-bit symmetric)")


def encode(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
           qtype: str) -> tuple[np.ndarray, float]:
    """codes [K, N] (unpacked, 0..2^b − 1), zeros [G, N] (true zero points), scales [G, N] fp16 -> the GGUF blocks of
    the weight [N, K] as uint8 [N, K / 32 · block bytes], and the largest |w_gguf − s·(q − z)| (0 except Q4_1)."""
    if qtype not in TYPES:
        raise ValueError(f"unknown GGUF block type {qtype!r}; choose from {TYPES}")
    if scales.dtype != torch.float16:
        raise ValueError(f"GGUF scales are fp16; got {scales.dtype}")
    k, n = codes.shape
    if k % BLOCK or group_size % BLOCK or k % group_size:
        raise NotExact(f"in_features {k} / group size {group_size} are not multiples of {BLOCK}")
    per = group_size // BLOCK
    nb = k // BLOCK
    q = codes.t().contiguous().numpy().astype(np.int16).reshape(n, nb, BLOCK)
    d16 = scales.t().contiguous().numpy().repeat(per, axis=1)  # [N, nb] fp16: each block's group scale
    z = zeros.t().contiguous().numpy().astype(np.int16).repeat(per, axis=1)  # [N, nb]
    d = d16.reshape(n, nb, 1).view(np.uint8)  # [N, nb, 2]
    err = 0.0
    if qtype in ("q4_0", "q4_1"):
        if int(q.max(initial=0)) > 15:
            raise NotExact("codes exceed 4 bits")
        qs = (q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).astype(np.uint8)  # [N, nb, 16]
        if qtype == "q4_0":
            if (z != 8).any():
                raise NotExact("Q4_0 needs every zero point to be 8 (a symmetric 4-bit grid)")
            parts = [d, qs]
        else:
            exact = -d16.astype(np.float64) * z  # the offset a float64 decoder would use
            m16 = exact.astype(np.float16)
            err = float(np.abs(m16.astype(np.float64) - exact).max(initial=0.0))
            parts = [d, m16.reshape(n, nb, 1).view(np.uint8), qs]
    else:
        if (z != 128).any():
            raise NotExact("Q8_0 needs every zero point to be 128 (a symmetric 8-bit grid)")
        parts = [d, (q - 128).astype(np.int8).view(np.uint8)]
    return np.concatenate(parts, axis=-1).reshape(n, nb * BLOCK_BYTES[qtype]), err


def decode(raw: np.ndarray, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF blocks of a weight [N, K] (uint8 [N, K / 32 · block bytes]) -> (codes uint8 [K, N], zeros int16
    [K / 32, N], scales fp16 [K / 32, N]) on qzo2's grid with group size 32, exactly. Q4_0 and Q8_0 only."""
    if qtype not in DECODABLE:
        raise NotExact(f"{qtype.upper()} blocks have no exact integer zero point (a Q4_1 block's −m/d is a fraction)")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, BLOCK_BYTES[qtype])
    nb = blocks.shape[1]
    d = blocks[..., :2].copy().view(np.float16).reshape(n, nb)
    if qtype == "q4_0":
        qs = blocks[..., 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)  # [N, nb, 32]
        zero = SYM_ZERO[4]
    else:
        q = (blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        zero = SYM_ZERO[8]
    codes = torch.from_numpy(q.reshape(n, nb * BLOCK).T.copy())
    scales = torch.from_numpy(d.T.copy())
    return codes, torch.full((nb, n), zero, dtype=torch.int16), scales


# ---- llama.cpp's rope layout ---------------------------------------------------------------------------------------
# llama.cpp's LLAMA architecture pairs dims 2i and 2i + 1 of a head in rope, transformers' Llama pairs i and i + d/2, so
# llama.cpp's converter permutes the rows of q_proj and k_proj (convert_hf_to_gguf.py, LlamaModel.permute). Rows move
# whole, so a quantized weight's blocks (and a codes / scales column) move intact.
def permute_rows(a, n_head: int):
    """HF row order -> llama.cpp's (dim 0 of a numpy array or tensor)."""
    return a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def unpermute_rows(a, n_head: int):
    """llama.cpp's row order -> HF's (the inverse of permute_rows)."""
    return a.reshape(n_head, a.shape[0] // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
