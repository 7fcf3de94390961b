"""GGUF export and import: the quantized Linears as Q4_0 / Q4_1 / Q8_0 blocks built from the codes and trained scales,
checked against llama.cpp's own Python (gguf's reader and `gguf.quants.dequantize`), against the GPTQ export of the
same run decoded independently in numpy, and against transformers' GGUF loader (logits and greedy text)."""
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from conftest import TEXT, build_model
from quant.checkpoint import atomic_dir, open_source, quantize
from quant.format import QuantConfig
from quant.gguf import NotExact, decode, encode, exact_type, permute_rows, unpermute_rows
from quant.rtn import quantize_rtn
from qzo2 import trainer
from qzo2.api import quantize as api_quantize
from qzo2.cli import main
from qzo2.config import TrainConfig
from qzo2.export_gguf import modelfile
from qzo2.exporter import export

GRIDS = {"q4_0": QuantConfig(bits=4, group_size=32), "q8_0": QuantConfig(bits=8, group_size=32),
         "q4_1": QuantConfig(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")}


# ---- the block codec ---------------------------------------------------------------------------------------------------
def _reference(codes, zeros, scales16, group):
    """float64 W = s · (q − z) as [N, K]."""
    s = scales16.double().repeat_interleave(group, 0)
    z = zeros.double().repeat_interleave(group, 0)
    return (s * (codes.double() - z)).t().numpy()


@pytest.mark.parametrize("qtype,bits,sym,group", [("q4_0", 4, True, 32), ("q4_0", 4, True, 64), ("q8_0", 8, True, 32),
                                                  ("q8_0", 8, True, 128), ("q4_1", 4, False, 32)])
def test_blocks_decode_in_gguf_to_the_grid(qtype, bits, sym, group):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    codes, zeros, scales = quantize_rtn(w, bits, group, sym)
    s16 = scales.half()
    raw, err = encode(codes, zeros, s16, group, qtype)
    got = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype.upper()]).astype(np.float64)
    ref = _reference(codes, zeros, s16, group)
    if qtype == "q4_1":  # m = −s·z is rounded to fp16: within half an fp16 ulp of the largest |m|
        m = (s16.double() * zeros.double()).abs().max().item()
        assert 0 < err <= np.spacing(np.float16(m)) / 2
        assert np.abs(got - ref).max() <= err * 1.001
    else:
        assert err == 0 and np.array_equal(got, ref)
    if qtype != "q4_1" and group == 32:  # and back to the very codes, zero points and fp16 scales
        c2, z2, s2 = decode(raw, qtype)
        assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.equal(s2, s16)


def test_grids_without_an_exact_block_type_are_refused():
    assert exact_type(4, True, 128, 256) == "q4_0" and exact_type(8, True, 32, 64) == "q8_0"
    for args, why in [((2, True, 32, 64), "2-bit"), ((8, False, 32, 64), "8-bit asymmetric"),
                      ((4, True, 16, 64), "group size 16"), ((4, True, 32, 64, True), "act-order"),
                      ((4, True, 32, 64, False, True), "NF4")]:
        with pytest.raises(NotExact, match=why):
            exact_type(*args)
    codes, zeros, scales = quantize_rtn(torch.randn(4, 64), 4, 32, sym=False)
    with pytest.raises(NotExact, match="zero point to be 8"):
        encode(codes, zeros, scales.half(), 32, "q4_0")
    with pytest.raises(NotExact, match="Q4_1"):
        decode(np.zeros((4, 40), np.uint8), "q4_1")


def test_permutation_is_llama_cpps_and_inverts():
    """permute_rows is what transformers' GGUF loader undoes for llama q/k (an independent implementation)."""
    w = np.arange(32 * 6, dtype=np.float32).reshape(32, 6)
    for heads in (4, 2):
        p = permute_rows(w, heads)
        assert not np.array_equal(p, w)
        assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(p, heads, heads), w)
        assert np.array_equal(unpermute_rows(p, heads), w)


