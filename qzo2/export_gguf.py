"""`qzo2 export --format gguf`: a run (or a model) as one .gguf file llama.cpp, Ollama and LM Studio serve, with the
trained codes and scales kept exactly.

Each quantized Linear becomes GGUF blocks built from its own codes and (trained) fp16 scales by quant/gguf.py — never
re-quantized: 4-bit symmetric -> Q4_0 and 8-bit symmetric -> Q8_0 bit for bit, 4-bit asymmetric -> Q4_1 up to the
fp16 rounding of m = −s·z (reported). Other tensors keep their stored dtype (F16/BF16/F32; 1-D ones F32, as llama.cpp
writes them) or become Q8_0 with `--dtype q8_0`. The names come from gguf's own tensor-name map; the architecture
keys from gguf's writer; the tokenizer from gguf's vocab readers; llama's q/k rows are permuted into llama.cpp's rope
layout as its converter does (whole rows move, so the blocks stay exact). Beside the file: an Ollama Modelfile.

The tensors stream: every tensor's shape and type is planned first (GGUF puts them all in the header), then each is
read, converted and written one at a time, so memory stays near one layer.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from quant.checkpoint import (
    GGUF_SIDECAR, CheckpointError, is_quantized_part, load_tokenizer, open_quantized, open_source, read_tensor,
)
from quant.format import QuantConfig, default_g_idx, unpack_rows, unpack_zeros
from quant.gguf import BLOCK, SYM_ZERO, NotExact, encode, exact_type, permute_rows

from .model import is_quantized_dir

GGUF_NAME = "model.gguf"
DTYPES = ("f16", "bf16", "f32", "q8_0")  # --dtype of a gguf export: the tensors that are not quantized Linears
# HF model_type -> llama.cpp architecture, as llama.cpp's convert_hf_to_gguf.py registers them (Mistral is converted
# as Llama). Only families whose export is tested against transformers' GGUF loader are listed.
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
PERMUTED = ("llama",)  # archs whose q/k rows llama.cpp's converter permutes (quant/gguf.py, permute_rows)
# a tokenizer.json pre-tokenizer regex -> llama.cpp's pre-tokenizer of that name (llama.cpp picks its regex by name)
PRE_BY_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


@dataclass
class GGUFReport:
    types: dict  # GGUF type name -> tensor count
    q4_1_max_error: float = 0.0  # largest |w_gguf − s·(q − z)| over Q4_1 blocks (fp16 rounding of m)
    pre: str = ""
    notes: tuple = ()


@dataclass
class _Planned:
    name: str  # GGUF tensor name
    shape: tuple  # torch/numpy order, [N, K]
    qtype: str  # GGMLQuantizationType name
    make: Callable[[], np.ndarray]  # -> the data (uint8 blocks for quantized types)


def _arch(config) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise CheckpointError(f"GGUF export supports the {', '.join(sorted(ARCHS))} families; this model is "
                              f"{mt!r} (export --format gptq or hf instead)")
    kind = _rope(config).get("rope_type", "default")
    if kind != "default" and not (kind == "llama3" and ARCHS[mt] == "llama"):
        raise CheckpointError(f"GGUF export does not write {kind!r} rope scaling yet; export --format gptq or hf "
                              f"instead")
    return ARCHS[mt]


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("full_attention", rope)  # Gemma 3: one set per attention type (the global layers' here)


def _rope_theta(config) -> float:
    return float(_rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_freqs(config) -> np.ndarray | None:
    """Llama 3.1+'s `llama3` rope scaling as llama.cpp reads it: a `rope_freqs` tensor of one factor per rotary
    frequency, each dividing that frequency (1 for the fast ones, `factor` for the slow ones, smoothed between), as
    llama.cpp's convert_hf_to_gguf.py computes it; None for unscaled rope."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    head_dim = _head_dim(config)
    freqs = 1.0 / (_rope_theta(config) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = int(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _float_array(t: torch.Tensor, qtype: str) -> np.ndarray:
    import gguf

    if qtype == "F32":
        return t.to(torch.float32).contiguous().numpy()
    if qtype == "F16":
        return t.to(torch.float16).contiguous().numpy()
    if qtype == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint16).numpy().view(np.uint8).reshape(t.shape[0], -1)
    if qtype == "Q8_0":  # re-quantized from floats: only for tensors that were not quantized (embeddings, head)
        return gguf.quants.quantize(t.to(torch.float32).numpy(), gguf.GGMLQuantizationType.Q8_0)
    raise ValueError(qtype)


def _float_type(t_dtype: torch.dtype, shape: tuple, dtype: str | None) -> str:
    if len(shape) == 1:
        return "F32"
    if dtype == "q8_0":
        return "Q8_0" if shape[-1] % BLOCK == 0 else "F16"
    if dtype is None:
        return {torch.float16: "F16", torch.bfloat16: "BF16"}.get(t_dtype, "F32")
    return dtype.upper()


def _nbytes(shape: tuple, qtype: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return int(np.prod(shape)) // block * size


def plan_tensors(t, dtype: str | None, report: GGUFReport):
    """(config, [_Planned, ...], the opened Source of a dense base or None) for a Trained (base + trained tensors):
    every tensor of the GGUF, in file order."""
    import gguf

    base = Path(t.base)
    plan: list[_Planned] = []
    source = None
    if is_quantized_dir(base):
        q = open_quantized(base)
        config, qc, names, where, suffix, read_layer, quantized, skeleton = (
            q.config, q.qc, q.names, q.where, q.suffix, q.read_layer, q.quantized, q.skeleton)

        def grid(mod: str, linear) -> tuple:
            """exact_type's arguments for a layer, from the config, its zero points and g_idx (not its codes)."""
            if qc.get("quant_method") == "bitsandbytes":
                return 4, True, 64, linear.in_features, False, True
            cfg = QuantConfig.from_dict(qc)
            zeros = unpack_zeros(read_tensor(where, f"{mod}.qzeros"), cfg.bits, cfg.checkpoint_format)
            group = linear.in_features if cfg.group_size == -1 else cfg.group_size
            g_idx = read_tensor(where, f"{mod}.g_idx") if f"{mod}.g_idx" in where else None
            act_order = g_idx is not None and not torch.equal(g_idx.int(), default_g_idx(linear.in_features, group))
            sym = bool((zeros == SYM_ZERO[cfg.bits]).all()) if cfg.bits in SYM_ZERO else cfg.sym
            return cfg.bits, sym, group, linear.in_features, act_order, False

        def get(name: str) -> torch.Tensor:
            return t.tensors[name] if name in t.tensors else read_tensor(where, name)
    else:
        source = open_source(base)
        config, names, quantized, skeleton, suffix, where = source.config, list(source.names), set(), None, "", {}
        read_layer = grid = None

        def get(name: str) -> torch.Tensor:
            return t.tensors[name] if name in t.tensors else source.get(name)
    arch = _arch(config)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    unknown = sorted(n for n in t.tensors if n.rpartition(".")[0] not in quantized and n not in names)
    if unknown:
        raise CheckpointError(f"trained tensor {unknown[0]} is not in the base model {base}")

    def gguf_name(hf: str) -> str:
        g = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise CheckpointError(f"GGUF export: no llama.cpp tensor name for {hf} ({arch}); export --format gptq "
                                  f"or hf instead")
        return g

    def permute_for(g: str) -> int | None:
        kind = g.split(".")[2] if g.startswith("blk.") else ""
        return heads.get(kind) if arch in PERMUTED else None

    for name in names:
        if quantized and name.endswith(suffix):
            mod = name[: -len(suffix)]
            g = gguf_name(f"{mod}.weight")
            plan.append(_quantized_plan(mod, g, read_layer, grid, skeleton, t.tensors.get(f"{mod}.scales"),
                                        permute_for(g), report))
            if f"{mod}.bias" in names:
                plan.append(_float_plan(gguf_name(f"{mod}.bias"), f"{mod}.bias", get, (skeleton.get_submodule(
                    mod).out_features,), None, permute_for(g)))
        elif quantized and is_quantized_part(name, quantized):
            continue
        elif name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the tied head from token_embd
        else:
            if quantized:
                shape, stored = tuple(skeleton.get_parameter(name).shape), _stored_dtype(where, name)
            else:
                x = get(name)
                shape, stored = tuple(x.shape), x.dtype
            g = gguf_name(name)
            # Gemma's RMSNorm scales by (1 + w), llama.cpp's gemma3 graph by w: its converter adds the 1
            shift = 1.0 if arch == "gemma3" and name.endswith("norm.weight") else 0.0
            plan.append(_float_plan(g, name, get, shape, dtype, permute_for(g), stored, shift))
    factors = rope_freqs(config)
    if factors is not None:  # always F32, as llama.cpp's converter writes it
        plan.append(_Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, "F32",
                             lambda: factors))
    return config, plan, source


def _stored_dtype(where, name: str):
    from safetensors import safe_open

    with safe_open(str(where[name]), framework="pt") as h:
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(h.get_slice(name).get_dtype(), torch.float32)


def _float_plan(g: str, name: str, get, shape: tuple, dtype: str | None, n_head: int | None,
                stored: torch.dtype | None = None, shift: float = 0.0) -> _Planned:
    qtype = _float_type(stored or torch.float32, shape, dtype)

    def make() -> np.ndarray:
        x = get(name)
        a = _float_array(x.float() + shift if shift else x, qtype)
        return permute_rows(a, n_head) if n_head else a

    return _Planned(g, shape, qtype, make)


def _quantized_plan(mod: str, g: str, read_layer, grid, skeleton, trained_scales, n_head: int | None,
                    report: GGUFReport) -> _Planned:
    from .exporter import checkpoint_scales

    linear = skeleton.get_submodule(mod)
    try:
        qtype = exact_type(*grid(mod, linear))
    except NotExact as e:
        raise CheckpointError(f"{mod}: {e}, so it cannot be written to GGUF without re-quantizing; quantize the "
                              f"base with `qzo2 quantize --format gguf-q4_0` (or gguf-q4_1 / gguf-q8_0) and train "
                              f"that, or export --format gptq or hf") from None

    def make() -> np.ndarray:
        layer = read_layer(mod, linear)
        scales = layer.scales if trained_scales is None else trained_scales
        if tuple(scales.shape) != tuple(layer.scales.shape):
            raise CheckpointError(f"trained {mod}.scales has shape {tuple(scales.shape)}, the base "
                                  f"{tuple(layer.scales.shape)}")
        s16, _ = checkpoint_scales(scales, torch.float16)
        raw, err = encode(unpack_rows(layer.qweight, layer.bits), layer.zeros, s16, layer.group_size, qtype)
        report.q4_1_max_error = max(report.q4_1_max_error, err)
        return permute_rows(raw, n_head) if n_head else raw

    return _Planned(g, (linear.out_features, linear.in_features), qtype.upper(), make)


# ---- metadata -----------------------------------------------------------------------------------------------------
def _hparams(w, config, arch: str) -> None:
    """The architecture keys llama.cpp reads, as its converter writes them for these families."""
    n_head = config.num_attention_heads
    head_dim = _head_dim(config)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(_rope_theta(config))  # Gemma 3: the global layers' theta (llama.cpp fixes the local one)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(config.sliding_window)
        return
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def tokenizer_pre(tokdir: Path, tokenizer_json: dict) -> tuple[str, str | None]:
    """llama.cpp's pre-tokenizer name: the source GGUF's (recorded by `qzo2 quantize`), else the one whose regex the
    tokenizer uses, else 'default' and a note (llama.cpp then splits words its generic way)."""
    side = tokdir / GGUF_SIDECAR
    if side.exists():
        pre = json.loads(side.read_text()).get("tokenizer.ggml.pre")
        if pre:
            return pre, None
    text = json.dumps(tokenizer_json.get("pre_tokenizer"))
    for regex, name in PRE_BY_REGEX.items():
        if json.dumps(regex)[1:-1] in text:
            return name, None
    return "default", ("the tokenizer's pre-tokenizer is not one llama.cpp names; the GGUF says 'default' and "
                       "llama.cpp may split some words differently from transformers")


def add_tokenizer(w, tokdir: Path, tok, config) -> tuple[str, str | None]:
    """The tokenizer as llama.cpp's converter writes it, every id up to the model's vocab size (ids the tokenizer
    lacks as unused [PADn]): SentencePiece models (Llama 2, Mistral v0.1: tokenizer.model) with gguf's
    SentencePieceVocab (pieces, scores, types), byte-level BPE (Llama 3, Qwen2, SmolLM2) from tokenizer.json; then
    merges, special ids and the chat template with gguf.SpecialVocab."""
    import gguf

    path = tokdir / "tokenizer.json"
    n = config.vocab_size
    T = gguf.TokenType
    if (tokdir / "tokenizer.model").exists():
        try:
            vocab = gguf.SentencePieceVocab(tokdir)
        except RuntimeError as e:  # gguf's reader needs the sentencepiece package
            raise CheckpointError(f"{tokdir / 'tokenizer.model'}: reading a SentencePiece tokenizer needs "
                                  f"`pip install sentencepiece` ({e})") from None
        tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
        if len(tokens) > n:
            raise CheckpointError(f"{tokdir / 'tokenizer.model'} has {len(tokens)} pieces, more than the model's "
                                  f"vocab_size {n}")
        for i in range(len(tokens), n):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(T.UNUSED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        gguf.SpecialVocab(tokdir, load_merges=False, n_vocab=n).add_to_gguf(w, quiet=True)
        return "default", None
    if not path.exists():
        raise CheckpointError(f"{tokdir} has no tokenizer.json or tokenizer.model; GGUF export needs the tokenizer")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise CheckpointError(f"{path}: GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2) and "
                              f"SentencePiece ones with their tokenizer.model; this one is {model.get('type')}"
                              f"{' with byte fallback and no tokenizer.model' if model.get('byte_fallback') else ''}"
                              f" (export --format gptq or hf instead)")
    reverse = {i: s for s, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    if max(reverse) >= n:
        raise CheckpointError(f"{path}: token id {max(reverse)} is beyond the model's vocab_size {n}")
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(reverse[i])
            types.append(T.NORMAL if i not in added else T.CONTROL if added[i].special else T.USER_DEFINED)
    pre, note = tokenizer_pre(tokdir, tj)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(tokdir, load_merges=True, n_vocab=n).add_to_gguf(w, quiet=True)
    return pre, note


def modelfile(gguf_file: str, chat_template: str | None, eos: str | None) -> str:
    """An Ollama Modelfile: FROM the file, and for the chat formats whose Go template is known (ChatML, Llama 3), the
    TEMPLATE and stop tokens; any other template Ollama reads from the GGUF's tokenizer.chat_template itself."""
    lines = ["# ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_file}"]
    ct = chat_template or ""
    if "<|im_start|>" in ct:
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                  '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                  '<|im_start|>assistant\n"""', 'PARAMETER stop "<|im_end|>"']
    elif "<|start_header_id|>" in ct:
        lines += ['TEMPLATE """{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}'
                  '<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                  '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"""',
                  'PARAMETER stop "<|eot_id|>"']
    elif ct:
        lines.append("# the chat template is the GGUF's tokenizer.chat_template, which Ollama reads itself")
    else:
        lines.append("# no chat template: a plain completion model")
    if eos and eos not in ("<|im_end|>", "<|eot_id|>"):
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


def export_gguf(t, tmp: Path, dtype: str | None, report) -> GGUFReport:
    """Write tmp/model.gguf and tmp/Modelfile for a Trained; `report` (an ExportReport) gets the counts."""
    import gguf

    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype} is not a GGUF type for the unquantized tensors; choose from {DTYPES}")
    g = GGUFReport(types={})
    config, plan, source = plan_tensors(t, dtype, g)
    arch = _arch(config)
    tokdir = Path(t.base) if Path(t.base).is_dir() else None
    if tokdir is None:  # a .gguf base: its tokenizer as transformers reads it, saved beside the output for a moment
        tokdir = tmp / "_tokenizer"
        tokdir.mkdir()
        source.save_tokenizer(tokdir)
    tokenizer = load_tokenizer(tokdir)
    out = tmp / GGUF_NAME
    w = gguf.GGUFWriter(str(out), arch)
    run = t.run or {}
    w.add_type("model")
    w.add_name(f"{Path(run.get('base') or t.base).name}" + (f" qzo2 {run['method']}" if run else ""))
    _hparams(w, config, arch)
    qtypes = {p.qtype for p in plan if p.qtype in ("Q4_0", "Q4_1", "Q8_0")}
    ftype = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
             "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    main = max(qtypes, key=lambda q: sum(p.qtype == q for p in plan)) if qtypes else None
    w.add_file_type(ftype[main] if main else {"F16": gguf.LlamaFileType.MOSTLY_F16,
                                              "BF16": gguf.LlamaFileType.MOSTLY_BF16}.get(
        plan[0].qtype, gguf.LlamaFileType.ALL_F32))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    g.pre, note = add_tokenizer(w, tokdir, tokenizer, config)
    g.notes = (note,) if note else ()
    for p in plan:
        qt = gguf.GGMLQuantizationType[p.qtype]
        nbytes = _nbytes(p.shape, p.qtype)
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
        g.types[p.qtype] = g.types.get(p.qtype, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for p in plan:
        data = p.make()
        if data.nbytes != _nbytes(p.shape, p.qtype):
            raise RuntimeError(f"{p.name}: {data.nbytes} bytes, planned {_nbytes(p.shape, p.qtype)}")
        w.write_tensor_data(data)
        report.copied += 1
    w.close()
    report.replaced = len(t.tensors)
    report.bytes = out.stat().st_size
    (tmp / "Modelfile").write_text(modelfile(GGUF_NAME, getattr(tokenizer, "chat_template", None),
                                             tokenizer.eos_token))
    if tokdir.parent == tmp:
        import shutil

        shutil.rmtree(tokdir)
    if g.q4_1_max_error:
        warnings.warn(f"Q4_1 stores the offset m = −s·z in fp16: weights differ from s·(q − z) by at most "
                      f"{g.q4_1_max_error:.3g}", stacklevel=2)
    return g
