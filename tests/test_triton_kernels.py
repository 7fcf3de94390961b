"""quant.triton_kernels.triton_dequant against kernels.dequant_reference (float64) on fresh random inputs.

Runs the kernel on CUDA when a GPU is present, otherwise on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set below before anything can import triton). Skipped only when triton is not importable.

Tolerances: the kernel computes (value - zero) exactly in fp32 and multiplies once by the fp32 scale, and the float64
reference product is exact (24-bit scale x at most 24-bit value), so the fp32 output must equal reference.float()
bit for bit. bf16/fp16 outputs are that fp32 number rounded once more, so they must equal
reference.float().to(dtype) exactly, and lie within half an ulp plus the fp32 rounding of the float64 value:
relative error <= 2^-8 (bf16) / 2^-10 (fp16) is asserted as well.
"""
from __future__ import annotations

import os

import torch

# Without a GPU, compiled Triton kernels cannot run at all, so forcing the interpreter here cannot break anything
# else in the session; it must happen before triton is imported (older triton versions read it at import time).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from quant.format import default_g_idx, pack_rows  # noqa: E402
from quant.kernels import dequant_reference  # noqa: E402
from quant.nf4 import NF4_TABLE  # noqa: E402
from quant.triton_kernels import triton_available, triton_dequant  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable (pip install triton)")

REL_TOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def _layer(N, K, bits, group_size, act_order=False, codebook=False, seed=0):
    """Random codes/zeros/scales (and a random g_idx permutation for act-order), plus an independent scale set."""
    g = torch.Generator().manual_seed(seed)
    gs = K if group_size == -1 else group_size
    G = K // gs
    codes = torch.randint(0, 2**bits, (K, N), generator=g)
    qweight = pack_rows(codes, bits)
    zeros = (torch.zeros(G, N) if codebook else torch.randint(0, 2**bits, (G, N), generator=g)).to(torch.int16)
    scales = torch.rand(G, N, generator=g) * 0.05 + 1e-3
    other_scales = scales * (1 + 0.3 * torch.randn(G, N, generator=g))  # per-call set, never stored anywhere
    g_idx = default_g_idx(K, gs)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)].contiguous()
    return dict(qweight=qweight, zeros=zeros, scales=scales, g_idx=g_idx, codebook=NF4_TABLE if codebook else None,
                other_scales=other_scales)


def _run(L, bits, scales, g_idx, dtype, **kw):
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = triton_dequant(dev(L["qweight"]), dev(L["zeros"]), dev(scales), dev(g_idx), bits, dev(L["codebook"]),
                         dtype=dtype, **kw)
    assert out.dtype == dtype and out.is_contiguous()
    return out.cpu()


def _check(L, bits, scales, g_idx, dtype=torch.float32, **kw):
    ref = dequant_reference(L["qweight"], L["zeros"], scales, L["g_idx"], bits, L["codebook"])
    out = _run(L, bits, scales, g_idx, dtype, **kw)
    assert out.shape == ref.shape
    assert torch.equal(out, ref.float().to(dtype)), (out.double() - ref).abs().max()
    if dtype in REL_TOL:
        err = (out.double() - ref).abs()
        assert bool((err <= REL_TOL[dtype] * ref.abs()).all()), (err / ref.abs().clamp_min(1e-30)).max()
    return out


CASES = [  # (N, K, bits, group_size)
    (48, 256, 4, 32),
    (200, 384, 4, 128),
    (72, 256, 4, -1),
    (40, 256, 2, 32),
    (96, 384, 2, 128),
    (64, 128, 2, -1),
    (56, 256, 8, 32),
    (136, 256, 8, 128),
    (24, 96, 8, -1),
]


@needs_triton
@pytest.mark.parametrize("N,K,bits,group_size", CASES)
@pytest.mark.parametrize("act_order", [False, True], ids=["contig", "act_order"])
def test_matches_reference_fp32(N, K, bits, group_size, act_order):
    L = _layer(N, K, bits, group_size, act_order, seed=N + K + bits)
    g_idx = L["g_idx"] if act_order else None
    own = _check(L, bits, L["scales"], g_idx)
    other = _check(L, bits, L["other_scales"], g_idx)  # per-call scales really are used
    assert not torch.equal(own, other)
    if not act_order:  # an explicit contiguous g_idx gives the same weight as None
        assert torch.equal(_run(L, bits, L["scales"], L["g_idx"], torch.float32), own)


