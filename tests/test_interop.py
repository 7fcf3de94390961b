"""Interop with the stock stack: our checkpoints in transformers + optimum + gptqmodel, gptqmodel's in qzo2.

The stock side is tests/stock.py: transformers' GPTQ loader with gptqmodel's pure-torch kernel, whose forward
rebuilds W = scales[g_idx] * (q - zero) from the stored tensors. With fp32 scales both sides build the same fp32
weight (one correctly rounded multiply), so what remains is GEMM accumulation order: we allow 1e-4 relative to
the logits' scale (fp32 accumulation over K <= 256 terms gives ~1e-6; the margin is for differing kernels).
"""
import json

import pytest
import torch

from conftest import input_ids
from quant.checkpoint import atomic_dir, load_quantized, open_source, quantize
from quant.format import QuantConfig
from stock import gptqmodel_available, load_gptq_with_transformers

pytestmark = pytest.mark.skipif(not gptqmodel_available(), reason="needs the gptq extra (gptqmodel + optimum)")


def close(a, b, rel=1e-4):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("family,bits,group_size,sym,fmt", [
    ("llama", 4, 32, True, "gptq"),
    ("qwen2", 4, 64, False, "gptq"),
    ("mistral", 8, 128, True, "gptq_v2"),
    ("opt", 4, 128, False, "gptq_v2"),
])
def test_our_checkpoint_loads_in_stock_transformers(family, bits, group_size, sym, fmt, make_model_dir, tmp_path):
    src, model = make_model_dir(family)
    dst = tmp_path / "q"
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt)
    with atomic_dir(dst) as tmp:
        quantize(open_source(src), tmp, cfg, progress=False)
    stock = load_gptq_with_transformers(str(dst), fp32_scales=True)
    ours = load_quantized(dst, backend="torch")
    ids = input_ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        a, b = ours(ids).logits, stock(ids).logits
    assert close(a, b), (a - b).abs().max()


@pytest.fixture(scope="module")
def hamlet_like_text():
    from conftest import TEXT

    return TEXT * 20


@pytest.mark.parametrize("sym,desc_act", [(True, False), (False, True)])
def test_gptqmodel_checkpoint_loads_in_qzo2(sym, desc_act, make_model_dir, tmp_path, hamlet_like_text):
    from quant.gptq import quantize_with_gptqmodel

    src, model = make_model_dir("llama")
    out = tmp_path / "gptqmodel-out"
    quantize_with_gptqmodel(str(src), str(out), bits=4, group_size=32, sym=sym, desc_act=desc_act,
                            calib_texts=[hamlet_like_text], nsamples=8, seqlen=64)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["desc_act"] == desc_act and qc["sym"] == sym
    ours = load_quantized(out, backend="torch")
    if desc_act:
        assert any(getattr(m, "act_order", False) for m in ours.modules())
    stock = load_gptq_with_transformers(str(out), fp32_scales=True)
    ids = input_ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        a, b = ours(ids).logits, stock(ids).logits
    assert close(a, b), (a - b).abs().max()


def test_gptq_method_rewrites_gptqmodel_codes(make_model_dir, tmp_path, hamlet_like_text):
    """`--method gptq --format gptq_v2`: gptqmodel's codes re-encoded as v2, identical weights, loads everywhere."""
    src, model = make_model_dir("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(hamlet_like_text)
    dst = tmp_path / "q"
    cfg = QuantConfig(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2", method="gptq")
    with atomic_dir(dst) as tmp:
        report = quantize(open_source(src), tmp, cfg, calib=calib, nsamples=8, seqlen=64, progress=False)
    assert json.loads((dst / "quantize_config.json").read_text())["meta"]["method"] == "gptq"
    rtn = tmp_path / "rtn"
    with atomic_dir(rtn) as tmp:
        rtn_report = quantize(open_source(src), tmp, QuantConfig(bits=4, group_size=32, sym=False), progress=False)
    # GPTQ minimizes output error, not weight error, so only sanity-check the weight error against RTN's
    assert max(report.mean_rel_error().values()) < 2 * max(rtn_report.mean_rel_error().values())
    ours = load_quantized(dst, backend="torch")
    stock = load_gptq_with_transformers(str(dst), fp32_scales=True)
    ids = input_ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        assert close(ours(ids).logits, stock(ids).logits)
