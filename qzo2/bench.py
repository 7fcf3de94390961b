"""Benchmark helpers: named model shapes and random-weight checkpoints written to disk (grows into `qzo2 bench`),
CPU kernel timings, and the accuracy benchmark.

    python -m qzo2.bench random-checkpoint --shape llama-3b -o /tmp/synth/src [--max-shard-size-gb 2]
    python -m qzo2.bench kernels
    python -m qzo2.bench accuracy --seed 0 [--rows fp32,rtn,gptq,qzo,mezo] [key=value ...]
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


# ---- accuracy benchmark (BENCHMARKS.md): SmolLM2 + Rotten Tomatoes, every row a separate `qzo2` process -------
def run_measured(argv: list[str]) -> dict:
    """Run a command; its wall time, peak RSS (its own, from wait4) and output. Raises if it fails."""
    import os
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{out[-2000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "output": out}


def _accuracy(output: str) -> float:
    line = [ln for ln in output.splitlines() if " accuracy " in ln][-1]
    return float(line.split(" accuracy ")[1].split()[0])


def bench_accuracy(out: Path, seed: int, qzo_recipe: str, mezo_recipe: str, rows: list[str],
                   overrides: list[str], gptq_nsamples: int = 128) -> list[dict]:
    """The accuracy table: zero-shot fp32/bf16/int4 RTN/int4 GPTQ, QZO on int4 RTN, MeZO on fp32; test accuracy
    (500 examples, the same for every seed) of each, with train steps, wall time and peak RSS. JSON lines to
    out/results.jsonl."""
    qzo2 = [sys.executable, "-m", "qzo2.cli"]
    out.mkdir(parents=True, exist_ok=True)
    results = []

    def record(row: str, **kw):
        rec = dict(row=row, seed=seed, **kw)
        results.append(rec)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    def quantized(method: str) -> Path:
        path = out / f"int4-{method}"
        if not path.exists():
            extra = ["--nsamples", str(gptq_nsamples)] if method == "gptq" else []
            m = run_measured(qzo2 + ["quantize", "-o", str(path), "--method", method, "-q", *extra])
            record(f"quantize {method}", wall_s=m["wall_s"], peak_rss_gib=m["peak_rss_gib"], options=extra)
        return path

    def zero_shot(row: str, model: str, *extra: str):
        m = run_measured(qzo2 + ["eval", model, "--task", "sentiment", "--seed", str(seed), *extra])
        record(row, steps=0, test_accuracy=_accuracy(m["output"]), eval_wall_s=m["wall_s"],
               eval_peak_rss_gib=m["peak_rss_gib"])

    def trained(row: str, recipe: str, model: str, fmt: str):
        run = out / f"{row.split()[0].lower()}-seed{seed}"
        t = run_measured(qzo2 + ["train", recipe, f"model={model}", f"seed={seed}", f"output_dir={run}",
                                 "overwrite=true", "progress=false", *overrides])
        exported = Path(f"{run}-{fmt}")
        run_measured(qzo2 + ["export", str(run), "-o", str(exported), "--format", fmt, "--overwrite"]
                     + (["--dtype", "fp32"] if fmt == "hf" else []))
        e = run_measured(qzo2 + ["eval", str(exported), "--task", "sentiment", "--seed", str(seed)])
        best = json.loads((run / "best" / "state.json").read_text()) if (run / "best").is_dir() else {}
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        record(row, steps=max(steps), best_step=best.get("step"), test_accuracy=_accuracy(e["output"]),
               train_wall_s=t["wall_s"], train_peak_rss_gib=t["peak_rss_gib"], eval_wall_s=e["wall_s"],
               exported=str(exported))

    jobs = {"fp32": lambda: zero_shot("zero-shot fp32", "default"),
            "bf16": lambda: zero_shot("zero-shot bf16", "default", "--dtype", "bf16"),
            "rtn": lambda: zero_shot("zero-shot int4 RTN", str(quantized("rtn"))),
            "gptq": lambda: zero_shot("zero-shot int4 GPTQ", str(quantized("gptq"))),
            "qzo": lambda: trained("QZO int4 RTN", qzo_recipe, str(quantized("rtn")), "gptq"),
            "mezo": lambda: trained("MeZO fp32", mezo_recipe, "default", "hf")}
    unknown = [r for r in rows if r not in jobs]
    if unknown:
        raise ValueError(f"unknown row {unknown[0]!r}; choose from {list(jobs)}")
    for row in rows:  # in the order given
        jobs[row]()
    return results


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
    a = sub.add_parser("accuracy", help="the accuracy benchmark of BENCHMARKS.md (SmolLM2 + Rotten Tomatoes)")
    a.add_argument("-o", "--output", default="runs/accuracy", help="work and result directory")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--rows", default="fp32,rtn,gptq,qzo,mezo",
                   help="comma list of fp32,bf16,rtn,gptq,qzo,mezo (bf16 is slow on CPUs without bf16 GEMM)")
    a.add_argument("--qzo-recipe", default="recipes/accuracy-qzo.yaml")
    a.add_argument("--mezo-recipe", default="recipes/accuracy-mezo.yaml")
    a.add_argument("--gptq-nsamples", type=int, default=128, help="GPTQ calibration sequences (512 tokens each)")
    a.add_argument("overrides", nargs="*", help="key=value overrides for both training recipes")
    args = p.parse_args(argv)
    if args.verb == "accuracy":
        bench_accuracy(Path(args.output), args.seed, args.qzo_recipe, args.mezo_recipe, args.rows.split(","),
                       args.overrides, args.gptq_nsamples)
        return 0
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