@needs_triton
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("act_order", [False, True], ids=["contig", "act_order"])
def test_nf4_codebook(group_size, act_order):
    L = _layer(80, 256, 4, group_size, act_order, codebook=True, seed=7)
    g_idx = L["g_idx"] if act_order else None
    _check(L, 4, L["scales"], g_idx)
    _check(L, 4, L["other_scales"], g_idx, torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bits,act_order", [(4, False), (2, True), (8, False)])
def test_half_outputs(dtype, bits, act_order):
    L = _layer(100, 256, bits, 64, act_order, seed=bits)
    _check(L, bits, L["other_scales"], L["g_idx"] if act_order else None, dtype)


@needs_triton
@pytest.mark.parametrize("block_n,block_k", [(16, 32), (128, 16), (32, 256)])
def test_tile_shapes(block_n, block_k):
    """Tiles that do not divide N or K (masking), wider and narrower than a group."""
    L = _layer(70, 384, 4, 128, act_order=True, seed=3)
    _check(L, 4, L["other_scales"], L["g_idx"], block_n=block_n, block_k=block_k)


@needs_triton
def test_input_dtypes_are_upcast():
    """fp16 scales and int32 zeros/g_idx (checkpoint dtypes) are accepted; the math stays fp32."""
    L = _layer(64, 256, 4, 128, act_order=True, seed=11)
    s16 = L["scales"].half()
    ref = dequant_reference(L["qweight"], L["zeros"], s16.float(), L["g_idx"], 4)
    out = triton_dequant(L["qweight"].to(DEVICE), L["zeros"].int().to(DEVICE), s16.to(DEVICE),
                         L["g_idx"].long().to(DEVICE), 4, dtype=torch.float32).cpu()
    assert torch.equal(out, ref.float())


@needs_triton
def test_rejects_bad_arguments():
    L = _layer(32, 128, 4, 32)
    q, z, s = L["qweight"].to(DEVICE), L["zeros"].to(DEVICE), L["scales"].to(DEVICE)
    with pytest.raises(ValueError, match="bits"):
        triton_dequant(q, z, s, None, 3)
    with pytest.raises(ValueError, match="dtype"):
        triton_dequant(q, z, s, None, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\[G, 32\]"):
        triton_dequant(q, z[:, :16], s, None, 4)
    with pytest.raises(ValueError, match="g_idx"):
        triton_dequant(q, z, s, torch.zeros(64, dtype=torch.int32, device=DEVICE), 4)
    with pytest.raises(ValueError, match="codebook"):
        triton_dequant(q, z, s, None, 4, codebook=NF4_TABLE[:8].to(DEVICE))
    with pytest.raises(ValueError, match="powers of two"):
        triton_dequant(q, z, s, None, 4, block_n=48)


def test_import_without_triton_is_safe():
    """The module imports and reports availability whether or not triton is installed."""
    assert isinstance(triton_available(), bool)
    if not triton_available():
        L = _layer(32, 128, 4, 32)
        with pytest.raises(RuntimeError, match="triton"):
            triton_dequant(L["qweight"], L["zeros"], L["scales"], None, 4)


@needs_triton
def test_bf16_rounding_edge_cases():
    """Codes 1, zeros 0 make W = scale, so the bf16 output must be torch's own fp32 -> bf16 cast (round to nearest
    even, overflow to inf, NaN kept) of awkward fp32 values: exact ties, carries into the exponent, +-0, inf.
    (fp32 subnormal scales are left out: a GPU may flush them to zero in the multiply, and real scales never are.)"""
    words = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3F7FFFFF, 0x7F7FFFFF, 0x7F7F7FFF, 0x00808000,
                          0x00818000, 0x80000000, 0xBF808000, 0xBFFFFFFF, 0x7F800000, 0xFF800000, 0x7FC00000,
                          0x3DCCCCCD, 0x0], dtype=torch.int64)
    vals = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(torch.float32)
    N = vals.numel()
    qweight = pack_rows(torch.ones(32, N, dtype=torch.int64), 4)
    zeros = torch.zeros(1, N, dtype=torch.int16)
    out = triton_dequant(qweight.to(DEVICE), zeros.to(DEVICE), vals.view(1, N).to(DEVICE), None, 4,
                         dtype=torch.bfloat16).cpu()
    want = vals.to(torch.bfloat16).view(N, 1).expand(N, 32)
    same = (out.view(torch.int16) == want.view(torch.int16)) | (out.isnan() & want.isnan())
    assert bool(same.all()), [(hex(int(w)), float(o), float(e)) for w, o, e in zip(words, out[:, 0], want[:, 0])]


@needs_triton
def test_quantlinear_triton_backend_with_chunk_scales():
    """QuantLinear's triton path (the CUDA default) equals the reference, per chunk of scales."""
    from quant.linear import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 64, bias=True), 4, 32).to(DEVICE)
    layer.backend = "triton"
    s = layer.scales
    sets = [s * 1.01, s * 0.99]
    layer.chunk_scales = sets
    x = torch.randn(4, 3, 128, device=DEVICE)
    y = layer(x)
    for xi, si, yi in zip(x.split(2), sets, y.split(2)):
        w = dequant_reference(layer.qweight.cpu(), layer.zeros.cpu(), si.cpu(), layer.g_idx.cpu(), 4)
        ref = xi.double().cpu() @ w.t() + layer.bias.double().cpu()
        assert (yi.double().cpu() - ref).abs().max().item() < 1e-5
