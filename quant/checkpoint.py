"""Read unquantized models, write and read quantized model directories (safetensors, config, tokenizer).

A quantized directory is a standard GPTQ checkpoint that transformers + optimum + gptqmodel load:
  model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
  config.json with quantization_config, quantize_config.json, tokenizer files, generation_config.json
Quantization streams tensor by tensor from the source's safetensors files, and shards are flushed as they fill, so
peak memory stays near one shard plus one layer. Nothing here uses pickle.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import kernels
from .format import QuantConfig, default_g_idx, pack_rows, pack_zeros, unpack_zeros
from .linear import QuantLinear
from .rtn import quantize_rtn

GGUF_SIDECAR = "gguf_source.json"  # a model quantized from a .gguf: the source's tokenizer keys a GGUF export reuses
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
    GGUF_SIDECAR,
)
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class CheckpointError(ValueError):
    """Bad input: the message is one line a user can act on."""


# ---- sources ----------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """An unquantized causal LM: its config and a lazy name -> tensor mapping (read one tensor at a time)."""

    config: object
    names: list[str]
    get: Callable[[str], torch.Tensor]
    path: Path
    save_tokenizer: Callable[[Path], None]
    extra: dict = field(default_factory=dict)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path} holds only pickle (.bin/.pt) weights; qzo2 reads safetensors only")
    raise CheckpointError(f"{path} holds no .safetensors weights")


def _open_safetensors(files: list[Path]) -> tuple[list[str], dict[str, Path]]:
    where: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    where[k] = f
        except Exception as e:  # truncated or corrupt file: safetensors raises its own error types
            raise CheckpointError(f"cannot read {f}: {str(e).splitlines()[0]}") from None
    return list(where), where


def read_tensor(where: dict[str, Path], name: str) -> torch.Tensor:
    try:
        with safe_open(str(where[name]), framework="pt") as h:
            return h.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name} from {where[name]}: {str(e).splitlines()[0]}") from None


def load_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from None


def hf_dir_source(path: Path, trust_remote_code: bool = False) -> Source:
    config = load_config(path, trust_remote_code)
    names, where = _open_safetensors(_safetensors_files(path))

    return Source(config, names, lambda n: read_tensor(where, n), path, lambda dst: copy_tokenizer_files(path, dst))


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Tokenizer files, chat template and generation config of a model directory, those it has."""
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)