# ---- export of trained runs ---------------------------------------------------------------------------------------------
def _train(tmp, model_dir, steps=4):
    words = TEXT.split()
    rows = [{"prompt": " ".join(words[i:i + 4]), "completion": " " + " ".join(words[i + 4:i + 8])}
            for i in range(0, 32, 8)]
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp / "run"
    trainer.train(TrainConfig(model=str(model_dir), method="adalomo", task="", train_file=str(data), steps=steps,
                              batch_size=4, lr=2e-2, max_length=32, eval_every=0, save_every=steps, log_every=steps,
                              output_dir=str(run), progress=False))
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """For (family, grid): the quantized dir, an AdaLomo run on it, its gptq_v2, hf (fp32) and gguf exports, and
    hf16: the gptq_v2 export merged into fp32 weights."""
    cache = {}

    def get(family, qtype):
        if (family, qtype) not in cache:
            tmp = tmp_path_factory.mktemp(f"gguf-{family}-{qtype}")
            src = tmp / "src"
            build_model(family, vocab_size=len(tokenizer) + 20).save_pretrained(src)
            tokenizer.save_pretrained(src)
            with atomic_dir(tmp / "q") as d:
                quantize(open_source(src), d, GRIDS[qtype], progress=False)
            run = _train(tmp, tmp / "q")
            out = dict(q=tmp / "q", run=run)
            for fmt, dtype in (("gptq_v2", None), ("hf", "fp32"), ("gguf", None)):
                out[fmt] = tmp / fmt
                out[f"{fmt}-report"] = export(str(run), str(tmp / fmt), fmt=fmt, dtype=dtype)
            out["hf16"] = tmp / "hf16"  # the GPTQ export merged: the trained scales as fp16, as the GGUF holds them
            export(str(tmp / "gptq_v2"), str(tmp / "hf16"), fmt="hf", dtype="fp32")
            cache[family, qtype] = out
        return cache[family, qtype]

    return get


