"""Every fast path against the one float64 reference, on fresh random inputs; QuantLinear's chunked scales."""
import pytest
import torch

from quant import kernels
from quant.format import pack_rows
from quant.linear import QuantLinear
from quant.nf4 import NF4_TABLE


def random_layer(bits, N, K, G, act_order=False, codebook=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (K, N), generator=g).to(torch.uint8)
    n_groups = K // G
    zeros = torch.randint(0, 2**bits, (n_groups, N), generator=g).to(torch.int16)
    if codebook is not None:
        zeros.zero_()
    scales = torch.rand(n_groups, N, generator=g) * 0.01 + 1e-3
    g_idx = torch.arange(K, dtype=torch.int32) // G
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return pack_rows(q, bits), zeros, scales, g_idx


def naive_reference(qweight, zeros, scales, g_idx, bits, codebook=None):
    """Element by element, straight from the format description, for a second opinion on dequant_reference."""
    per = 32 // bits
    K, N = qweight.shape[0] * per, qweight.shape[1]
    w = torch.zeros(N, K, dtype=torch.float64)
    for k in range(K):
        q = (qweight[k // per].long() >> (bits * (k % per))) & (2**bits - 1)
        v = q.double() if codebook is None else codebook.double()[q]
        g = int(g_idx[k])
        w[:, k] = scales[g].double() * (v - zeros[g].double())
    return w


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_reference_matches_naive_loop(bits, act_order):
    qw, z, s, gi = random_layer(bits, 16, 64, 32, act_order, seed=bits)
    torch.testing.assert_close(kernels.dequant_reference(qw, z, s, gi, bits), naive_reference(qw, z, s, gi, bits),
                               rtol=0, atol=0)


def test_reference_with_codebook_matches_naive_loop():
    qw, z, s, gi = random_layer(4, 16, 64, 32, codebook=NF4_TABLE)
    torch.testing.assert_close(kernels.dequant_reference(qw, z, s, gi, 4, NF4_TABLE),
                               naive_reference(qw, z, s, gi, 4, NF4_TABLE), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("G", [32, 128, 256])
@pytest.mark.parametrize("act_order", [False, True])
def test_torch_dequant_is_exact_in_fp32(bits, G, act_order):
    """s*(q-z) is one fp32 multiply of exact operands: correctly rounded, so equal to the float64 value rounded."""
    qw, z, s, gi = random_layer(bits, 48, 256, G, act_order, seed=G + bits)
    ref = kernels.dequant_reference(qw, z, s, gi, bits)
    got = kernels.dequant(qw, z, s, gi if act_order else None, bits, dtype=torch.float32)
    assert torch.equal(got, ref.float())


def test_torch_dequant_bf16_within_rounding():
    qw, z, s, gi = random_layer(4, 48, 256, 64)
    ref = kernels.dequant_reference(qw, z, s, gi, 4)
    got = kernels.dequant(qw, z, s, None, 4, dtype=torch.bfloat16).double()
    # bf16 keeps 8 significant bits: relative error <= 2^-8 per element (two roundings: scale and product)
    assert ((got - ref).abs() <= ref.abs() * 2**-7 + 1e-12).all()


@pytest.mark.parametrize("G", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4pack_matches_reference(G, dtype):
    qw, z, s, gi = random_layer(4, 64, 512, G, seed=G)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(G))
    ref = x.double() @ kernels.dequant_reference(qw, z, s, gi, 4).t()
    got = kernels.int4pack_linear(x.to(dtype), kernels.int4pack_weight(qw), z, s, G).double()
    # fp32: accumulation order only (K=512 terms of |x*w| ~ 1e-2) -> 1e-4; bf16: inputs and output rounded to bf16
    tol = 1e-4 if dtype == torch.float32 else 3e-2 * ref.abs().max().item()
    assert (got - ref).abs().max().item() < tol


def test_quantlinear_backends_agree_with_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=True)
    layer = QuantLinear.from_linear(lin, 4, 64, sym=False)
    x = torch.randn(3, 7, 256)
    ref = x.double() @ layer.dequantize(dtype=torch.float64).t() + layer.bias.double()
    for backend, dtype, tol in [("torch", torch.float32, 1e-5), ("int4pack", torch.float32, 1e-4),
                                ("auto", torch.bfloat16, 5e-2), ("torch", torch.bfloat16, 5e-2)]:
        layer.backend = backend
        y = layer(x.to(dtype))
        assert y.dtype == dtype and y.shape == (3, 7, 64)
        assert (y.double() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item()), backend
    layer.backend = "auto"
    assert layer.resolved_backend(torch.bfloat16) == "int4pack"  # what auto picks on CPU (README: CPU kernels)
    assert layer.resolved_backend(torch.float32) == "torch"


@pytest.mark.parametrize("backend", ["torch", "int4pack"])
def test_chunk_scales_equal_separate_forwards_without_copying_codes(backend):
    """A batch of m chunks with m scale sets equals m separate forwards, each with its own scales (bitwise)."""
    torch.manual_seed(1)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 32), 4, 32)
    layer.backend = backend
    x = torch.randn(6, 5, 128)
    s = layer.scales
    z = torch.randn_like(s)
    sets = [s + 1e-3 * z, s - 1e-3 * z, s * 1.5]
    ptr = layer.qweight.data_ptr()
    layer.chunk_scales = sets
    y = layer(x)
    layer.chunk_scales = None
    separate = []
    for xi, si in zip(x.split(2), sets):
        single = QuantLinear.from_linear(torch.nn.Linear(128, 32), 4, 32)
        single.load_codes(layer.qweight, layer.zeros, si)
        single.bias, single.backend = layer.bias, backend
        separate.append(single(xi))
    assert torch.equal(y, torch.cat(separate))
    assert layer.qweight.data_ptr() == ptr and torch.equal(layer.scales, s)
    layer.chunk_scales = sets[:2]
    with pytest.raises(ValueError, match="equal scale chunks"):
        layer(torch.randn(3, 128))