def load_tokenizer(directory, trust_remote_code: bool = False, **kwargs):
    """AutoTokenizer of a model directory (a .gguf's with gguf_file=), offline. Code its tokenizer_config.json names
    (auto_map) runs only with trust_remote_code: transformers would otherwise ask on a terminal, or run it; here
    the refusal is one CheckpointError naming the directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                             trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as e:
        if "trust_remote_code" not in str(e):  # transformers' refusal says how to allow the code
            if "tokenizer" in str(e).lower() and "instantiate" in str(e):  # no tokenizer files at all
                raise CheckpointError(f"{directory} has no usable tokenizer ({str(e).splitlines()[0][:80]}...); "
                                      f"copy the tokenizer files of the model it came from into it") from None
            raise
        raise CheckpointError(f"{directory}: its tokenizer_config.json asks to run custom tokenizer code (auto_map), "
                              f"which qzo2 does not run unless asked: pass --trust-remote-code (qzo2 quantize) if "
                              f"you trust it, or give it a tokenizer_class transformers has built in") from None


def gguf_source(path: Path, trust_remote_code: bool = False) -> Source:
    """A .gguf file, dequantized by transformers into an in-memory model (fine for small models only). The tokenizer
    also reads a tokenizer_config.json beside the file: code it names (auto_map) runs only with trust_remote_code."""
    from transformers import AutoModelForCausalLM

    kw = dict(gguf_file=path.name, trust_remote_code=trust_remote_code)
    try:  # the tokenizer first: it is the quick one to fail
        tokenizer = load_tokenizer(path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    except CheckpointError:
        raise
    except Exception as e:
        try:  # transformers reports an unreadable GGUF header as a bad JSON config file: say what it is
            import gguf

            gguf.GGUFReader(str(path))
        except Exception as bad:
            raise CheckpointError(f"cannot load {path}: not a readable GGUF file ({type(bad).__name__}: "
                                  f"{(str(bad).splitlines() or [''])[0]}); download or convert it again") from None
        raise CheckpointError(f"cannot load {path} as a GGUF causal LM: {str(e).splitlines()[0]}") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the gguf's own scheme; the loaded weights are plain floats
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:  # tied weights (lm_head = embeddings) are stored once
            continue
        seen.add(v.data_ptr())
        state[k] = v

    def save_tokenizer(dst: Path) -> None:
        tokenizer.save_pretrained(str(dst))
        model.generation_config.save_pretrained(str(dst))
        import gguf  # llama.cpp picks its pre-tokenizer regex by this name, which transformers' conversion drops

        fields = gguf.GGUFReader(str(path)).fields
        keep = {k: fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre") if k in fields}
        write_json(Path(dst) / GGUF_SIDECAR, {"source": path.name, **keep})

    return Source(config, list(state), state.__getitem__, path, save_tokenizer,
                  extra={"model": model, "tokenizer": tokenizer})


def open_source(src: str | os.PathLike, trust_remote_code: bool = False) -> Source:
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"model source {src} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{src} is a file but not a .gguf; give a model directory or a .gguf file")
        return gguf_source(path, trust_remote_code)
    return hf_dir_source(path, trust_remote_code)


# ---- which modules get quantized ----------------------------------------------------------------------------------
def empty_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The model skeleton with parameters on the meta device (buffers such as rotary tables stay real). Built in
    fp32 whatever the config's dtype: the real buffers are computed as the stock fp32 model computes them (Gemma 3's
    embed_scale √hidden would otherwise be rounded to bf16); the parameters come from the checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of decoder layers: the longest nn.ModuleList in the model (model.layers, model.decoder.layers...)."""
    best = max(((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)),
               key=lambda nm: len(nm[1]), default=None)
    if best is None:
        raise CheckpointError(f"cannot find the decoder layers of {type(model).__name__}")
    return best


