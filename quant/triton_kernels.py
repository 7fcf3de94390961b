"""Triton GPU kernel for the GPU path: dequantize GPTQ-packed codes to a dense weight.

    W[n, k] = scales[g, n] * (value(q[k, n]) - zeros[g, n]),  g = g_idx[k]  (k // group_size when g_idx is None)

computed per element as one fp32 subtraction (exact: small integers, or a codebook value minus a zero of 0) and one
fp32 multiply by the scale, then a single rounding to the output dtype. So the fp32 output equals
`kernels.dequant_reference(...).float()` bit for bit, and a bf16/fp16 output equals that rounded once more.

Triton is imported lazily (on the first `triton_dequant` call), so `import quant.triton_kernels` works without it,
and TRITON_INTERPRET=1 (Triton's CPU interpreter, used by the tests on machines without a GPU) only has to be set
before that first call, not before importing this module.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

SUPPORTED_BITS = (2, 4, 8)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_ASSUMED = False  # inside `assume_triton()`: a simulated GPU, which has triton as every CUDA build of torch does


@contextlib.contextmanager
def assume_triton():
    """Within this block `triton_available()` is True: for fake-tensor simulations of a GPU, where the kernel never
    launches (the `quant::triton_dequant` op's fake implementation gives the output's shape)."""
    global _ASSUMED
    previous, _ASSUMED = _ASSUMED, True
    try:
        yield
    finally:
        _ASSUMED = previous


def triton_available() -> bool:
    """Whether triton can be imported (not whether a GPU is present; see `interpret_mode`)."""
    if _ASSUMED:
        return True
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET is set: kernels then run on CPU tensors (slowly, via numpy)."""
    try:
        from triton import knobs  # triton >= 3.4 parses the variable itself

        return bool(knobs.runtime.interpret)
    except Exception:
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """Build the jitted kernel on first use. `interpret` is part of the cache key because triton.jit decides
    between the compiler and the interpreter when the function is decorated."""
    import triton
    import triton.language as tl

    @triton.jit
    def _dequant_kernel(
        qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, codebook_ptr, out_ptr,
        N, K, group_size,
        BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_CODEBOOK: tl.constexpr, OUT_BF16: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
        offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # [BK]
        mask_n = offs_n < N
        mask_k = offs_k < K
        mask = mask_n[:, None] & mask_k[None, :]  # [BN, BK]

        # codes: q[k, n] = (qweight[k // PER, n] >> (BITS * (k % PER))) & MASK. The arithmetic shift of a negative
        # word sign-extends, but the mask drops those bits.
        word = tl.load(qweight_ptr + (offs_k // PER)[None, :] * N + offs_n[:, None], mask=mask, other=0)
        shift = ((offs_k % PER) * BITS).to(tl.int32)
        q = (word >> shift[None, :]) & MASK  # [BN, BK] int32
        if HAS_CODEBOOK:
            value = tl.load(codebook_ptr + q, mask=mask, other=0.0).to(tl.float32)
        else:
            value = q.to(tl.float32)

        if HAS_G_IDX:
            g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        else:
            g = offs_k // group_size
        gz = g[None, :] * N + offs_n[:, None]
        z = tl.load(zeros_ptr + gz, mask=mask, other=0).to(tl.float32)
        s = tl.load(scales_ptr + gz, mask=mask, other=0.0).to(tl.float32)
        w = (value - z) * s
        if OUT_BF16:
            # fp32 -> bf16 round-to-nearest-even done by hand: the same bits as the GPU's cvt.rn, and correct under
            # the interpreter too, whose fp32 -> bf16 cast truncates (triton 3.9). NaNs stay (quiet) NaNs.
            b = w.to(tl.uint32, bitcast=True)
            r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            r = tl.where(w != w, (b >> 16) | 0x40, r)
            out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = w.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], out, mask=mask)

    return _dequant_kernel


def triton_dequant(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    codebook: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """Dense weight [N, K] in `dtype` (fp32/bf16/fp16), one Triton program per [block_n, block_k] output tile.

    qweight int32 [K*bits/32, N]; zeros int [G, N] (true zero points); scales float [G, N] (any set: the stored
    ones or a perturbed copy; upcast to fp32); g_idx int [K] or None (contiguous groups k // (K/G)); codebook
    float [>= 2^bits] (NF4) or None. All tensors on one CUDA device, or on CPU under TRITON_INTERPRET=1.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits}; expected one of {SUPPORTED_BITS}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"unsupported output dtype {dtype}; expected one of {OUT_DTYPES}")
    if not triton_available():
        raise RuntimeError("triton_dequant needs triton (pip install triton)")
    device = qweight.device
    for b in (block_n, block_k):
        if b < 1 or b & (b - 1):
            raise ValueError(f"block sizes must be powers of two, got {block_n}x{block_k}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")

    per = 32 // bits
    K, N = qweight.shape[0] * per, qweight.shape[1]
    G = zeros.shape[0]
    if zeros.shape != (G, N) or scales.shape != (G, N):
        raise ValueError(f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must both be [G, {N}]")
    if g_idx is None:
        if G < 1 or K % G:
            raise ValueError(f"in_features {K} is not divisible into {G} contiguous groups")
        group_size = K // G
    else:
        if g_idx.shape != (K,):
            raise ValueError(f"g_idx must have shape [{K}], got {tuple(g_idx.shape)}")
        group_size = 1  # unused
    if codebook is not None and codebook.numel() < 2**bits:
        raise ValueError(f"codebook has {codebook.numel()} entries, {bits}-bit codes need {2**bits}")
    for name, t in (("zeros", zeros), ("scales", scales), ("g_idx", g_idx), ("codebook", codebook)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, qweight on {device}")

    qweight = qweight.contiguous()
    zeros = (zeros if zeros.dtype in (torch.int16, torch.int32) else zeros.to(torch.int32)).contiguous()
    scales = scales.to(torch.float32).contiguous()
    g_idx_t = None if g_idx is None else g_idx.to(torch.int32).contiguous()
    codebook_t = None if codebook is None else codebook.reshape(-1).to(torch.float32).contiguous()
    return _dequant_op(qweight, zeros, scales, g_idx_t, codebook_t, bits, group_size, dtype, block_n, block_k)


# The launch is a torch.library custom op, so fake tensors (qzo2.simulate) and torch.compile see a dense [N, K]
# output of `dtype` without running Triton.
@torch.library.custom_op("quant::triton_dequant", mutates_args=())
def _dequant_op(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                codebook: torch.Tensor | None, bits: int, group_size: int, dtype: torch.dtype, block_n: int,
                block_k: int) -> torch.Tensor:
    device, interpret = qweight.device, interpret_mode()
    if device.type != "cuda" and not interpret:
        raise RuntimeError(f"triton_dequant needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 for CPU")
    K, N = qweight.shape[0] * (32 // bits), qweight.shape[1]
    out = torch.empty(N, K, dtype=dtype, device=device)
    if N == 0 or K == 0:
        return out

    # Unused pointer arguments get a valid tensor (qweight); the constexpr flags keep them from being read.
    # g_idx values are not range-checked (that would cost a device sync): out-of-range groups read out of bounds.
    grid = (-(-N // block_n), -(-K // block_k))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # launch on their GPU
        _kernel(interpret)[grid](
            qweight, zeros, scales,
            qweight if g_idx is None else g_idx,
            qweight if codebook is None else codebook,
            out, N, K, group_size,
            BITS=bits, HAS_G_IDX=g_idx is not None, HAS_CODEBOOK=codebook is not None,
            OUT_BF16=dtype == torch.bfloat16,
            BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return out


@_dequant_op.register_fake
def _(qweight, zeros, scales, g_idx, codebook, bits, group_size, dtype, block_n, block_k):
    return qweight.new_empty(qweight.shape[1], qweight.shape[0] * (32 // bits), dtype=dtype)
