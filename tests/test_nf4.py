"""quant.nf4: agreement with bitsandbytes, nearest-code rounding, checkpoint layout, loading with stock transformers."""
from __future__ import annotations

import json

import pytest
import torch

from quant.nf4 import (
    NF4_TABLE,
    bnb_nf4_table,
    dequant_nf4,
    nf4_from_tensors,
    nf4_quantization_config,
    nf4_tensors,
    pack_nf4,
    quantize_nf4,
    read_quant_state,
    unpack_nf4,
)

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

CASES = [((8, 256), 64), ((5, 512), 128), ((3, 768), 256), ((16, 64), 32), ((2, 4096), 4096)]


def _weight(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[0, :5] = torch.tensor([0.0, -3.0, 3.0, 1e-8, -1e-8])  # exact zero, block extremes, tiny values
    return w.to(dtype)


def test_table_matches_bitsandbytes():
    assert NF4_TABLE.dtype == torch.float32 and NF4_TABLE.shape == (16,)
    assert torch.equal(NF4_TABLE, bnb_nf4_table())
    _, state = BF.quantize_4bit(torch.randn(4, 64), blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(NF4_TABLE, state.code.float())


def test_nibble_order_high_first():
    # -1 -> code 0, +1 -> code 15, 0 -> code 7; bnb puts element 2i in the high nibble.
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1], w[0, 3] = -1.0, 1.0, -1.0
    packed, _ = BF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert packed.shape == (32, 1) and packed.dtype == torch.uint8
    assert packed[:2, 0].tolist() == [0x0F, 0x70]
    codes, _ = quantize_nf4(w, 64)
    assert codes[0, :4].tolist() == [0, 15, 7, 0]
    assert torch.equal(pack_nf4(codes), packed)
    assert torch.equal(unpack_nf4(packed, (1, 64)), codes)


@pytest.mark.parametrize("shape,blocksize", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_matches_bitsandbytes(shape, blocksize, dtype):
    w = _weight(shape, dtype=dtype)
    codes, absmax = quantize_nf4(w, blocksize)
    n, k = shape
    assert codes.shape == (n, k) and codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert absmax.shape == (n, k // blocksize) and absmax.dtype == torch.float32
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    assert torch.equal(dequant_nf4(codes, absmax, state.dtype), BF.dequantize_4bit(packed, state))
    state.dtype = torch.float32  # dequantize_4bit returns quant_state.dtype (the input's); compare in fp32 too
    assert torch.equal(dequant_nf4(codes, absmax), BF.dequantize_4bit(packed, state))  # bit-exact in fp32
    assert torch.equal(absmax.reshape(-1), state.absmax)
    assert dequant_nf4(codes, absmax, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("shape,blocksize", CASES)
def test_quantize_is_nearest_code(shape, blocksize):
    w = _weight(shape, seed=1)
    codes, absmax = quantize_nf4(w, blocksize)
    n, k = shape
    blocks = w.view(n, k // blocksize, blocksize)
    ref_absmax = blocks.abs().amax(-1)
    assert torch.equal(absmax, ref_absmax)
    x = (blocks / ref_absmax.unsqueeze(-1)).reshape(n, k)  # normalized to [-1, 1]
    dist = (x.unsqueeze(-1) - NF4_TABLE).abs()  # [n, k, 16], independent brute force
    chosen = dist.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    # bnb multiplies by 1/absmax and compares with fp32 midpoints, so allow exact/near ties by 1e-6.
    assert (chosen <= dist.min(-1).values + 1e-6).all()
    assert (codes == dist.argmin(-1)).float().mean() > 0.999


def test_zero_block_and_grad():
    w = _weight((4, 128))
    w[1, :64] = 0.0
    codes, absmax = quantize_nf4(w, 64)
    assert absmax[1, 0] == 0 and (codes[1, :64] == 7).all()
    assert (dequant_nf4(codes, absmax)[1, :64] == 0).all()
    a = absmax.clone().requires_grad_(True)  # scales are what qzo2 trains
    dequant_nf4(codes, a).sum().backward()
    assert a.grad.shape == absmax.shape


def test_rejects_bad_blocksize():
    with pytest.raises(ValueError, match="multiple of blocksize"):
        quantize_nf4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="unsupported NF4 blocksize"):
        quantize_nf4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="unsupported NF4 blocksize"):
        nf4_quantization_config(100)
    with pytest.raises(ValueError):
        quantize_nf4(torch.randn(4, 8, 64), 64)


def _bnb_linear4bit_state(w, blocksize):
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16,
                            compress_statistics=False, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.to(torch.bfloat16), requires_grad=False, compress_statistics=False,
                                   quant_type="nf4", blocksize=blocksize).to("cpu")
    assert lin.weight.quant_state is not None
    return lin.state_dict()


@pytest.mark.parametrize("shape,blocksize", CASES[:3])
def test_tensors_match_bnb_linear4bit_state_dict(shape, blocksize):
    w = _weight(shape)
    ref = _bnb_linear4bit_state(w, blocksize)  # what save_pretrained writes for a Linear4bit
    codes, absmax = quantize_nf4(w.to(torch.bfloat16), blocksize)
    ours = nf4_tensors("m.q_proj", codes, absmax, blocksize, dtype="bfloat16")
    assert set(ours) == {f"m.q_proj.{k}" for k in ref}
    assert set(ref) == {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    for k, v in ref.items():
        o = ours[f"m.q_proj.{k}"]
        assert o.dtype == v.dtype and o.shape == v.shape and torch.equal(o, v), k


@pytest.mark.parametrize("shape,blocksize", CASES)
def test_serialization_roundtrip(shape, blocksize):
    codes, absmax = quantize_nf4(_weight(shape, seed=2), blocksize)
    t = nf4_tensors("model.layers.0.mlp.up_proj", codes, absmax, blocksize)
    st = read_quant_state("model.layers.0.mlp.up_proj", t)
    assert st == {"quant_type": "nf4", "blocksize": blocksize, "dtype": "bfloat16", "shape": list(shape)}
    c2, a2, bs2, shape2 = nf4_from_tensors("model.layers.0.mlp.up_proj", t)
    assert torch.equal(c2, codes) and torch.equal(a2, absmax) and bs2 == blocksize and shape2 == shape
    # bnb's own parser agrees
    qs = BF.QuantState.from_dict({k.split("up_proj.weight.")[-1]: v for k, v in t.items() if ".weight." in k},
                                 device=torch.device("cpu"))
    assert qs.dtype == torch.bfloat16 and qs.blocksize == blocksize and tuple(qs.shape) == shape
    ref = BF.dequantize_4bit(t["model.layers.0.mlp.up_proj.weight"], qs)
    assert torch.equal(ref, dequant_nf4(codes, absmax, torch.bfloat16))


def test_from_tensors_rejects_double_quant():
    w = _weight((4, 256))
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    t = {f"p.{k}": v for k, v in _prefixed(state.as_dict(packed=True)).items()}
    t["p.weight"] = packed
    with pytest.raises(ValueError, match="double-quantized"):
        nf4_from_tensors("p", t)


def _prefixed(d):
    return {f"weight.{k}": v for k, v in d.items()}


def test_quantization_config_is_bitsandbytes_config():
    transformers = pytest.importorskip("transformers")
    cfg = nf4_quantization_config(64)
    ref = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype="bfloat16").to_dict()
    assert cfg == ref
    assert transformers.BitsAndBytesConfig.from_dict(cfg).to_dict() == ref


# ---- end to end: stock transformers loads the checkpoint on CPU -------------------------------------------------

E2E_BLOCKSIZES = {
    "bs64": lambda name, k: 64,
    "mixed": lambda name, k: 256 if k % 256 == 0 else 32,  # down_proj (K=256) at 256, the rest at 32
}


@pytest.mark.parametrize("plan", list(E2E_BLOCKSIZES))
def test_stock_transformers_loads_checkpoint(tmp_path, plan):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=256, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.load_state_dict(model.state_dict())
    quantized = {n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    assert len(quantized) == 14
    tensors, used = {}, set()
    for key, value in model.state_dict().items():
        name = key.rsplit(".", 1)[0]
        if name in quantized and key.endswith(".weight"):
            bs = E2E_BLOCKSIZES[plan](name, value.shape[1])
            used.add(bs)
            codes, absmax = quantize_nf4(value, bs)
            tensors.update(nf4_tensors(name, codes, absmax, bs))
            ref.get_submodule(name).weight.data = dequant_nf4(codes, absmax)
        else:
            tensors[key] = value.contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["quantization_config"] = nf4_quantization_config(64, compute_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, device_map="cpu", output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    lin4 = [m for m in loaded.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(lin4) == 14  # lm_head stays a plain Linear (transformers' default skip)
    assert {m.weight.quant_state.blocksize for m in lin4} == used  # per-tensor blocksize is honoured
    sd = loaded.state_dict()  # what its save_pretrained would write: identical to our tensors
    for key in tensors:
        if key.startswith("model.layers.0.mlp.down_proj"):
            assert torch.equal(sd[key], tensors[key]), key

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded(ids).logits, ref(ids).logits
    # compute_dtype=float32 + dtype=float32: the generic bnb CPU path dequantizes with the same fp32 product
    # absmax * code and runs F.linear in fp32, so logits agree to fp32 round-off (in practice bit-exact).
    # On CPUs with AVX512-BF16, bnb repacks the weight for its fused kernel at eval time and computes with bf16
    # activations and bf16 absmax (~3 significant digits), hence the loose tolerance there.
    from bitsandbytes.nn.modules import has_avx512bf16

    tol = 5e-2 if has_avx512bf16() else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
