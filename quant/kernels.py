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

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from .format import unpack_rows

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


class Workspace(threading.local):
    """Reused CPU buffers for the dense temporaries of a dequantized matmul (q − z, the scaled weight, then in
    backward the weight gradient in the same buffer), one flat buffer per role grown to the largest layer seen. glibc serves allocations above 32 MB with
    a fresh mmap and returns them on free, so a 3B layer's 100 MB temporaries were page-faulted in (kernel time) on
    every call; a layer's temporaries are dead before the next layer runs, so one set serves them all. CPU only: on
    CUDA the caching allocator already reuses memory, and kernels run asynchronously. Per thread."""

    def __init__(self) -> None:
        self.buffers: dict = {}
        self.enabled = True

    def get(self, role: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A [shape] view of the `role` buffer; a fresh tensor when disabled or under fake tensors (a fake buffer
        must never be kept for later real calls)."""
        if not self.enabled or detect_fake_mode() is not None:
            return torch.empty(shape, dtype=dtype)
        n = 1
        for d in shape:
            n *= d
        buf = self.buffers.get((role, dtype))
        if buf is None or buf.numel() < n:
            buf = self.buffers[role, dtype] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self.buffers.clear()

    @contextlib.contextmanager
    def disabled(self):
        """Fresh tensors for every call inside (what a simulated step allocates), the buffers dropped."""
        self.enabled, self.buffers = False, {}
        try:
            yield
        finally:
            self.enabled = True


WORKSPACE = Workspace()


def dequant_reference(qweight, zeros, scales, g_idx, bits, codebook=None) -> torch.Tensor:
    """float64 [N, K]: the reference every kernel is checked against."""
    q = unpack_rows(qweight, bits).to(torch.int64)  # [K, N]
    values = q.to(torch.float64) if codebook is None else codebook.to(torch.float64)[q]
    g = g_idx.to(torch.int64)
    w = scales.to(torch.float64)[g] * (values - zeros.to(torch.float64)[g])  # [K, N]
    return w.t().contiguous()


def codes_minus_zeros(qweight, zeros, g_idx, bits, codebook=None, dtype=torch.float32,
                      workspace: Workspace | None = None) -> torch.Tensor:
    """value(q) - zero as [N, K] in `dtype`: the scale-free part of W, shared by every perturbed copy. With a
    workspace (CPU, integer codes, contiguous groups) it is written into the workspace's "base" buffer without any
    other large temporary: the same values in the same [K, N] memory layout, valid until the next call."""
    if workspace is not None and codebook is None and g_idx is None and qweight.device.type == "cpu":
        return _codes_minus_zeros_into(qweight, zeros, bits, dtype, workspace)
    q = unpack_rows(qweight, bits)  # [K, N] uint8
    values = q.to(dtype) if codebook is None else codebook.to(dtype)[q.long()]
    z = zeros.to(dtype) if g_idx is None else zeros.to(dtype)[g_idx.long()]
    if g_idx is None:
        group = q.shape[0] // zeros.shape[0]
        z = z.repeat_interleave(group, dim=0)
    return (values - z).t()


def _codes_minus_zeros_into(qweight, zeros, bits, dtype, ws: Workspace) -> torch.Tensor:
    per = 32 // bits
    rows, n = qweight.shape
    k = rows * per
    out = ws.get("base", (k, n), dtype)  # [K, N], as unpack_rows lays the codes out
    field = ws.get("field", (rows, n), torch.int32)
    fields = out.view(rows, per, n)
    for j in range(per):  # code k = word k // per, field k % per
        torch.bitwise_right_shift(qweight, bits * j, out=field)
        field.bitwise_and_(2**bits - 1)
        fields[:, j, :].copy_(field)
    g = zeros.shape[0]
    out.view(g, k // g, n).sub_(zeros.unsqueeze(1))
    return out.t()


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


def apply_scales(base: torch.Tensor, scales: torch.Tensor, g_idx, workspace: Workspace | None = None,
                 role: str = "weight") -> torch.Tensor:
    """base ⊙ expand(scales) -> [N, K]; contiguous groups broadcast one scale over G columns without expanding.
    With a workspace (CPU, contiguous groups) the product goes into its `role` buffer in the layout a fresh result
    would have (base's), so everything computed from it is bit-identical; it is valid until the next call."""
    scales = scales.to(base.dtype)
    if g_idx is not None:
        return base * expand_scales(scales, g_idx, base.shape[1])
    N, K = base.shape
    n_groups = scales.shape[0]
    grouped = base.reshape(N, n_groups, K // n_groups)
    if workspace is None or base.device.type != "cpu":
        return (grouped * scales.t().unsqueeze(-1)).reshape(N, K)
    if base.stride() == (1, N):  # the transposed [K, N] layout codes_minus_zeros gives
        out = workspace.get(role, (K, N), base.dtype).t()
    else:
        out = workspace.get(role, (N, K), base.dtype)
    torch.mul(grouped, scales.t().unsqueeze(-1), out=out.view(N, n_groups, K // n_groups))
    return out


def mul_transposed_(out: torch.Tensor, other: torch.Tensor, block: int = 64, min_numel: int = 1 << 20) -> torch.Tensor:
    """out *= other for a [N, K] `out`. On CPU, when `other` is stored transposed ([K, N] memory, as q − z is), in
    blocks of `block` columns: one `mul_` over the whole tensors walks `other` with a stride of N elements per step, a
    cache miss per element (14 s of a 3B AdaLomo step on a 2-core CPU); a block of 64 columns keeps the 64 rows of
    `other` it reads in cache, ~3x faster at 3B (docs/bench.md). Below `min_numel` elements (4 MB in fp32, where the
    two cross over on that CPU) both fit in cache and one `mul_` is faster; on a GPU one kernel is. Elementwise, so
    the result is bit-identical to out.mul_(other) either way."""
    transposed = other.stride() == (1, out.shape[0])
    if out.device.type != "cpu" or not transposed or out.numel() < min_numel:
        return out.mul_(other)
    for k0 in range(0, out.shape[1], block):
        out[:, k0:k0 + block].mul_(other[:, k0:k0 + block])
    return out


def dequant_linear(x, base, scales, g_idx, bias=None, workspace: Workspace | None = None) -> torch.Tensor:
    """x @ (base ⊙ expand(scales)).T, base = codes_minus_zeros(...) already in x's dtype."""
    return F.linear(x, apply_scales(base, scales, g_idx, workspace), None if bias is None else bias.to(x.dtype))
