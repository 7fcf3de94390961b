"""GPTQ packing against an independent numpy packer written from the format description (the layout in quant/format.py)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.format import (QuantConfig, convert_qzeros, default_g_idx, pack_cols, pack_rows, pack_zeros, unpack_cols,
                          unpack_rows, unpack_zeros)
from quant.rtn import quantize_rtn


# ---- the independent reference: one value at a time, uint32 words, no shared code -----------------------------------
def np_pack_qweight(q: np.ndarray, bits: int) -> np.ndarray:
    """q [K, N] -> uint32 [K*bits/32, N]: q[k, n] goes to word k // (32/bits), bit offset bits * (k % (32/bits))."""
    per = 32 // bits
    K, N = q.shape
    out = np.zeros((K // per, N), dtype=np.uint64)
    for k in range(K):
        out[k // per] |= q[k].astype(np.uint64) << np.uint64(bits * (k % per))
    return out.astype(np.uint32)


def np_pack_qzeros(z: np.ndarray, bits: int, v1: bool) -> np.ndarray:
    """true zeros [G, N] -> uint32 [G, N*bits/32]; v1 stores zero - 1 as a word subtraction of 0x11..1."""
    per = 32 // bits
    G, N = z.shape
    out = np.zeros((G, N // per), dtype=np.uint64)
    for n in range(N):
        out[:, n // per] |= z[:, n].astype(np.uint64) << np.uint64(bits * (n % per))
    if v1:
        ones = sum(1 << (bits * i) for i in range(per))
        out = (out + np.uint64(2**32) - np.uint64(ones)) % np.uint64(2**32)
    return out.astype(np.uint32)


def as_u32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_pack_matches_numpy_reference(bits, group_size, sym, fmt):
    torch.manual_seed(bits * 1000 + group_size)
    N, K = 64, 256
    w = torch.randn(N, K) * 0.02
    codes, zeros, scales = quantize_rtn(w, bits, group_size, sym)
    qweight = pack_rows(codes, bits)
    qzeros = pack_zeros(zeros, bits, fmt)
    assert qweight.dtype == torch.int32 and qweight.shape == (K * bits // 32, N)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (K // (K if group_size == -1 else group_size), N * bits // 32)
    np.testing.assert_array_equal(as_u32(qweight), np_pack_qweight(codes.numpy(), bits))
    np.testing.assert_array_equal(as_u32(qzeros), np_pack_qzeros(zeros.numpy(), bits, v1=fmt == "gptq"))
    assert torch.equal(unpack_rows(qweight, bits), codes)
    assert torch.equal(unpack_zeros(qzeros, bits, fmt), zeros)


def test_symmetric_zero_words():
    """Symmetric 4-bit: every qzeros word is 0x77777777 in v1 and 0x88888888 in v2 (REFERENCE.md)."""
    _, zeros, _ = quantize_rtn(torch.randn(32, 128), 4, 64, sym=True)
    assert (as_u32(pack_zeros(zeros, 4, "gptq")) == 0x77777777).all()
    assert (as_u32(pack_zeros(zeros, 4, "gptq_v2")) == 0x88888888).all()


def test_v1_zero_of_zero_borrows_and_round_trips():
    """A true zero of 0 cannot be one nibble of zero-1; v1 is a word subtraction, so it borrows and comes back."""
    z = torch.tensor([[0, 5, 0, 15, 1, 0, 7, 0]], dtype=torch.int16)
    packed = pack_zeros(z, 4, "gptq")
    assert as_u32(packed)[0, 0] == np_pack_qzeros(z.numpy(), 4, v1=True)[0, 0]
    assert torch.equal(unpack_zeros(packed, 4, "gptq"), z)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    k_words=st.integers(1, 6),
    n_words=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_property(bits, k_words, n_words, seed):
    per = 32 // bits
    K, N = k_words * per, n_words * per
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32).to(torch.uint8)
    z = torch.randint(0, 2**bits, (max(1, k_words // 2), N), generator=g).to(torch.int16)
    packed = pack_rows(q, bits)
    np.testing.assert_array_equal(as_u32(packed), np_pack_qweight(q.numpy(), bits))
    assert torch.equal(unpack_rows(packed, bits), q)
    assert torch.equal(unpack_cols(pack_cols(z, bits), bits), z)
    for fmt in ("gptq", "gptq_v2"):
        np.testing.assert_array_equal(as_u32(pack_zeros(z, bits, fmt)), np_pack_qzeros(z.numpy(), bits, fmt == "gptq"))
        assert torch.equal(unpack_zeros(pack_zeros(z, bits, fmt), bits, fmt), z)
    v1 = pack_zeros(z, bits, "gptq")
    v2 = convert_qzeros(v1, bits, "gptq", "gptq_v2")
    assert torch.equal(v2, pack_zeros(z, bits, "gptq_v2"))
    assert torch.equal(convert_qzeros(v2, bits, "gptq_v2", "gptq"), v1)


def test_default_g_idx():
    assert default_g_idx(8, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert default_g_idx(6, -1).tolist() == [0] * 6


def test_quant_config_round_trip_and_validation():
    cfg = QuantConfig(bits=8, group_size=-1, sym=False, checkpoint_format="gptq_v2")
    d = cfg.to_dict()
    assert d["quant_method"] == "gptq" and d["checkpoint_format"] == "gptq_v2" and d["bits"] == 8
    assert QuantConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=3)
    with pytest.raises(ValueError, match="group size"):
        QuantConfig(bits=4, group_size=12)
    with pytest.raises(ValueError, match="checkpoint_format"):
        QuantConfig(checkpoint_format="awq")
    with pytest.raises(ValueError, match="in_features"):
        pack_rows(torch.zeros(12, 8, dtype=torch.uint8), 4)
