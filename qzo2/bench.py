"""Benchmark helpers: named model shapes and random-weight checkpoints written to disk (grows into `qzo2 bench`).

    python -m qzo2.bench random-checkpoint --shape llama-3b -o /tmp/synth/src [--max-shard-size-gb 2]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

# HF config kwargs (plus model_type) of well-known shapes; the weights are random, only the sizes matter.
SHAPES: dict[str, dict] = {
    "tiny": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=512, max_position_embeddings=512),
    "llama-3b": dict(model_type="llama", hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                     num_attention_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5),
    "opt-6.7b": dict(model_type="opt", hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
                     num_attention_heads=32, vocab_size=50272, word_embed_proj_dim=4096,
                     max_position_embeddings=2048, do_layer_norm_before=True),
}


def make_config(shape: str, dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    kw = dict(SHAPES[shape])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    config.dtype = dtype
    return config


def skeleton_tensors(config) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_norm) of every tensor a saved checkpoint holds, in state_dict order, from a meta-device
    skeleton; tied parameters (lm_head = embeddings) appear once, non-persistent buffers not at all."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # init_empty_weights leaves tied parameters (OPT's lm_head) as separate meta tensors
    norm_modules = {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    seen, out = set(), []
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, t in model.state_dict(keep_vars=True).items():
        p = params.get(name, t)
        if id(p) in seen:
            continue
        seen.add(id(p))
        owner = name.rpartition(".")[0]
        out.append((name, tuple(t.shape), owner in norm_modules))
    return out


def write_random_checkpoint(shape: str, out_dir, dtype: torch.dtype = torch.bfloat16,
                            max_shard_bytes: int = 2 << 30, seed: int = 0) -> int:
    """Write a random-weight HF model directory (config.json, sharded safetensors + index) of a named shape,
    one tensor at a time and at most one shard in memory. Weights ~ N(0, 0.02), norm weights 1, biases 0.
    Returns the parameter count."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = make_config(shape, dtype)
    tensors = skeleton_tensors(config)
    esize = torch.empty(0, dtype=dtype).element_size()

    shards: list[list[tuple[str, tuple[int, ...], bool]]] = [[]]  # plan first, so file names know the count
    size = 0
    for spec in tensors:
        nbytes = esize * math.prod(spec[1])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes

    gen = torch.Generator().manual_seed(seed)
    n, total_params, weight_map = len(shards), 0, {}
    for i, specs in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        buf = {}
        for name, shp, is_norm in specs:
            if is_norm and name.endswith(".weight"):
                t = torch.ones(shp, dtype=dtype)
            elif name.endswith(".bias"):
                t = torch.zeros(shp, dtype=dtype)
            else:
                t = torch.empty(shp, dtype=dtype).normal_(0.0, 0.02, generator=gen)
            buf[name] = t
            total_params += t.numel()
            weight_map[name] = fname
        save_file(buf, str(out / fname), metadata={"format": "pt"})
        del buf
    if n > 1:
        index = {"metadata": {"total_size": total_params * esize}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(str(out))
    return total_params


def bench_kernels(rows: int = 1536, repeats: int = 5, shapes=((576, 576), (1536, 576), (576, 1536))) -> list[dict]:
    """Median ms of one [rows, K] x [K, N] product per CPU path (int4 g64 codes): what `QuantLinear`'s `auto`
    backend choice rests on. Paths: dense F.linear (no quantization, the floor), dequant + F.linear (torch
    backend, with and without the cached codes-minus-zeros), and the int4pack kernel, in fp32 and bf16.
    Default shapes: SmolLM2-135M's (hidden 576, MLP 1536)."""
    from quant import kernels
    from quant.linear import QuantLinear

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * sorted(times)[len(times) // 2]

    out = []
    torch.manual_seed(0)
    for n, k in shapes:
        layer = QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False), 4, 64)
        w = layer.dequantize()
        packed = kernels.int4pack_weight(layer.qweight)
        for dtype in (torch.float32, torch.bfloat16):
            x, wd = torch.randn(rows, k, dtype=dtype), w.to(dtype)
            base = kernels.codes_minus_zeros(layer.qweight, layer.zeros, None, 4, dtype=dtype)
            rec = {"N": n, "K": k, "rows": rows, "dtype": str(dtype).replace("torch.", ""),
                   "dense_ms": timed(lambda: torch.nn.functional.linear(x, wd)),
                   "dequant_ms": timed(lambda: kernels.dequant_linear(
                       x, kernels.codes_minus_zeros(layer.qweight, layer.zeros, None, 4, dtype=dtype),
                       layer.scales, None)),
                   "dequant_cached_ms": timed(lambda: kernels.dequant_linear(x, base, layer.scales, None)),
                   "int4pack_ms": timed(lambda: kernels.int4pack_linear(x, packed, layer.zeros, layer.scales, 64))}
            out.append(rec)
            print(json.dumps({k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in rec.items()}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qzo2.bench", description="qzo2 benchmark helpers")
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("random-checkpoint", help="write a random-weight HF checkpoint of a named shape")
    r.add_argument("--shape", required=True, choices=list(SHAPES))
    r.add_argument("-o", "--output", required=True, help="output directory")
    r.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    r.add_argument("--max-shard-size-gb", type=float, default=2.0, help="safetensors shard size in GiB (default 2)")
    r.add_argument("--seed", type=int, default=0)
    kb = sub.add_parser("kernels", help="CPU quantized-matmul paths, median ms per product (JSON lines)")
    kb.add_argument("--rows", type=int, default=1536, help="activation rows (tokens) per product")
    kb.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.verb == "kernels":
        bench_kernels(args.rows, args.repeats)
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    n = write_random_checkpoint(args.shape, args.output, dtype, int(args.max_shard_size_gb * (1 << 30)), args.seed)
    disk = sum(f.stat().st_size for f in Path(args.output).iterdir() if f.is_file())
    print(f"wrote {args.output}: {args.shape}, {n:,} parameters, {disk / (1 << 30):.3f} GiB,"
          f" {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