def linears_to_quantize(model: nn.Module, skip: list[str] = ()) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks, minus names matching a --skip regex. GPTQ loaders (optimum)
    quantize exactly the Linears inside the blocks, so nothing outside them (lm_head, projections) is touched."""
    block_name, _ = decoder_blocks(model)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith(block_name + ".") and not any(re.search(p, name) for p in skip):
            out[name] = m
    return out


# ---- writing --------------------------------------------------------------------------------------------------------
class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever `max_shard_bytes` would be exceeded."""

    def __init__(self, out: Path, max_shard_bytes: int):
        self.out, self.max = out, max_shard_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.buf and self.size + nbytes > self.max:
            self.flush()
        self.buf[name] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.buf:
            return
        save_file(self.buf, str(self.out / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buf))
        self.buf, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out / "shard-00000.tmp", self.out / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"shard-{i:05d}.tmp", self.out / fname)
            weight_map.update({k: fname for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as h:
                os.fsync(h.fileno())


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dst`; on success it replaces `dst` in one rename, on error it vanishes."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"output {dst} already exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the result normal permissions
        for f in tmp.iterdir():
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if dst.exists() and exchange(tmp, dst):  # tmp now holds the old version
            shutil.rmtree(tmp, ignore_errors=True)
        elif dst.exists():  # no atomic exchange on this filesystem: two renames (dst is briefly absent)
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem
    cannot, so a replaced directory is never missing for a moment where it can be avoided. Python's os module has
    no renameat2, hence ctypes."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


_renameat2 = None


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fill_architectures(d: dict) -> dict:
    """A config dict rebuilt from GGUF metadata names no model class; servers (vLLM) need one: the causal LM class
    transformers maps its model_type to."""
    if not d.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(d.get("model_type"))
        d["architectures"] = [name] if name else None
    return d


def write_config(dst: Path, config, quantization_config: dict, dtype: str = "bfloat16") -> None:
    d = fill_architectures(config.to_dict())
    d["quantization_config"] = quantization_config
    d["dtype"] = dtype
    d.pop("torch_dtype", None)
    write_json(dst / "config.json", d)


# ---- quantize -------------------------------------------------------------------------------------------------------
@dataclass
class QuantizeReport:
    parameters: int = 0
    quantized_parameters: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    kept_codes: tuple[int, int] | None = None  # (layers whose codes came from the GGUF source as they were, of all)
    rel_error: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def mean_rel_error(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in sorted(self.rel_error.items())}

    def summary(self, out) -> str:
        gb = 1 << 30
        lines = [
            f"wrote {out}",
            f"  parameters        {self.parameters:,} ({self.quantized_parameters:,} quantized)",
            f"  size              {self.bytes_before / gb:.3f} GiB -> {self.bytes_after / gb:.3f} GiB"
            f" ({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller)",
            f"  time              {self.seconds:.1f} s",
            "  mean relative reconstruction error ||W - Q(W)|| / ||W|| by layer type:",
        ]
        lines += [f"    {k:<16} {v:.4f}" for k, v in self.mean_rel_error().items()]
        if self.kept_codes is not None:
            lines.append(f"  codes and scales kept exactly from the GGUF for {self.kept_codes[0]} of "
                         f"{self.kept_codes[1]} layers (the others quantized from its dequantized weights)")
        return "\n".join(lines)


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc only). Quantizing leaves small packed tensors between large freed
    temporaries and glibc keeps the holes: measured on a 3.4B model, peak RSS 4.40 GiB without this, 2.72 GiB with."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w = w.to(torch.float32)
    return float((w - w_hat.to(torch.float32)).norm() / w.norm().clamp_min(1e-30))


def layer_type(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def auto_group_size(config, skip: list[str] = (), preferred: tuple[int, ...] = (128, 64, 32)) -> int:
    """The largest preferred group size that divides the in_features of every Linear to quantize."""
    ks = {m.in_features for m in linears_to_quantize(empty_model(config), skip).values()}
    for g in preferred:
        if all(k % g == 0 for k in ks):
            return g
    return -1


def check_quantizable(modules: dict[str, nn.Linear], cfg: QuantConfig) -> None:
    per = 32 // cfg.bits
    for name, m in modules.items():
        if cfg.group_size != -1 and m.in_features % cfg.group_size:
            raise CheckpointError(
                f"{name}: in_features {m.in_features} is not divisible by group size {cfg.group_size}"
                f" (use another --group-size, -1 for per-channel, or --skip it)")
        if m.in_features % per or m.out_features % per:
            raise CheckpointError(f"{name}: shape {m.out_features}x{m.in_features} cannot be packed at {cfg.bits} bits")


@dataclass
class Encoder:
    """How one Linear weight becomes checkpoint tensors, and what config.json says about it."""

    encode: Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]  # -> (tensors, W_hat)
    bias_dtype: torch.dtype
    quantization_config: Callable[[nn.Module, dict], dict]  # (skeleton, quantized modules) -> dict
    writes_quantize_config: bool = True


def gptq_encoder(cfg: QuantConfig, quantize_fn: Callable | None = None) -> Encoder:
    """RTN (or, through `quantize_fn(name, weight) -> (qweight, qzeros, scales fp16, g_idx)`, GPTQ or a GGUF's own
    codes; None from it means RTN for that layer) in GPTQ layout."""
    def encode(mod: str, w: torch.Tensor):
        chosen = quantize_fn(mod, w) if quantize_fn is not None else None  # None: this layer by RTN
        if chosen is not None:
            qweight, qzeros, scales16, g_idx = chosen
            zeros = unpack_zeros(qzeros, cfg.bits, cfg.checkpoint_format)
        else:
            codes, zeros, scales = quantize_rtn(w, cfg.bits, cfg.group_size, cfg.sym)
            qweight, qzeros = pack_rows(codes, cfg.bits), pack_zeros(zeros, cfg.bits, cfg.checkpoint_format)
            scales16 = scales.clamp(max=65504.0).to(torch.float16)
            g_idx = default_g_idx(w.shape[1], cfg.group_size)
        w_hat = kernels.dequant(qweight, zeros, scales16.float(), g_idx, cfg.bits)
        return dict(zip((f"{mod}.{s}" for s in QUANT_SUFFIXES), (qweight, qzeros, scales16, g_idx))), w_hat

    def quantization_config(skeleton: nn.Module, modules: dict) -> dict:
        qdict = cfg.to_dict()
        block_name, _ = decoder_blocks(skeleton)
        qdict["block_name_to_quantize"] = block_name
        if len(linears_to_quantize(skeleton)) != len(modules):  # --skip removed some: tell loaders which stayed
            first_block = f"{block_name}.0."
            qdict["modules_in_block_to_quantize"] = [
                [n[len(first_block):] for n in modules if n.startswith(first_block)]]
        return qdict

    return Encoder(encode, torch.float16, quantization_config)


def nf4_encoder(blocksize: int) -> Encoder:
    """bitsandbytes NF4 (fp32 absmax, no double quantization), in the layout transformers saves Linear4bit."""
    from .nf4 import dequant_nf4, nf4_quantization_config, nf4_tensors, quantize_nf4

    def encode(mod: str, w: torch.Tensor):
        codes, absmax = quantize_nf4(w.to(torch.float32), blocksize)
        return nf4_tensors(mod, codes, absmax, blocksize), dequant_nf4(codes, absmax)

    def quantization_config(skeleton: nn.Module, modules: dict) -> dict:
        kept = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in modules]
        return nf4_quantization_config(blocksize, skip_modules=kept)

    return Encoder(encode, torch.bfloat16, quantization_config, writes_quantize_config=False)


def quantize_source(
    source: Source,
    dst: Path,
    encoder: Encoder,
    skip: list[str] = (),
    max_shard_bytes: int = 4 << 30,
    progress: bool = True,
    check: Callable[[dict], None] | None = None,
) -> QuantizeReport:
    """Stream `source` into the (empty, existing) directory `dst`: each Linear inside the decoder blocks (minus
    `skip`) through `encoder`, every other tensor copied as bf16."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    skeleton = empty_model(source.config)
    modules = linears_to_quantize(skeleton, skip)
    if not modules:
        raise CheckpointError("no Linear layer left to quantize (check --skip)")
    if check is not None:
        check(modules)
    names, described = set(source.names), set(skeleton.state_dict())  # every Linear to quantize among the latter
    extra = sorted(n for n in names - described if not n.endswith("inv_freq"))
    if getattr(source.config, "tie_word_embeddings", False):
        described.discard("lm_head.weight")  # the embedding's alias: a checkpoint may or may not store it
    missing = sorted(described - names)
    for what, found in (("has no tensor", missing), ("has tensors config.json does not describe:", extra)):
        if found:  # a checkpoint written from it would load nowhere, or silently drop weights
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise CheckpointError(f"{source.path} {what} {found[0]}{more}; the model directory is damaged or "
                                  f"config.json was edited")
    report = QuantizeReport()
    writer = ShardWriter(dst, max_shard_bytes)
    with tqdm(total=len(modules), desc="quantize", unit="layer", disable=not progress) as bar:
        for name in source.names:
            t = source.get(name)
            report.parameters += t.numel()
            report.bytes_before += t.numel() * t.element_size()
            mod = name[: -len(".weight")] if name.endswith(".weight") else None
            if mod in modules:
                want = tuple(modules[mod].weight.shape)
                if tuple(t.shape) != want:  # a checkpoint that loads nowhere: refused before it is written
                    raise CheckpointError(f"{source.path}: {name} has shape {tuple(t.shape)}, but config.json says "
                                          f"{want}; the model directory is damaged or config.json was edited")
                tensors, w_hat = encoder.encode(mod, t)
                report.rel_error[layer_type(mod)].append(relative_error(t, w_hat))
                report.quantized_parameters += t.numel()
                for k, v in tensors.items():
                    writer.add(k, v)
                del tensors, w_hat
                release_free_memory()
                bar.update()
            elif name.endswith(".bias") and name[: -len(".bias")] in modules:
                writer.add(name, t.to(encoder.bias_dtype))
            else:
                writer.add(name, t.to(torch.bfloat16) if t.is_floating_point() else t)
            del t
    writer.finish()
    report.bytes_after = writer.total
    qdict = encoder.quantization_config(skeleton, modules)
    write_config(dst, source.config, qdict)
    if encoder.writes_quantize_config:
        write_json(dst / "quantize_config.json", qdict)
    source.save_tokenizer(dst)
    report.seconds = time.perf_counter() - t0
    return report


# ---- loading --------------------------------------------------------------------------------------------------------
def checkpoint_tensors(path: Path) -> tuple[list[str], dict[str, Path]]:
    return _open_safetensors(_safetensors_files(path))


def load_quantized(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    trust_remote_code: bool = False,
) -> nn.Module:
    """A quantized directory -> HF model whose quantized Linears are QuantLinear (fp32 master scales).

    Reads GPTQ v1/v2 checkpoints (qzo2's own, gptqmodel's, hub models; act-order g_idx) and bitsandbytes NF4
    checkpoints with fp32 absmax. Non-quantized tensors are cast to `dtype`.
    """
    path = Path(path)
    config = load_config(path, trust_remote_code)
    qc = pop_quantization_config(config, path)
    names, where = checkpoint_tensors(path)
    suffix, read_layer = quantized_layer_reader(path, where, qc)
    model = empty_model(config, trust_remote_code)
    quantized = sorted(n[: -len(suffix)] for n in names if n.endswith(suffix))
    for mod in quantized:
        parent_name, _, child = mod.rpartition(".")
        old = getattr(model.get_submodule(parent_name), child)
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"{path}: {mod} is quantized in the checkpoint but is not a Linear in the model")
        layer = read_layer(mod, old)
        if old.bias is not None:
            b = where.get(f"{mod}.bias")
            layer.bias = read_tensor(where, f"{mod}.bias").to(dtype) if b else torch.zeros(old.out_features, dtype=dtype)
        layer.backend = backend
        setattr(model.get_submodule(parent_name), child, layer)
    qset = set(quantized)
    state = {}
    for n in names:
        if is_quantized_part(n, qset):
            continue
        t = read_tensor(where, n)
        state[n] = t.to(dtype) if t.is_floating_point() else t
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{path}: checkpoint has no tensor for {still_meta[0]}")
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: unexpected tensor {result.unexpected_keys[0]} in checkpoint")
    return model.eval()


@dataclass
class QuantizedDir:
    """A quantized checkpoint directory opened for streaming: its plain config, quantization_config, tensor names
    and files, the suffix marking a quantized module, the per-layer reader, the quantized modules, a meta skeleton."""

    config: object
    qc: dict
    names: list[str]
    where: dict[str, Path]
    suffix: str
    read_layer: Callable
    quantized: set[str]
    skeleton: nn.Module


def open_quantized(path: Path) -> QuantizedDir:
    config = load_config(path)
    qc = pop_quantization_config(config, path)
    names, where = checkpoint_tensors(path)
    suffix, read_layer = quantized_layer_reader(path, where, qc)
    quantized = {n[: -len(suffix)] for n in names if n.endswith(suffix)}
    return QuantizedDir(config, qc, names, where, suffix, read_layer, quantized, empty_model(config))


def pop_quantization_config(config, path: Path) -> dict:
    """Remove quantization_config from a loaded HF config (so the plain model class builds) -> it, as a dict."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise CheckpointError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)")
    del config.quantization_config
    return qc if isinstance(qc, dict) else qc.to_dict()


def is_quantized_part(name: str, quantized: set[str]) -> bool:
    """Whether checkpoint tensor `name` belongs to a quantized module (codes, zeros, scales, g_idx, bias, bnb state)."""
    return name.rpartition(".")[0] in quantized or name.rsplit(".weight.", 1)[0] in quantized


def quantized_layer_reader(path: Path, where: dict[str, Path], qc: dict):
    """(suffix that marks a quantized module's tensors, read(module name, its nn.Linear) -> QuantLinear) for a
    checkpoint's quantization_config: GPTQ v1/v2 or bitsandbytes NF4."""
    if qc.get("quant_method") == "bitsandbytes":
        return ".weight.quant_state.bitsandbytes__nf4", _nf4_layer_reader(where)
    try:
        cfg = QuantConfig.from_dict(qc)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unsupported quantization_config: {e}") from None
    return ".qweight", _gptq_layer_reader(where, cfg)


def _gptq_layer_reader(where: dict[str, Path], cfg: QuantConfig):
    def read(mod: str, old: nn.Linear) -> QuantLinear:
        layer = QuantLinear(old.in_features, old.out_features, cfg.bits, cfg.group_size, bias=old.bias is not None)
        g_name = f"{mod}.g_idx"
        parts = {"qweight": read_tensor(where, f"{mod}.qweight"),
                 "zeros": unpack_zeros(read_tensor(where, f"{mod}.qzeros"), cfg.bits, cfg.checkpoint_format),
                 "scales": read_tensor(where, f"{mod}.scales").to(torch.float32)}
        check_layer_tensors(mod, where[f"{mod}.scales"], layer, parts)
        layer.load_codes(parts["qweight"], parts["zeros"], parts["scales"],
                         read_tensor(where, g_name) if g_name in where else None)
        return layer

    return read


def check_layer_tensors(mod: str, file: Path, layer: QuantLinear, parts: dict[str, torch.Tensor]) -> None:
    """A quantized layer's tensors as its config says they must be (shapes from in/out features, bits and group
    size) and finite scales; else one CheckpointError line naming the file."""
    for name, t in parts.items():
        want = tuple(getattr(layer, name).shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{file}: {mod}.{name} has shape {tuple(t.shape)}, but the config (bits "
                                  f"{layer.bits}, group size {layer.group_size}) gives {want}; re-quantize the model")
    if not torch.isfinite(parts["scales"]).all():
        raise CheckpointError(f"{file}: {mod}.scales holds NaN/inf values; re-quantize the model or restore the file")


def _nf4_layer_reader(where: dict[str, Path]):
    """NF4 as a QuantLinear: codes in the GPTQ packing, zeros 0, the NF4 table as codebook, absmax as scales."""
    from .nf4 import NF4_TABLE, QUANT_STATE_KEY, nf4_from_tensors

    def read(mod: str, old: nn.Linear) -> QuantLinear:
        keys = [f"{mod}.weight{s}" for s in ("", ".absmax", ".quant_map", f".{QUANT_STATE_KEY}", ".nested_absmax")]
        codes, absmax, blocksize, _ = nf4_from_tensors(mod, {k: read_tensor(where, k) for k in keys if k in where})
        layer = QuantLinear(old.in_features, old.out_features, 4, blocksize, bias=old.bias is not None,
                            codebook=NF4_TABLE)
        n_groups = old.in_features // blocksize
        layer.load_codes(pack_rows(codes.t().contiguous(), 4),
                         torch.zeros(n_groups, old.out_features, dtype=torch.int16), absmax.t())
        return layer

    return read


def quantize(
    source: Source,
    dst: Path,
    cfg: QuantConfig,
    fmt: str = "gptq",
    skip: list[str] = (),
    calib: Path | None = None,
    nsamples: int = 128,
    seqlen: int = 512,
    max_shard_bytes: int = 4 << 30,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> QuantizeReport:
    """Quantize `source` into the empty directory `dst` by RTN, GPTQ (gptqmodel) or NF4 (bitsandbytes)."""
    check = lambda modules: check_quantizable(modules, cfg)  # noqa: E731
    if fmt == "nf4":
        if cfg.bits != 4 or cfg.method != "rtn":
            raise CheckpointError("--format nf4 is 4-bit round-to-nearest: drop --bits/--method")
        return quantize_source(source, dst, nf4_encoder(cfg.group_size), skip, max_shard_bytes, progress, check)
    if cfg.method == "rtn":
        keep = gguf_codes(source, cfg) if source.path.suffix == ".gguf" else None
        report = quantize_source(source, dst, gptq_encoder(cfg, keep), skip, max_shard_bytes, progress, check)
        if keep is not None:
            report.kept_codes = (len(keep.kept), sum(len(v) for v in report.rel_error.values()))
        return report
    with tempfile.TemporaryDirectory(prefix="gptq-work-", dir=dst) as work:  # inside the output's temporary
        encoder = gptq_encoder(cfg, gptqmodel_codes(source, Path(work), cfg, calib, nsamples, seqlen,
                                                    trust_remote_code))
        return quantize_source(source, dst, encoder, skip, max_shard_bytes, progress, check)


def gguf_codes(source: Source, cfg: QuantConfig):
    """For a .gguf source and a grid that is a GGUF block type (4-bit symmetric = Q4_0, 8-bit symmetric = Q8_0, group
    size 32): quantize_fn(module, weight) giving the file's own codes and fp16 scales for each Linear stored in that
    type, exactly (quant/gguf.py), and None (RTN from the dequantized weight) for the others. None when the grid is no
    GGUF type. `.kept` lists the modules kept."""
    import gguf

    from .gguf import DECODABLE, GRID, decode, unpermute_rows

    want = next((t for t in DECODABLE if GRID[t] == (cfg.bits, cfg.sym)), None)
    if want is None or cfg.group_size != 32 or cfg.desc_act:
        return None
    reader = gguf.GGUFReader(str(source.path))
    arch = reader.fields["general.architecture"].contents()
    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        return None
    config = source.config
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    stored = {t.name: t for t in reader.tensors}
    # llama.cpp's converter permuted llama's q/k rows into its rope layout; transformers undid it when it loaded
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads} if arch == "llama" else {}

    def read(mod: str, weight: torch.Tensor):
        g = names.get_name(f"{mod}.weight", try_suffixes=(".weight",))
        t = stored.get(g) if g else None
        if t is None or t.tensor_type.name.lower() != want:
            return None
        raw = np.asarray(t.data).reshape(weight.shape[0], -1)
        kind = g.split(".")[2] if g.startswith("blk.") else ""
        if kind in heads:
            raw = unpermute_rows(raw, heads[kind])
        codes, zeros, scales = decode(raw, want)
        read.kept.append(mod)
        return (pack_rows(codes, cfg.bits), pack_zeros(zeros, cfg.bits, cfg.checkpoint_format), scales,
                default_g_idx(weight.shape[1], cfg.group_size))

    read.kept = []
    return read


def gptqmodel_codes(source: Source, work: Path, cfg: QuantConfig, calib: Path, nsamples: int, seqlen: int,
                    trust_remote_code: bool = False):
    """Run GPTQ (gptqmodel) on the whole model into `work`, and return a per-module reader of its results
    re-encoded in `cfg.checkpoint_format`."""
    from .gptq import quantize_with_gptqmodel

    hf_dir = source.path if source.path.is_dir() else save_plain_hf(source, work / "hf")
    text = Path(calib).read_text(encoding="utf-8")
    quantize_with_gptqmodel(str(hf_dir), str(work / "gptq"), bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                            desc_act=cfg.desc_act, calib_texts=[text], nsamples=nsamples, seqlen=seqlen,
                            damp_percent=cfg.damp_percent, trust_remote_code=trust_remote_code)
    gcfg = QuantConfig.from_dict(json.loads((work / "gptq" / "quantize_config.json").read_text()))
    _, where = checkpoint_tensors(work / "gptq")

    def read(mod: str, weight: torch.Tensor):
        zeros = unpack_zeros(read_tensor(where, f"{mod}.qzeros"), gcfg.bits, gcfg.checkpoint_format)
        g_name = f"{mod}.g_idx"
        g_idx = read_tensor(where, g_name) if g_name in where else default_g_idx(weight.shape[1], cfg.group_size)
        return (read_tensor(where, f"{mod}.qweight"), pack_zeros(zeros, cfg.bits, cfg.checkpoint_format),
                read_tensor(where, f"{mod}.scales").to(torch.float16), g_idx.to(torch.int32))

    return read


def save_plain_hf(source: Source, dst: Path) -> Path:
    """Write an in-memory (e.g. GGUF-loaded) source as a plain safetensors HF directory."""
    dst.mkdir(parents=True)
    save_file({n: source.get(n).contiguous() for n in source.names}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    d = fill_architectures(source.config.to_dict())
    d.pop("quantization_config", None)
    write_json(dst / "config.json", d)
    source.save_tokenizer(dst)
    return dst
