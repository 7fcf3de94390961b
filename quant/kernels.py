"""Dequantization and quantized matmul.

W[n, k] = scales[g, n] * (value(q[k, n]) - zeros[g, n]),  g = g_idx[k]
where value() is the identity for integer (GPTQ) codes and a codebook lookup for NF4 (whose zeros are 0).

`dequant_reference` (float64) is the one reference; every fast path here is tested against it:
  - `dequant` + F.linear         plain torch, any device, any bits, act-order g_idx, codebooks
  - `int4pack_linear`            torch's CPU weight-only int4 kernel (aten._weight_int4pack_mm_for_cpu): 4-bit
                                 affine codes, contiguous groups of 32..256. Scales are an input of every call, so a
                                 perturbed set costs nothing but a tiny [K/G, N, 2] tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import unpack_rows

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


def dequant_reference(qweight, zeros, scales, g_idx, bits, codebook=None) -> torch.Tensor:
    """float64 [N, K]: the reference every kernel is checked against."""
    q = unpack_rows(qweight, bits).to(torch.int64)  # [K, N]
    values = q.to(torch.float64) if codebook is None else codebook.to(torch.float64)[q]
    g = g_idx.to(torch.int64)
    w = scales.to(torch.float64)[g] * (values - zeros.to(torch.float64)[g])  # [K, N]
    return w.t().contiguous()


def codes_minus_zeros(qweight, zeros, g_idx, bits, codebook=None, dtype=torch.float32) -> torch.Tensor:
    """value(q) - zero as [N, K] in `dtype`: the scale-free part of W, shared by every perturbed copy."""
    q = unpack_rows(qweight, bits)  # [K, N] uint8
    values = q.to(dtype) if codebook is None else codebook.to(dtype)[q.long()]
    z = zeros.to(dtype) if g_idx is None else zeros.to(dtype)[g_idx.long()]
    if g_idx is None:
        group = q.shape[0] // zeros.shape[0]
        z = z.repeat_interleave(group, dim=0)
    return (values - z).t()


def expand_scales(scales: torch.Tensor, g_idx, in_features: int) -> torch.Tensor:
    """scales [G, N] -> [N, K] (one per weight)."""
    if g_idx is None:
        return scales.t().repeat_interleave(in_features // scales.shape[0], dim=1)
    return scales[g_idx.long()].t()


def dequant(qweight, zeros, scales, g_idx, bits, codebook=None, dtype=torch.float32) -> torch.Tensor:
    """[N, K] weight in `dtype`. g_idx=None means contiguous groups (k // G)."""
    return apply_scales(codes_minus_zeros(qweight, zeros, g_idx, bits, codebook, dtype), scales, g_idx)


def int4pack_supported(bits: int, group_size: int, has_g_idx: bool, codebook, in_features: int) -> bool:
    return (
        bits == 4
        and codebook is None
        and not has_g_idx
        and group_size in INT4PACK_GROUP_SIZES
        and in_features % group_size == 0
    )


def int4pack_weight(qweight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """GPTQ qweight -> the layout of aten._weight_int4pack_mm_for_cpu (codes as int32 [N, K] in, uint8 out)."""
    q = unpack_rows(qweight, bits).t().contiguous().to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)


def int4pack_linear(x, packed, zeros, scales, group_size, bias=None) -> torch.Tensor:
    """x @ W.T with W = s*(q - z), computed by the CPU int4 kernel, whose weight is (q - 8)*s + m:
    so m = s*(8 - z)."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    scale_zero = torch.stack([scales, scales * (8 - zeros.to(scales.dtype))], dim=-1).to(dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scale_zero)
    y = y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def apply_scales(base: torch.Tensor, scales: torch.Tensor, g_idx) -> torch.Tensor:
    """base ⊙ expand(scales) -> [N, K]; contiguous groups broadcast one scale over G columns without expanding."""
    scales = scales.to(base.dtype)
    if g_idx is not None:
        return base * expand_scales(scales, g_idx, base.shape[1])
    N, K = base.shape
    n_groups = scales.shape[0]
    return (base.reshape(N, n_groups, K // n_groups) * scales.t().unsqueeze(-1)).reshape(N, K)


def dequant_linear(x, base, scales, g_idx, bias=None) -> torch.Tensor:
    """x @ (base ⊙ expand(scales)).T, base = codes_minus_zeros(...) already in x's dtype."""
    return F.linear(x, apply_scales(base, scales, g_idx), None if bias is None else bias.to(x.dtype))