def test_quantlinear_act_order_and_codebook_forward():
    qw, z, s, gi = random_layer(4, 32, 128, 32, act_order=True, seed=3)
    layer = QuantLinear(128, 32, 4, 32)
    layer.load_codes(qw, z, s, gi)
    assert layer.act_order and layer.resolved_backend(torch.bfloat16) == "torch"
    x = torch.randn(4, 128)
    assert torch.allclose(layer(x).double(), x.double() @ kernels.dequant_reference(qw, z, s, gi, 4).t(), atol=1e-5)
    qw, z, s, gi = random_layer(4, 32, 128, 64, codebook=NF4_TABLE, seed=4)
    nf4 = QuantLinear(128, 32, 4, 64, codebook=NF4_TABLE)
    nf4.load_codes(qw, z, s)
    ref = x.double() @ kernels.dequant_reference(qw, z, s, gi, 4, NF4_TABLE).t()
    assert torch.allclose(nf4(x).double(), ref, atol=1e-5)


def test_cache_base_gives_identical_outputs_and_is_reset_by_new_codes():
    torch.manual_seed(2)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 32), 4, 32)
    layer.backend = "torch"
    x = torch.randn(4, 128)
    plain = layer(x)
    layer.cache_base = True
    assert torch.equal(layer(x), plain) and layer._cached_base is not None
    assert torch.equal(layer(x), plain)  # served from the cache
    other = QuantLinear.from_linear(torch.nn.Linear(128, 32), 4, 32)
    layer.load_codes(other.qweight, other.zeros, other.scales)
    layer.bias = other.bias
    assert layer._cached_base is None
    other.backend = "torch"
    assert torch.equal(layer(x), other(x))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_workspace_path_is_bit_identical_to_fresh_tensors_and_reuses_its_buffers(bits):
    """The CPU workspace path (q − z unpacked into a reused buffer, the scaled weight and the weight gradient into
    others) gives the very outputs and gradients of the allocating path (same values, same memory layout, same
    GEMMs), and a second layer of another shape reuses the same buffers once they are large enough."""
    torch.manual_seed(3)
    qw, z, s, _ = random_layer(bits, 48, 256, 64, seed=5)
    layer = QuantLinear(256, 48, bits, 64, bias=True)
    layer.load_codes(qw, z, s)
    layer.bias = torch.randn(48)
    layer.backend = "torch"
    x = torch.randn(3, 7, 256)
    kernels.WORKSPACE.clear()
    fresh_base = kernels.codes_minus_zeros(qw, z, None, bits)  # no workspace: fresh tensors, as before
    assert torch.equal(kernels.codes_minus_zeros(qw, z, None, bits, workspace=kernels.WORKSPACE), fresh_base)
    sets = [s * 1.01, s * 0.99]
    layer.chunk_scales = sets
    y = layer(x[:2])
    layer.chunk_scales = None
    want = torch.cat([torch.nn.functional.linear(xi, kernels.apply_scales(fresh_base, si, None), layer.bias)
                      for xi, si in zip(x[:2].split(1), sets)])
    assert torch.equal(y, want)
    # backward: dx and ds equal the formulas on freshly allocated tensors
    scales = s.clone().requires_grad_(True)
    layer.scales = scales
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(3, 7, 48)
    (layer(xg) * dy).sum().backward()
    w = kernels.apply_scales(fresh_base, s, None)
    dy2, x2 = dy.reshape(-1, 48), x.reshape(-1, 256)
    assert torch.equal(xg.grad, (dy2 @ w).reshape(x.shape))
    ds = ((dy2.t() @ x2) * fresh_base).view(48, 4, 64).sum(-1).t()
    assert torch.equal(scales.grad, ds)
    # the buffers are reused: a smaller layer takes views of the same storage
    ptrs = {k: b.data_ptr() for k, b in kernels.WORKSPACE.buffers.items()}
    small = QuantLinear.from_linear(torch.nn.Linear(128, 32), bits, 64)
    small.backend = "torch"
    small(torch.randn(2, 128))
    assert {k: b.data_ptr() for k, b in kernels.WORKSPACE.buffers.items()} == ptrs


