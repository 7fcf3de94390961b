"""QuantLinear: a drop-in nn.Linear whose weight is W = scales ⊙ (codes - zeros).

Codes (GPTQ-packed int32) and zeros (true zero points, unpacked int16) are buffers that never change; `scales` is
an fp32 master tensor [G, N]. The layer can run with scales other than its own without copying codes:
set `chunk_scales = [s_0, ..., s_{m-1}]` and the batch is split into m equal chunks along dim 0, chunk i using s_i
(this is how one batched forward evaluates Δ+εz and Δ−εz). Norms, attention and everything else stay stock.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .format import default_g_idx, pack_rows
from .rtn import quantize_rtn
from .triton_kernels import triton_available, triton_dequant

BACKENDS = ("auto", "torch", "int4pack", "triton")


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        codebook: torch.Tensor | None = None,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, (in_features if group_size == -1 else group_size)
        if in_features % self.group_size:
            raise ValueError(f"in_features {in_features} is not divisible by group size {self.group_size}")
        n_groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        self.register_buffer("zeros", torch.zeros(n_groups, out_features, dtype=torch.int16, device=device))
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=torch.float32, device=device))
        self.register_buffer("g_idx", default_g_idx(in_features, self.group_size).to(device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("codebook", None if codebook is None else codebook.to(torch.float32), persistent=False)
        self.chunk_scales: list[torch.Tensor] | None = None
        self.backend = "auto"
        self.cache_base = False
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._packed = None  # int4pack layout, built lazily
        self._trivial = None  # whether g_idx is k // G
        self._cached_base = None  # codes - zeros in a float dtype, when cache_base is on

    def _base(self, dtype: torch.dtype) -> torch.Tensor:
        """value(q) - zero as [N, K] in `dtype`. With `cache_base` it is computed once and kept (dtype-size bytes
        per weight instead of bits/8: a speed-for-memory trade the trainer makes only when it fits). Without it, on
        CPU, the result lives in the shared workspace (kernels.Workspace) and is valid until the next layer's call."""
        if self._cached_base is not None and self._cached_base.dtype == dtype:
            return self._cached_base
        base = kernels.codes_minus_zeros(self.qweight, self.zeros, self._g_idx_or_none(), self.bits, self.codebook,
                                         dtype, None if self.cache_base else kernels.WORKSPACE)
        if self.cache_base:  # the very tensor (same layout) an uncached forward uses, so the outputs are bit-identical
            self._cached_base = base
        return base

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._reset_caches()

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .cuda(): derived layouts are rebuilt where the codes are
        out = super()._apply(fn, *args, **kwargs)
        self._reset_caches()
        return out

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, sym: bool = True):
        """Round-to-nearest quantization of an nn.Linear."""
        codes, zeros, scales = quantize_rtn(linear.weight, bits, group_size, sym)
        layer = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None)
        layer.load_codes(pack_rows(codes, bits), zeros, scales)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().to(torch.float32).clone()
        return layer

    def load_codes(self, qweight, zeros, scales, g_idx=None) -> None:
        self.qweight = qweight.to(torch.int32).contiguous()
        self.zeros = zeros.to(torch.int16).contiguous()
        self.scales = scales.to(torch.float32).contiguous()
        if g_idx is not None:
            self.g_idx = g_idx.to(torch.int32).contiguous()
        self._reset_caches()

    # ---- properties ---------------------------------------------------------------------------------------------
    @property
    def act_order(self) -> bool:
        """True when g_idx is not the contiguous k // G (GPTQ desc_act checkpoints)."""
        return not torch.equal(self.g_idx.cpu(), default_g_idx(self.in_features, self.group_size))

    def _g_idx_or_none(self):
        if self._trivial is None:
            self._trivial = not self.act_order
        return None if self._trivial else self.g_idx

    def resolved_backend(self, dtype: torch.dtype = torch.bfloat16) -> str:
        """`auto` picks by measurement (README, "CPU kernels"): on CPU the int4pack kernel for bf16 activations
        (~4x faster than bf16 dense there) and dequant + fp32 GEMM for fp32 activations (int4pack is ~50x slower
        in fp32); on CUDA the Triton dequant kernel + cuBLAS GEMM."""
        if self.backend in ("torch", "triton"):
            return self.backend
        on_cpu = self.qweight.device.type == "cpu"
        ok = on_cpu and kernels.int4pack_supported(self.bits, self.group_size, self._g_idx_or_none() is not None,
                                                   self.codebook, self.in_features)
        if self.backend == "int4pack":
            if not ok:
                raise ValueError("int4pack backend needs 4-bit affine codes on CPU, contiguous groups of 32..256")
            return "int4pack"
        if ok and dtype == torch.bfloat16:
            return "int4pack"
        if not on_cpu and triton_available():
            return "triton"
        return "torch"

    # ---- math ---------------------------------------------------------------------------------------------------
    def dequantize(self, scales: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
        """Weight [N, K] in `dtype` with the given (default: own) scales."""
        s = self.scales if scales is None else scales
        return kernels.dequant(self.qweight, self.zeros, s, self._g_idx_or_none(), self.bits, self.codebook, dtype)

    def _linear(self, x: torch.Tensor, scales: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """x @ (scales ⊙ (q − z))ᵀ + bias by the resolved backend (no autograd through the weight); `base`:
        q − z already expanded for this call (torch backend)."""
        backend = self.resolved_backend(x.dtype)
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if backend == "int4pack":
            if self._packed is None:
                self._packed = kernels.int4pack_weight(self.qweight, self.bits)
            return kernels.int4pack_linear(x, self._packed, self.zeros, scales, self.group_size, self.bias)
        if backend == "triton":
            w = triton_dequant(self.qweight, self.zeros, scales, self._g_idx_or_none(), self.bits, self.codebook, dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(dtype))
        return kernels.dequant_linear(x, self._base(dtype) if base is None else base, scales, self._g_idx_or_none(),
                                      self.bias, kernels.WORKSPACE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.chunk_scales is None and (self.scales.requires_grad or x.requires_grad):
            return ScaledLinearFunction.apply(x, self.scales, self)
        scale_sets = self.chunk_scales if self.chunk_scales is not None else [self.scales]
        m = len(scale_sets)
        if x.shape[0] % m:
            raise ValueError(f"batch of {x.shape[0]} rows cannot be split into {m} equal scale chunks")
        xs = x.split(x.shape[0] // m) if m > 1 else (x,)
        base = None  # q − z expanded once for all the chunks (they differ only in the scales)
        if m > 1 and self.resolved_backend(x.dtype) == "torch":
            base = self._base(x.dtype if x.is_floating_point() else torch.float32)
        ys = [self._linear(xi, s, base) for xi, s in zip(xs, scale_sets)]
        return ys[0] if m == 1 else torch.cat(ys)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend}")


def _half_gemms(layer, x: torch.Tensor, dy: torch.Tensor) -> bool:
    """Whether the scale backward runs its GEMMs on half-precision tensor cores: on CUDA, with bf16/fp16 activations
    and gradients, and integer codes (q − z is then a small integer, exact in the half dtype; a codebook's values are
    not). dW = dyᵀx takes the half inputs with an fp32 result (`torch.mm(..., out_dtype=float32)`: fp32 accumulation,
    and a product of two halves is exact in fp32, so it is the fp32 GEMM's value up to summation order); dx = dy·W
    uses the forward's half weight, as a bf16 nn.Linear's backward does. The fp32 GEMMs were ~half of a first-order
    7B step on an H100 in the roofline estimate (docs/gpu-memory.md). CPU keeps fp32: it has no fast half GEMM, and
    `mm(out_dtype=)` is CUDA-only. `meta` is the GPU's stand-in in qzo2's simulation (qzo2.simulate), which has
    `mm(out_dtype=)` too."""
    half = (torch.float16, torch.bfloat16)
    return (dy.device.type in ("cuda", "meta") and dy.dtype in half and x.dtype == dy.dtype and layer.codebook is None
            and layer.bits <= 8)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result from half inputs, accumulated in fp32: mm's `out_dtype` on CUDA; on CPU, which lacks
    it (only tests take the half path there), the fp32 GEMM of the exactly upcast inputs, the same value up to
    summation order."""
    if a.device.type == "cpu":
        return a.float() @ b.float()
    return torch.mm(a, b, out_dtype=torch.float32)


class ScaledLinearFunction(torch.autograd.Function):
    """y = x @ Wᵀ + b with W = s ⊙ (q − z), differentiable in x and in the scales s, that keeps no dense weight
    between forward and backward: it saves x and s (the codes are the layer's buffers), and backward recomputes
    q − z for this one layer. The forward runs whichever backend the layer resolves (int4pack, Triton, torch), none of
    which has a backward of its own.
      ∂L/∂x = ∂L/∂y · W
      ∂L/∂s[g, n] = Σ_{k in group g} ∂L/∂W[n, k] · (q − z)[n, k],   ∂L/∂W = (∂L/∂y)ᵀ x
    Plain autograd through `dequant` would instead keep a dequantized copy of every layer alive until backward (2-4
    bytes per weight). Backward holds one layer's dense (q − z), W and ∂L/∂W at a time: in fp32, or on CUDA with
    half activations q − z and W in the half dtype (`_half_gemms`); ∂L/∂W is fp32 either way."""

    @staticmethod
    def forward(ctx, x, scales, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, scales)
        return layer._linear(x, scales)

    @staticmethod
    def backward(ctx, dy):
        x, scales = ctx.saved_tensors
        layer = ctx.layer
        g_idx = layer._g_idx_or_none()
        half = _half_gemms(layer, x, dy)
        base = layer._base(dy.dtype if half else torch.float32)  # [N, K], q − z
        n, k = base.shape
        dy2 = dy.reshape(-1, n) if half else dy.reshape(-1, n).float()
        dx = ds = None
        ws = kernels.WORKSPACE if base.device.type == "cpu" else None  # reused buffers, valid within this call
        if ctx.needs_input_grad[0]:
            if half and layer.resolved_backend(x.dtype) == "triton":  # the forward's own weight
                w = triton_dequant(layer.qweight, layer.zeros, scales, g_idx, layer.bits, layer.codebook, dy.dtype)
            else:
                w = kernels.apply_scales(base, scales if half else scales.float(), g_idx, ws)
            dx = (dy2 @ w).reshape(x.shape).to(x.dtype)
            del w
        if ctx.needs_input_grad[1]:
            if half:  # exact products, fp32 sums and result: the fp32 GEMM's value up to summation order
                dw = _mm_fp32_out(dy2.t(), x.reshape(-1, k))
            else:
                x2 = x.reshape(-1, k).float()
                # the weight buffer again: w is dead once dx is computed
                dw = torch.matmul(dy2.t(), x2, out=ws.get("weight", (n, k), torch.float32)) if ws else dy2.t() @ x2
            kernels.mul_transposed_(dw, base)  # dW ⊙ (q − z), q − z in its transposed [K, N] layout
            if g_idx is None:
                ds = dw.view(n, scales.shape[0], k // scales.shape[0]).sum(-1).t()
            else:
                ds = torch.zeros(scales.shape, dtype=torch.float32, device=dw.device).index_add_(
                    0, g_idx.long(), dw.t())
            ds = ds.to(scales.dtype)
        return dx, ds, None
