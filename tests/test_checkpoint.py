"""quantize -> directory -> load_quantized, against a plain HF model holding the float64-reference weights."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FAMILIES, build_model, input_ids
from quant import kernels
from quant.checkpoint import CheckpointError, atomic_dir, load_quantized, open_source, quantize
from quant.format import QuantConfig, unpack_zeros
from quant.linear import QuantLinear


def read_all(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reference_model(qdir, family, vocab_size):
    """A stock HF model whose Linear weights are dequantized from the files by the float64 reference."""
    cfg = json.loads((qdir / "config.json").read_text())["quantization_config"]
    qc = QuantConfig.from_dict(cfg)
    tensors = read_all(qdir)
    state = {}
    for name, t in tensors.items():
        mod, _, suffix = name.rpartition(".")
        if suffix == "qweight":
            zeros = unpack_zeros(tensors[f"{mod}.qzeros"], qc.bits, qc.checkpoint_format)
            w = kernels.dequant_reference(t, zeros, tensors[f"{mod}.scales"].float(), tensors[f"{mod}.g_idx"], qc.bits)
            state[f"{mod}.weight"] = w.float()
        elif suffix not in ("qzeros", "scales", "g_idx"):
            state[name] = t.float()
    model = build_model(family, vocab_size=vocab_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    return model.eval()


def run_quantize(src, dst, **kw):
    cfg = QuantConfig(**{k: v for k, v in kw.items() if k in QuantConfig.__dataclass_fields__})
    extra = {k: v for k, v in kw.items() if k not in QuantConfig.__dataclass_fields__}
    with atomic_dir(dst) as tmp:
        report = quantize(open_source(src), tmp, cfg, progress=False, **extra)
    return report


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_forward_equals_reference_dequant(family, make_model_dir, tmp_path):
    src, model = make_model_dir(family)
    dst = tmp_path / "q"
    report = run_quantize(src, dst, bits=4, group_size=32)
    qmodel = load_quantized(dst, dtype=torch.float32, backend="torch")
    n_linear = sum(isinstance(m, QuantLinear) for m in qmodel.modules())
    assert n_linear == (7 if family != "opt" else 6) * 2 and report.quantized_parameters > 0
    ref = reference_model(dst, family, model.config.vocab_size)
    ids = input_ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        got, want, orig = qmodel(ids).logits, ref(ids).logits, model(ids).logits
    # same fp32 weights (s*(q-z) is correctly rounded either way) and the same stock code: bitwise equal
    assert torch.equal(got, want)
    # and the quantized model is still close to the original (4-bit g32 on random weights)
    assert (got - orig).abs().max() < 0.25 * orig.abs().max()


@pytest.mark.parametrize("bits,group_size,sym,fmt", [(8, -1, True, "gptq"), (4, 64, False, "gptq"),
                                                     (4, 128, False, "gptq_v2"), (2, 32, False, "gptq")])
def test_formats_round_trip(bits, group_size, sym, fmt, make_model_dir, tmp_path):
    src, model = make_model_dir("llama")
    dst = tmp_path / "q"
    run_quantize(src, dst, bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt)
    qc = json.loads((dst / "quantize_config.json").read_text())
    assert qc == json.loads((dst / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"], qc["quant_method"]) == \
        (bits, group_size, sym, fmt, "gptq")
    qmodel = load_quantized(dst, backend="torch")
    ref = reference_model(dst, "llama", model.config.vocab_size)
    ids = input_ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(qmodel(ids).logits, ref(ids).logits)


def test_layout_dtypes_tokenizer_and_config(make_model_dir, tmp_path):
    src, model = make_model_dir("opt")
    dst = tmp_path / "q"
    run_quantize(src, dst, bits=4, group_size=64)
    t = read_all(dst)
    p = "model.decoder.layers.0.self_attn.q_proj"
    assert t[f"{p}.qweight"].dtype == torch.int32 and t[f"{p}.qweight"].shape == (128 * 4 // 32, 128)
    assert t[f"{p}.qzeros"].dtype == torch.int32 and t[f"{p}.qzeros"].shape == (2, 16)
    assert t[f"{p}.scales"].dtype == torch.float16 and t[f"{p}.scales"].shape == (2, 128)
    assert t[f"{p}.g_idx"].dtype == torch.int32 and t[f"{p}.g_idx"].tolist() == [k // 64 for k in range(128)]
    assert t[f"{p}.bias"].dtype == torch.float16
    assert f"{p}.weight" not in t
    assert t["model.decoder.embed_tokens.weight"].dtype == torch.bfloat16  # non-quantized tensors kept in bf16
    assert t["lm_head.weight"].dtype == torch.bfloat16  # lm_head sits outside the decoder blocks: not quantized
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "opt" and cfg["quantization_config"]["block_name_to_quantize"] == "model.decoder.layers"
    assert (dst / "tokenizer.json").exists() and (dst / "tokenizer_config.json").exists()


def test_shards_and_index(make_model_dir, tmp_path):
    src, model = make_model_dir("llama")
    dst = tmp_path / "q"
    run_quantize(src, dst, bits=4, group_size=32, max_shard_bytes=40_000)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(dst.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    for s in shards:
        with safe_open(str(s), "pt") as h:
            assert all(index["weight_map"][k] == s.name for k in h.keys())
    assert not list(dst.glob("*.tmp"))
    one = tmp_path / "one"
    run_quantize(src, one, bits=4, group_size=32)
    ids = input_ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(load_quantized(dst)(ids).logits, load_quantized(one)(ids).logits)


def test_skip_keeps_layers_in_bf16_and_tells_loaders(make_model_dir, tmp_path):
    src, model = make_model_dir("llama")
    dst = tmp_path / "q"
    run_quantize(src, dst, bits=4, group_size=32, skip=[r"mlp\.down_proj"])
    t = read_all(dst)
    assert "model.layers.1.mlp.down_proj.weight" in t and "model.layers.1.mlp.down_proj.qweight" not in t
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert sorted(qc["modules_in_block_to_quantize"][0]) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"])
    qmodel = load_quantized(dst)
    assert isinstance(qmodel.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(qmodel.model.layers[0].mlp.up_proj, QuantLinear)


def test_tied_embeddings(tmp_path, tokenizer):
    model = build_model("llama", vocab_size=len(tokenizer) + 20, tie_word_embeddings=True)
    src = tmp_path / "src"
    model.save_pretrained(src)
    dst = tmp_path / "q"
    run_quantize(src, dst, bits=8, group_size=32)
    qmodel = load_quantized(dst)
    assert qmodel.lm_head.weight.data_ptr() == qmodel.model.embed_tokens.weight.data_ptr()


def test_reconstruction_report(make_model_dir, tmp_path):
    src, _ = make_model_dir("llama")
    r4 = run_quantize(src, tmp_path / "q4", bits=4, group_size=32)
    r8 = run_quantize(src, tmp_path / "q8", bits=8, group_size=32)
    e4, e8 = r4.mean_rel_error(), r8.mean_rel_error()
    assert set(e4) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # uniform weights: 4-bit RMS error ~ step/sqrt(12) relative to sigma, 8-bit 16x smaller
    assert all(0.03 < v < 0.2 for v in e4.values()) and all(e8[k] < e4[k] / 10 for k in e4)
    assert r4.bytes_after < r4.bytes_before / 2 and "mean relative reconstruction error" in r4.summary("x")


def test_load_rejects_non_quantized(make_model_dir):
    src, _ = make_model_dir("llama")
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized(src)
