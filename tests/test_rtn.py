"""RTN quantizer against a float64 per-group loop written from the formulas in quant/rtn.py's docstring."""
import pytest
import torch

from quant.rtn import quantize_rtn


def loop_reference(w: torch.Tensor, bits: int, G: int, sym: bool):
    w = w.double()
    N, K = w.shape
    maxq = 2**bits - 1
    codes = torch.zeros(K, N, dtype=torch.int64)
    zeros = torch.zeros(K // G, N, dtype=torch.int64)
    scales = torch.zeros(K // G, N, dtype=torch.float64)
    for n in range(N):
        for g in range(K // G):
            x = w[n, g * G:(g + 1) * G]
            if sym:
                s = 2 * (float(x.abs().max()) or 1.0) / maxq
                z = 2 ** (bits - 1)
            else:
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                if lo == hi == 0:
                    lo, hi = -1.0, 1.0
                s = (hi - lo) / maxq
                z = round(-lo / s)
            codes[g * G:(g + 1) * G, n] = torch.clamp(torch.round(x / s) + z, 0, maxq).long()
            zeros[g, n], scales[g, n] = z, s
    return codes, zeros, scales


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_rtn_matches_loop_reference(bits, sym, group_size):
    torch.manual_seed(bits)
    w = torch.randn(8, 64) * 0.05
    w[1, :32] = w[1, :32].abs()  # an all-positive group (asym zero 0)
    G = 64 if group_size == -1 else group_size
    codes, zeros, scales = quantize_rtn(w, bits, group_size, sym)
    rc, rz, rs = loop_reference(w, bits, G, sym)
    torch.testing.assert_close(scales.double(), rs, rtol=1e-6, atol=0)
    assert torch.equal(zeros.long(), rz)
    # codes may differ only where w/s sits within float rounding of a .5 tie
    assert (codes.long() - rc).abs().max() <= 1
    assert (codes.long() != rc).float().mean() < 0.01


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_at_most_half_a_step(sym):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    codes, zeros, scales = quantize_rtn(w, 4, 32, sym)
    g = torch.arange(128) // 32
    w_hat = (scales[g] * (codes.float() - zeros[g].float())).t()
    step = scales[g].t()
    assert ((w - w_hat).abs() <= step / 2 + 1e-6).all()  # holds for the clipped +max|w| too: 7.5 steps -> 7


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_all_zero_group_dequantizes_to_zero(sym):
    w = torch.randn(4, 64)
    w[2, :32] = 0.0
    codes, zeros, scales = quantize_rtn(w, 4, 32, sym)
    assert (scales > 0).all()
    assert torch.equal(codes[:32, 2].long(), zeros[0, 2].long().expand(32))


def test_rtn_rejects_bad_group():
    with pytest.raises(ValueError, match="divisible"):
        quantize_rtn(torch.randn(4, 96), 4, 64)