def _unpack_np(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Independent numpy unpacker of GPTQ int32 words (lowest bits first) along `axis`."""
    per = 32 // bits
    u = words.astype(np.int64) & 0xFFFFFFFF
    fields = np.stack([(u >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], axis=axis + 1)
    shape = list(words.shape)
    shape[axis] *= per
    return fields.reshape(shape)


@pytest.mark.parametrize("family,qtype", [("llama", "q4_0"), ("llama", "q8_0"), ("qwen2", "q4_0"), ("qwen2", "q8_0"),
                                          ("gemma3", "q4_0"), ("llama", "q4_1")])
def test_gguf_tensors_equal_the_gptq_export_decoded_independently(exported, family, qtype):
    e = exported(family, qtype)
    gptq = load_file(e["gptq_v2"] / "model.safetensors")
    base = load_file(e["q"] / "model.safetensors")
    reader = gguf.GGUFReader(str(e["gguf"] / "model.gguf"))
    stored = {t.name: t for t in reader.tensors}
    config = json.loads((e["q"] / "config.json").read_text())
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == family), config["num_hidden_layers"])
    assert reader.fields["general.architecture"].contents() == family
    bits = GRIDS[qtype].bits
    changed = 0
    for mod in sorted(k[:-len(".qweight")] for k in gptq if k.endswith(".qweight")):
        changed += not torch.equal(gptq[f"{mod}.scales"], base[f"{mod}.scales"])
        q = _unpack_np(gptq[f"{mod}.qweight"].numpy(), bits, 0)  # [K, N]
        z = _unpack_np(gptq[f"{mod}.qzeros"].numpy(), bits, 1)  # [G, N], v2: true zero points
        s = gptq[f"{mod}.scales"].numpy().astype(np.float64)
        ref = (s.repeat(32, 0) * (q - z.repeat(32, 0))).T  # [N, K] float64
        t = stored[names.get_name(f"{mod}.weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == qtype.upper()
        got = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        if family == "llama" and (".q_proj" in mod or ".k_proj" in mod):  # undone as transformers' loader does
            heads = config["num_attention_heads"] if ".q_proj" in mod else config["num_key_value_heads"]
            got = LlamaTensorProcessor()._reverse_permute_weights(got, heads, heads)
        if qtype == "q4_1":
            assert 0 < np.abs(got - ref).max() <= e["gguf-report"].gguf.q4_1_max_error * 1.001 < 1e-3
        else:
            assert np.array_equal(got, ref), mod  # bit for bit: the same fp16 d, the same codes
    assert changed >= 10  # the run moved the scales, so the equality is about the trained ones
    norms = 0
    for name, tensor in base.items():  # the unquantized tensors, as stored
        if name.endswith(("norm.weight", "embed_tokens.weight", "lm_head.weight")):
            t = stored[names.get_name(name, try_suffixes=(".weight",))]
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            # Gemma's norms scale by (1 + w), llama.cpp's gemma3 by w
            shift = 1.0 if family == "gemma3" and name.endswith("norm.weight") else 0.0
            assert torch.equal(got.float(), tensor.float() + shift), name
            norms += name.endswith("norm.weight")
    assert norms == {"gemma3": 13, "qwen2": 5, "llama": 5}[family]  # Gemma 3: 4 per block, q/k norms, final


@pytest.mark.parametrize("family,qtype", [("llama", "q4_0"), ("qwen2", "q8_0"), ("gemma3", "q4_0"), ("llama", "q4_1")])
def test_transformers_loads_the_gguf_with_the_hf_exports_logits(exported, family, qtype):
    """transformers rebuilds the model from our metadata alone; its logits equal the merged GPTQ export's exactly
    (the same fp16 scales), and the run's fp32-scale HF export's up to the fp16 rounding of the scales."""
    e = exported(family, qtype)
    hf16 = AutoModelForCausalLM.from_pretrained(e["hf16"], dtype=torch.float32).eval()
    hf = AutoModelForCausalLM.from_pretrained(e["hf"], dtype=torch.float32).eval()
    gg = AutoModelForCausalLM.from_pretrained(e["gguf"], gguf_file="model.gguf", dtype=torch.float32).eval()
    assert gg.config.model_type == {"gemma3": "gemma3_text"}.get(family, family)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf16(ids).logits, gg(ids).logits
        if qtype == "q4_1":  # the fp16 offsets: close, not equal
            torch.testing.assert_close(b, a, rtol=0, atol=2e-3)
        else:
            assert torch.equal(a, b)
        torch.testing.assert_close(b, hf(ids).logits, rtol=0, atol=5e-3)
        greedy = [m.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=2) for m in (hf16, gg)]
    assert torch.equal(*greedy)


def test_gguf_metadata_and_modelfile(exported, tokenizer):
    e = exported("llama", "q4_0")
    reader = gguf.GGUFReader(str(e["gguf"] / "model.gguf"))
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert f["llama.attention.head_count_kv"] == 2 and f["llama.embedding_length"] == 128
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == len(tokenizer) + 20
    assert f["tokenizer.ggml.tokens"][:len(tokenizer)] == [tokenizer.convert_ids_to_tokens(i)
                                                           for i in range(len(tokenizer))]
    assert f["tokenizer.ggml.eos_token_id"] == 2 and len(f["tokenizer.ggml.merges"]) > 0
    mf = (e["gguf"] / "Modelfile").read_text()
    assert "FROM ./model.gguf" in mf and 'PARAMETER stop "</s>"' in mf
    card = (e["gguf"] / "README.md").read_text()
    assert "adalomo" in card and "gguf" in card


def test_modelfile_for_chatml_and_llama3():
    chatml = modelfile("model.gguf", "{{ '<|im_start|>' + message['role'] }}", "<|im_end|>")
    assert "<|im_start|>{{ .Role }}" in chatml and chatml.count("PARAMETER stop") == 1
    llama3 = modelfile("model.gguf", "<|start_header_id|>", "<|eot_id|>")
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in llama3 and 'stop "<|eot_id|>"' in llama3


# ---- quantize onto a GGUF grid, and import of GGUF codes ---------------------------------------------------------------
def test_quantize_gguf_grid_and_exact_import(tmp_path, make_model_dir, capsys):
    src, _ = make_model_dir("llama")
    assert main(["quantize", str(src), "-o", str(tmp_path / "q8"), "--format", "gguf-q8_0", "-q"]) == 0
    qc = json.loads((tmp_path / "q8" / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"]) == (8, 32, True, "gptq")
    assert main(["export", str(tmp_path / "q8"), "-o", str(tmp_path / "g8"), "--format", "gguf"]) == 0
    # the GGUF back into qzo2: the very codes and scales, for every layer
    assert main(["quantize", str(tmp_path / "g8"), "-o", str(tmp_path / "back"), "--format",  # the export dir: its .gguf
                 "gguf-q8_0", "-q"]) == 0
    assert "kept exactly from the GGUF for 14 of 14 layers" in capsys.readouterr().out
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    a, b = load_file(tmp_path / "q8" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    for k in a:
        if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
            assert torch.equal(a[k], b[k]), k
    # a grid that is not the file's type quantizes from the dequantized weights instead (and so does not match)
    assert main(["quantize", str(tmp_path / "g8" / "model.gguf"), "-o", str(tmp_path / "g64"), "--bits", "8",
                 "--group-size", "64", "-q"]) == 0
    assert "kept exactly" not in capsys.readouterr().out


def test_refusals_say_what_to_do_and_write_nothing(tmp_path, make_model_dir, capsys):
    src, _ = make_model_dir("llama")
    assert main(["quantize", str(src), "-o", str(tmp_path / "x"), "--format", "gguf-q4_0", "--bits", "8"]) == 2
    assert "drop --bits" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["quantize", str(src), "-o", str(tmp_path / "x"), "--format", "gguf-q4_1", "--group-size", "-1"]) == 2
    assert "groups of 32" in capsys.readouterr().err
    with atomic_dir(tmp_path / "q2") as d:
        quantize(open_source(src), d, QuantConfig(bits=2, group_size=32), progress=False)
    assert main(["export", str(tmp_path / "q2"), "-o", str(tmp_path / "out"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qzo2 quantize --format gguf-q4_0" in err
    assert not (tmp_path / "out").exists()
    opt, _ = make_model_dir("opt")
    with atomic_dir(tmp_path / "qopt") as d:
        quantize(open_source(opt), d, QuantConfig(bits=4, group_size=32), progress=False)
    assert main(["export", str(tmp_path / "qopt"), "-o", str(tmp_path / "out"), "--format", "gguf"]) == 2
    assert "'opt'" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["export", str(tmp_path / "q2"), "-o", str(tmp_path / "out"), "--format", "hf", "--dtype",
                 "q8_0"]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_sentencepiece_tokenizer_exports_for_llama_cpp(tmp_path, family):
    """A SentencePiece tokenizer (Llama 2, Mistral v0.1: tokenizer.model) goes in as llama.cpp's 'llama' vocab with
    its pieces, scores and types; transformers' GGUF reader rebuilds a tokenizer that splits text as the source's."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = tmp_path / "sp"
    spm.SentencePieceTrainer.train(sentence_iterator=iter([TEXT[i:i + 80] for i in range(0, len(TEXT), 40)]),
                                   model_prefix=str(sp), vocab_size=320, model_type="bpe", byte_fallback=True,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, character_coverage=1.0, minloglevel=2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(sp.with_suffix(".model").read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                           "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(src)
    tok.save_pretrained(src)
    build_model(family, vocab_size=330).save_pretrained(src)
    with atomic_dir(tmp_path / "q") as d:
        quantize(open_source(src), d, GRIDS["q4_0"], progress=False)
    export(str(tmp_path / "q"), str(tmp_path / "gg"), fmt="gguf")
    export(str(tmp_path / "q"), str(tmp_path / "hf"), fmt="hf", dtype="fp32")
    f = {k: v.contents() for k, v in gguf.GGUFReader(str(tmp_path / "gg" / "model.gguf")).fields.items()
         if k.startswith("tokenizer.ggml.")}
    assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.tokens"]) == 330
    assert f["tokenizer.ggml.tokens"][300] == tok.convert_ids_to_tokens(300)
    proc = spm.SentencePieceProcessor(model_file=str(sp.with_suffix(".model")))  # the scores llama.cpp merges by
    assert np.allclose(f["tokenizer.ggml.scores"][:320], [proc.GetScore(i) for i in range(320)])
    text = "the quick brown fox jumps over the lazy dog. Zebra! 123"
    back = AutoTokenizer.from_pretrained(tmp_path / "gg", gguf_file="model.gguf")
    assert back.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    ids = torch.tensor([tok.encode(text)])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    gg = AutoModelForCausalLM.from_pretrained(tmp_path / "gg", gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, gg(ids).logits)


def test_dtype_q8_0_requantizes_only_the_unquantized_matrices(exported, tmp_path):
    """--dtype q8_0: embeddings and the untied head become Q8_0 (llama.cpp's own quantizer), the quantized Linears
    stay the exact blocks, norms F32."""
    e = exported("qwen2", "q4_0")
    r = export(str(e["run"]), str(tmp_path / "g"), fmt="gguf", dtype="q8_0")
    assert r.gguf.types == {"Q8_0": 2, "Q4_0": 14, "F32": 11}  # qwen2: 14 Linears, 2 matrices, 5 norms + 6 biases
    a = {t.name: t for t in gguf.GGUFReader(str(e["gguf"] / "model.gguf")).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "g" / "model.gguf")).tensors}
    for name, t in b.items():
        if t.tensor_type.name == "Q4_0" or name.endswith("norm.weight"):
            assert np.array_equal(np.asarray(t.data), np.asarray(a[name].data)), name
    emb = b["token_embd.weight"]
    want = gguf.quants.quantize(gguf.quants.dequantize(a["token_embd.weight"].data, a["token_embd.weight"].tensor_type),
                                gguf.GGMLQuantizationType.Q8_0)
    assert emb.tensor_type.name == "Q8_0" and np.array_equal(np.asarray(emb.data), want)


def test_llama3_rope_scaling_writes_llama_cpps_rope_freqs(tmp_path, make_model_dir):
    """A Llama 3.1-style `llama3` rope scaling is written as llama.cpp reads it: a `rope_freqs` F32 tensor of one
    factor per rotary frequency that divides it. The factors equal the ratio of the unscaled inverse frequencies
    (float64 here) to those of transformers' own llama3 rope init; other rope scalings are still refused."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    src, _ = make_model_dir("llama", rope_scaling=rope, rope_theta=500000.0, max_position_embeddings=512)
    with atomic_dir(tmp_path / "q") as d:
        quantize(open_source(src), d, GRIDS["q4_0"], progress=False)
    assert main(["export", str(tmp_path / "q"), "-o", str(tmp_path / "out"), "--format", "gguf"]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    t = {x.name: x for x in reader.tensors}["rope_freqs.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    config = AutoConfig.from_pretrained(src)
    head_dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / (500000.0 ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    want = plain / scaled.double().numpy()
    got = np.asarray(t.data, dtype=np.float64)
    assert got.shape == (head_dim // 2,) and np.allclose(got, want, rtol=1e-5)
    assert got.min() == 1.0 and got.max() == 8.0 and ((got > 1) & (got < 8)).any()  # fast, slow and smoothed ones
    src2, _ = make_model_dir("llama", name="linear", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with atomic_dir(tmp_path / "q2") as d:
        quantize(open_source(src2), d, GRIDS["q4_0"], progress=False)
    assert main(["export", str(tmp_path / "q2"), "-o", str(tmp_path / "out2"), "--format", "gguf"]) == 2
    assert not (tmp_path / "out2").exists()