def test_workspace_keeps_no_fake_tensor():
    """Under fake tensors (qzo2.simulate) the workspace hands out fresh tensors and keeps none: a kept fake buffer
    would poison every later real call."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    layer = QuantLinear.from_linear(torch.nn.Linear(128, 32), 4, 32)
    layer.backend = "torch"
    layer._g_idx_or_none()  # settled on real tensors (a data-dependent check)
    kernels.WORKSPACE.clear()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = layer(mode.from_tensor(torch.randn(2, 128)))
    assert isinstance(y, FakeTensor) and kernels.WORKSPACE.buffers == {}
    real = QuantLinear.from_linear(torch.nn.Linear(128, 32), 4, 32)
    real.backend = "torch"
    real(torch.randn(2, 128))
    assert kernels.WORKSPACE.buffers and not any(isinstance(b, FakeTensor) for b in kernels.WORKSPACE.buffers.values())


@pytest.mark.parametrize("K,block", [(256, 64), (200, 64), (37, 8), (5, 64)])
def test_mul_transposed_is_bit_identical_to_mul(K, block):
    """The blocked multiply the scale gradient uses (dW ⊙ (q − z), q − z stored [K, N]) equals one `mul_`, bit for
    bit, for widths that are and are not a multiple of the block, and leaves the transposed operand untouched."""
    torch.manual_seed(K)
    out, other = torch.randn(48, K), torch.randn(K, 48).t()
    assert other.stride() == (1, 48)
    keep = other.clone()
    want = out.clone().mul_(other)
    assert torch.equal(kernels.mul_transposed_(out, other, block, min_numel=0), want)  # the blocked loop
    assert torch.equal(other, keep)


def test_scale_gradient_of_a_large_layer_takes_the_blocked_multiply_and_stays_exact():
    """A layer of 1M weights (where backward multiplies dW by q − z in column blocks) gives the scale gradient of the
    one-`mul_` formula bit for bit, and the input gradient unchanged."""
    torch.manual_seed(4)
    n = k = 1024
    layer = QuantLinear.from_linear(torch.nn.Linear(k, n), 4, 64)
    layer.backend = "torch"
    base = kernels.codes_minus_zeros(layer.qweight, layer.zeros, None, 4)
    assert base.numel() >= 1 << 20 and base.stride() == (1, n)  # the blocked path's case
    s = layer.scales.detach().clone()
    layer.scales = s.clone().requires_grad_(True)
    x = torch.randn(5, k, requires_grad=True)
    dy = torch.randn(5, n)
    (layer(x) * dy).sum().backward()
    want = ((dy.t() @ x.detach()) * base).view(n, k // 64, 64).sum(-1).t()
    assert torch.equal(layer.scales.grad, want)
    assert torch.equal(x.grad, dy @ kernels.apply_scales(base, s, None))
