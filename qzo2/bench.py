"""Benchmark helpers: named model shapes, random-weight models built in place and random-weight checkpoints written
to disk, the speed benchmark behind `qzo2 bench`, and CPU kernel timings. (The accuracy benchmark is not part of the
library: benchmarks/accuracy.py.)

    qzo2 bench --shape tiny --mode forward,qzo,qzo-offload,mezo,zo2 --batch 2 --seq 64 --compare

    python -m qzo2.bench random-checkpoint --shape llama-3b -o /tmp/synth/src [--max-shard-size-gb 2]
    python -m qzo2.bench kernels
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import data as D
from . import distributed, gpu
from .outputs import append_line
from .tracking import GB, host_rss_gb  # GiB; the training log lines measure the same way

# HF config kwargs (plus model_type) of well-known shapes; the weights are random, only the sizes matter.
SHAPES: dict[str, dict] = {
    "tiny": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=512, max_position_embeddings=512),
    # a 1B-class Llama (TinyLlama-1.1B's sizes) and a 3B one (OpenLLaMA-3B's): the CPU cost rows in docs/bench.md
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                     rms_norm_eps=1e-5),
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
    "opt-13b": dict(model_type="opt", hidden_size=5120, ffn_dim=20480, num_hidden_layers=40,
                    num_attention_heads=40, vocab_size=50272, word_embed_proj_dim=5120,
                    max_position_embeddings=2048, do_layer_norm_before=True),
    "opt-175b": dict(model_type="opt", hidden_size=12288, ffn_dim=49152, num_hidden_layers=96,
                     num_attention_heads=96, vocab_size=50272, word_embed_proj_dim=12288,
                     max_position_embeddings=2048, do_layer_norm_before=True),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    # small enough for the CPU tests, with what the tiny one lacks: grouped-query attention, four blocks
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024),
    # a second family for CPU runs of `qzo2 bench` (OPT: learned positions, LayerNorm with biases, tied lm_head)
    "tiny-opt": dict(model_type="opt", hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=512, word_embed_proj_dim=128, max_position_embeddings=512,
                     do_layer_norm_before=True),
}


def check_shape(shape: str) -> None:
    """A named shape, or a model directory (or its config.json): one clear error otherwise."""
    if shape in SHAPES:
        return
    path = Path(shape)
    if path.name == "config.json" and path.is_file() or (path / "config.json").is_file():
        return
    raise ValueError(f"unknown shape {shape!r}: name one of {', '.join(SHAPES)}, or a model directory with a "
                     f"config.json")


def _model_dir(shape: str) -> Path:
    """The model directory a non-named shape names (given as the directory or as its config.json)."""
    path = Path(shape)
    return path.parent if path.name == "config.json" else path


def make_config(shape: str, dtype: torch.dtype = torch.bfloat16):
    """The HF config of a named shape, or of a model directory's config.json (no weights are read; never remote
    code)."""
    from transformers import AutoConfig

    check_shape(shape)
    if shape in SHAPES:
        kw = dict(SHAPES[shape])
        config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    else:
        from quant.checkpoint import load_config

        config = load_config(_model_dir(shape))  # a bad file: one line naming it
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


# ---- speed benchmark (`qzo2 bench`, docs/benchmarks.md): random-weight models built in place, one ZO step per mode -------


def bench_modes() -> dict:
    """mode -> (its method's spec, how the model is built): every method's modes (qzo2/methods registers them);
    `forward` (two plain forwards, the floor) is not a method."""
    from .methods import registry

    return registry.bench_modes()


def mode_names() -> tuple[str, ...]:
    return ("forward",) + tuple(bench_modes())


from .model import DTYPES  # noqa: E402
# one JSON line per mode, these keys in this order (see bench_mode); ratio_to_forward is 1.0 for forward itself
RECORD_FIELDS = ("shape", "mode", "device", "gpu", "dtype", "batch", "seq", "steps", "warmup", "bits", "group_size",
                 "depth", "streamed_blocks", "build_s", "h2d_floor_ms", "step_ms", "tok_s", "torch_peak_gb",
                 "nvml_used_gb", "h2d_gb_per_step", "d2h_gb_per_step", "host_rss_gb", "ratio_to_forward", "loss", "error",
                 "ranks", "tok_s_rank", "collective_bytes_per_step", "cpu_user_s_per_step", "cpu_sys_s_per_step",
                 "profile")


def _norm_modules(model) -> set[int]:
    return {id(m) for m in model.modules() if "norm" in type(m).__name__.lower()}


@torch.no_grad()
def _materialize(model, device, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Give every meta parameter real storage on `device`, initialized in place: N(0, 0.02), norm weights 1,
    biases 0. A parameter shared by several modules (a tied lm_head) gets one tensor. Buffers are left alone:
    `to_empty()` would also replace the real, non-persistent ones (rotary inv_freq) by uninitialized memory."""
    norms, done = _norm_modules(model), {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                t = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device=device)
                if id(module) in norms and name == "weight":
                    t.fill_(1.0)
                elif name == "bias":
                    t.zero_()
                else:
                    t.normal_(0.0, 0.02, generator=gen)
                done[id(p)] = nn.Parameter(t, requires_grad=False)
            module._parameters[name] = done[id(p)]


def random_quant_linear(linear: nn.Module, bits: int, group_size: int, device, gen: torch.Generator,
                        codes_device=None):
    """A QuantLinear of `linear`'s shape with random codes made directly (no dense weight is quantized): every bit
    field of a uniform random int32 word is a uniform code in [0, 2^bits), so qweight is drawn as random words;
    zeros 2^(bits-1), scales ~ U(0.5, 1.5)·0.02/2^(bits-1). Codes and zeros are drawn on `device` (where `gen`
    lives) and kept on `codes_device` (default `device`; the host for blocks that will be streamed)."""
    from quant.linear import QuantLinear

    k, n = linear.in_features, linear.out_features
    layer = QuantLinear(k, n, bits, group_size, bias=linear.bias is not None, device=device)
    groups = layer.scales.shape[0]
    qweight = torch.randint(-2**31, 2**31, (k * bits // 32, n), dtype=torch.int32, device=device, generator=gen)
    zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int16, device=device)
    scales = torch.empty(groups, n, dtype=torch.float32, device=device).uniform_(0.5, 1.5, generator=gen)
    layer.load_codes(qweight, zeros, scales * (0.02 / 2 ** (bits - 1)))
    if codes_device is not None and torch.device(codes_device) != torch.device(device):
        layer.qweight, layer.zeros = layer.qweight.to(codes_device), layer.zeros.to(codes_device)
    return layer


def _check_quantizable(config, bits: int, group_size: int) -> None:
    """One clear error, before anything is built, when some decoder Linear cannot take these codes."""
    from quant.checkpoint import check_quantizable, empty_model, linears_to_quantize
    from quant.format import QuantConfig

    check_quantizable(linears_to_quantize(empty_model(config)), QuantConfig(bits=bits, group_size=group_size))


def random_model(shape: str, dtype: torch.dtype = torch.float32, device="cpu", quantized: bool = False,
                 bits: int = 4, group_size: int = 128, codes_device=None, seed: int = 0):
    """A causal LM of a named shape with random weights, built directly where it runs, without HF init: a meta
    skeleton (rotary buffers stay real), parameters materialized in place on `device` (_materialize); with
    `quantized`, every nn.Linear inside the decoder blocks becomes a QuantLinear with random codes
    (random_quant_linear; codes on `codes_device`, e.g. "cpu" for blocks a BlockStreamer will stream). Everything
    but those codes ends up on `device`. Eval mode, no gradients, no KV cache."""
    from quant.checkpoint import empty_model, linears_to_quantize
    from quant.linear import QuantLinear

    device = gpu.indexed(device)
    config = make_config(shape, dtype)
    config.use_cache = False  # training forwards: a KV cache would only cost memory
    if quantized:
        _check_quantizable(config, bits, group_size)
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():  # a real meta skeleton even under qzo2.simulate's fake tensors (it holds no data)
        model = empty_model(config)
    model.tie_weights()  # init_empty_weights leaves a tied lm_head as a separate meta tensor
    gen = gpu.generator(device).manual_seed(seed)
    if quantized:
        for name, linear in linears_to_quantize(model).items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    random_quant_linear(linear, bits, group_size, device, gen, codes_device))
    _materialize(model, device, dtype, gen)
    placed = {id(m.qweight) for m in model.modules() if isinstance(m, QuantLinear)}
    placed |= {id(m.zeros) for m in model.modules() if isinstance(m, QuantLinear)}
    for module in model.modules():  # other buffers (rotary tables...) were built real on the host
        for name, b in list(module._buffers.items()):
            if b is not None and id(b) not in placed and b.device != device:
                module._buffers[name] = b.to(device)
    return model.eval()


def random_batch(vocab_size: int, batch: int, seq: int, device, seed: int = 0) -> dict:
    """input_ids uniform in [0, vocab), every position attended and a label (LM loss on all tokens)."""
    ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def bench_method(mode: str, model, targets, **overrides):
    """The Method `qzo2 train` would build for a bench mode (recipe defaults for eps/lr/clip; overrides as keys of
    TrainConfig), on the LM loss: bench times exactly the step the trainer runs."""
    from .config import TrainConfig
    from .methods import build_method

    cfg = TrainConfig(method=bench_modes()[mode][0].name, task="sentiment", progress=False, **overrides)
    return build_method(cfg, model, targets, "lm")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nvml_used_gb(device: torch.device) -> float | None:
    """Device memory in use as NVML sees it (all processes, the CUDA context included), GiB; None without NVML."""
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.device_memory_used(device) / GB
    except Exception:  # no pynvml / amdsmi, or an older torch
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / GB
    except Exception:
        return None


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # cached pinned blocks of a streamer's host buffers


def h2d_floor_ms(streamer, repeats: int = 3) -> float:
    """Milliseconds to copy every streamed block's host buffer into a device slot once, back to back on the upload
    stream, nothing else running (median of `repeats`): the transfer floor of one offloaded forward."""
    slot, times = streamer.slots[0], []
    for _ in range(repeats):
        if streamer.cuda:
            torch.cuda.synchronize(streamer.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(streamer.stream):
                start.record(streamer.stream)
                for host in streamer.host:
                    slot[:host.numel()].copy_(host, non_blocking=True)
                end.record(streamer.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            for host in streamer.host:
                slot[:host.numel()].copy_(host)
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


@dataclass
class ModeRun:
    """One bench mode, built and ready: `step(i)` runs step i (-> its loss) exactly as `qzo2 train` would."""

    model: nn.Module
    streamer: object  # engine.BlockStreamer or None
    method: object  # the Method, or None for `forward`
    data: dict
    quantized: bool
    offload: bool

    def step(self, i: int) -> float:
        from .objective import lm_chunk_losses

        if self.method is None:  # the floor: two plain forwards (decoder + the same chunked LM head and loss)
            with torch.no_grad():
                lm_chunk_losses(self.model, self.data, 1)
                return float(lm_chunk_losses(self.model, self.data, 1)[0])
        return self.method.step(self.data, i).get("loss", float("nan"))


def build_mode(mode: str, shape, batch: int, device: torch.device, dtype: torch.dtype, bits: int = 4,
               group_size: int = 128, depth: int = 2, seed: int = 0, seq: int = 512) -> ModeRun:
    """A fresh random model of `shape` for one bench mode, placed as the mode says (resident, or every decoder
    block streamed), its Method, and a random batch (this rank's slice under torchrun). `qzo2 bench` times it;
    `qzo2 bench --simulate` and `qzo2 plan` run it on fake tensors (qzo2.simulate)."""
    from quant.checkpoint import decoder_blocks

    from . import engine
    from .methods import scale_targets, weight_targets

    if mode != "forward" and mode not in bench_modes():
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(mode_names())}")
    how = bench_modes().get(mode)
    quantized, offload = (how[1].quantized, how[1].offload) if how else (False, False)
    model = random_model(shape, dtype, device, quantized, bits, group_size,
                         codes_device="cpu" if offload else None, seed=seed)
    streamer = None
    if quantized:
        targets = scale_targets(model)
        engine.set_cache_base("auto", [t.module for t in targets], device)
    elif how:
        targets = weight_targets(model, ("linear",))
    else:  # forward
        targets = None
    if offload:  # built on the device (fast), then every block's codes / Linear weights move to host buffers
        _, blocks = decoder_blocks(model)
        streamer = engine.BlockStreamer(model, device, set(range(len(blocks))), depth,
                                        kind="codes" if quantized else "weights", trained=targets,
                                        backward=how[0].first_order)
        _free(device)
    data = random_batch(model.config.vocab_size, batch, seq, device, seed)
    method = bench_method(mode, model, targets, seed=seed) if targets is not None else None
    world = distributed.world()
    if world.enabled:  # under torchrun: `batch` is the global batch, each rank times its slice (as `qzo2 train`)
        if batch % world.size:
            raise ValueError(f"batch {batch} cannot be split over {world.size} ranks")
        per = batch // world.size
        data = D.batch_rows(data, world.rank * per, (world.rank + 1) * per)
    return ModeRun(model, streamer, method, data, quantized, offload)


def bench_mode(mode: str, shape: str, batch: int, seq: int, steps: int, warmup: int, device: torch.device,
               dtype: torch.dtype, bits: int = 4, group_size: int = 128, depth: int = 2, seed: int = 0,
               profile: bool = False) -> dict:
    """Build a fresh random model for one mode, run `warmup` untimed and `steps` timed steps. -> the JSON record
    (RECORD_FIELDS; ratio_to_forward is left to run_bench). The model dies with this call (run_bench collects it).
    forward: two plain forwards of the batch (decoder + the same chunked LM head and loss as a ZO step: the
    floor); qzo: quantized model resident, ZO step on the scales; qzo-offload: the same with every decoder block's
    codes streamed by engine.BlockStreamer (h2d/d2h from its counters); lomo/adalomo/adamw/hift: quantized model
    resident, a first-order step (forward + backward: fused update, AdamW, or AdamW on one group of layers) on the
    scales; lomo-offload/adalomo-offload: the same with every block's codes streamed through forward and, in
    reverse, through backward (each block checkpointed and recomputed); grass: dense model, a GRASS step on the
    Linear weights; mezo: dense model resident, ZO step on the Linear weights; zo2: the same with every block's Linear weights streamed, each step's update applied when
    the block next arrives and copied back. Timing is host wall time around each step, with
    torch.cuda.synchronize() on CUDA; torch_peak_gb is reset after the model is built (weights + step activations). For the streamed modes
    h2d_floor_ms is the time to copy every block's host buffer to the device once with nothing else running: the
    transfer floor a step cannot beat. cpu_user_s / cpu_sys_s_per_step: this process's user and kernel CPU time per
    measured step (getrusage; kernel time is mostly page faults of fresh large allocations). `profile`: one more step
    under torch.profiler, its ops by self CPU time (`profile`: [{op, self_ms, calls}], the top 15)."""
    import resource

    t0 = time.perf_counter()
    run = build_mode(mode, shape, batch, device, dtype, bits, group_size, depth, seed, seq=seq)
    model, streamer, step, quantized, offload = run.model, run.streamer, run.step, run.quantized, run.offload
    _sync(device)
    build_s = time.perf_counter() - t0
    # the transfer floor of a step: every block once per forward, once more in a first-order mode's backward
    floor_ms = h2d_floor_ms(streamer) * (2 if streamer.backward else 1) if streamer is not None else None
    world = distributed.world()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, moved, sent = [], None, 0
    for i in range(warmup + steps):
        if i == warmup and streamer is not None:
            moved = (streamer.stats["h2d_bytes"], streamer.stats["d2h_bytes"])
        if i == warmup:
            sent = distributed.STATS["bytes"]
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
        _sync(device)
        ts = time.perf_counter()
        loss = step(i)
        _sync(device)
        times.append(time.perf_counter() - ts)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if not math.isfinite(loss):
        raise RuntimeError(f"{mode}: the random {shape} model gave a non-finite loss")
    step_ms = 1e3 * statistics.median(times[warmup:][steps // 2:])
    top = _profile_step(step, warmup + steps, device) if profile else None
    h2d = (streamer.stats["h2d_bytes"] - moved[0]) / steps if streamer else 0
    d2h = (streamer.stats["d2h_bytes"] - moved[1]) / steps if streamer else 0
    return {"shape": shape, "mode": mode, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": str(dtype).replace("torch.", ""), "batch": batch, "seq": seq, "steps": steps, "warmup": warmup,
            "bits": bits if quantized else None, "group_size": group_size if quantized else None,
            "depth": depth if offload else None,
            "streamed_blocks": streamer.stats["streamed_blocks"] if streamer else 0,
            "build_s": round(build_s, 3), "h2d_floor_ms": floor_ms, "step_ms": step_ms, "tok_s": batch * seq / (step_ms / 1e3),
            "torch_peak_gb": torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None,
            "nvml_used_gb": _nvml_used_gb(device), "h2d_gb_per_step": h2d / GB, "d2h_gb_per_step": d2h / GB,
            "host_rss_gb": host_rss_gb(), "ratio_to_forward": 1.0 if mode == "forward" else None,
            "loss": loss, "error": None, "ranks": world.size,
            "tok_s_rank": (batch // world.size) * seq / (step_ms / 1e3),
            "collective_bytes_per_step": (distributed.STATS["bytes"] - sent) / steps,
            "cpu_user_s_per_step": (ru1.ru_utime - ru0.ru_utime) / steps,
            "cpu_sys_s_per_step": (ru1.ru_stime - ru0.ru_stime) / steps, "profile": top}


def _profile_step(step, i: int, device: torch.device, top: int = 15) -> list[dict]:
    """One step under torch.profiler: the ops with the most self CPU time (ms), with their call counts."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(i)
        _sync(device)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count} for e in rows]


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def format_table(records: list[dict]) -> str:
    """The `--compare` summary: a markdown table, one row per mode."""
    cols = [("mode", "mode"), ("step ms", "step_ms"), ("tok/s", "tok_s"), ("x forward", "ratio_to_forward"),
            ("torch peak GB", "torch_peak_gb"), ("NVML used GB", "nvml_used_gb"), ("H2D GB/step", "h2d_gb_per_step"),
            ("H2D floor ms", "h2d_floor_ms"), ("host RSS GB", "host_rss_gb")]
    if any(r.get("cpu_user_s_per_step") is not None and not r.get("gpu") for r in records):  # on CPU: where time goes
        cols += [("user s/step", "cpu_user_s_per_step"), ("sys s/step", "cpu_sys_s_per_step")]
    if any((r.get("ranks") or 1) > 1 for r in records):  # under torchrun: what each rank did and sent
        cols += [("ranks", "ranks"), ("tok/s per rank", "tok_s_rank"), ("bytes sent/step", "collective_bytes_per_step")]
    r0 = records[0] if records else {}
    lines = [f"{r0.get('shape')}, batch {r0.get('batch')} x seq {r0.get('seq')}, {r0.get('dtype')}, "
             f"{r0.get('gpu') or r0.get('device')}", "",
             "| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        cells = [r["mode"]] + ([r["error"]] + [""] * (len(cols) - 2) if r.get("error") else
                               [_fmt(r[k]) for _, k in cols[1:]])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_bench(shape: str = "tiny", modes="qzo", batch: int = 1, seq: int = 512, steps: int = 10, warmup: int = 2,
              bits: int = 4, group_size: int | None = None, device: str = "auto", dtype: str | None = None,
              depth: int = 2, compare: bool = False, output=None, seed: int = 0, echo=print,
              simulate: bool = False, profile: bool = False) -> list[dict]:
    """`qzo2 bench`: for each mode, a fresh random model, `warmup` + `steps` timed steps, one JSON line (echoed
    and appended to `output`). group_size None: the largest of 128/64/32 that divides every layer, as `qzo2
    quantize` picks it. `compare` puts `forward` first and ends with a markdown table. Each mode's model
    is freed before the next is built; a CUDA out-of-memory in one mode is recorded as its `error` and the
    others still run. -> the records."""
    modes = [m.strip() for m in modes.split(",") if m.strip()] if isinstance(modes, str) else list(modes)
    if not modes:
        raise ValueError("no mode given; choose from " + ", ".join(mode_names()))
    for m in modes:
        if m not in mode_names():
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(mode_names())}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"mode {next(m for m in modes if modes.count(m) > 1)!r} is given twice")
    check_shape(shape)
    for name, v, low in (("batch", batch, 1), ("seq", seq, 2), ("steps", steps, 1), ("warmup", warmup, 0),
                         ("depth", depth, 2)):
        if v < low:
            raise ValueError(f"{name} must be >= {low} (got {v})")
    max_pos = getattr(make_config(shape), "max_position_embeddings", None)
    if max_pos and seq > max_pos:
        raise ValueError(f"seq {seq} exceeds the {shape} shape's {max_pos} positions")
    from .model import resolve_device

    if simulate:
        return _run_simulated(shape, modes, batch, seq, bits, group_size, dtype or "bf16", depth, compare, output,
                              seed, echo)
    with distributed.group(device) as world:  # under torchrun: joined here, left together at the end
        if compare and "forward" in modes:  # every rank in the same order
            modes = ["forward"] + [m for m in modes if m != "forward"]
        if not world.main:
            echo, output, compare = (lambda line: None), None, False  # rank 0 alone prints and writes
        dev = resolve_device(device)
        if dtype is None:
            dtype = "bf16" if dev.type == "cuda" else "fp32"
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        if any(m in bench_modes() and bench_modes()[m][1].quantized for m in modes):
            from quant.checkpoint import auto_group_size

            config = make_config(shape)
            group_size = auto_group_size(config) if group_size is None else group_size
            _check_quantizable(config, bits, group_size)
        if compare and "forward" in modes:
            modes = ["forward"] + [m for m in modes if m != "forward"]
        out = _bench_output(output, shape)

        records, floor_ms = [], None
        for mode in modes:
            try:
                rec = bench_mode(mode, shape, batch, seq, steps, warmup, dev, DTYPES[dtype], bits, group_size, depth,
                                 seed, profile)
            except torch.OutOfMemoryError as e:
                rec = dict.fromkeys(RECORD_FIELDS)
                rec.update(shape=shape, mode=mode, device=str(dev), dtype=str(DTYPES[dtype]).replace("torch.", ""),
                           batch=batch, seq=seq, steps=steps, warmup=warmup,
                           error="out of memory: " + (str(e).splitlines() or [""])[0][:200])
                del e
            _free(dev)
            if mode == "forward" and not rec["error"]:
                floor_ms = rec["step_ms"]
            if floor_ms and not rec["error"] and mode != "forward":
                rec["ratio_to_forward"] = rec["step_ms"] / floor_ms
            records.append(_emit(rec, echo, out))
        if compare:
            echo(format_table(records))
        for r in records if profile else ():
            if r.get("profile"):
                echo(f"\n{r['mode']}: one step's ops by self CPU time (torch.profiler)\n"
                     "| op | self ms | calls |\n|---|---|---|")
                echo("\n".join(f"| {e['op']} | {e['self_ms']} | {e['calls']} |" for e in r["profile"]))
        return records


SIMULATED_FIELDS = ("simulated", "simulated_peak_gb", "resident_gb", "breakdown_gb", "pinned_host_gb", "host_peak_gb",
                    "host_syncs", "peak_at", "device_ops_per_step", "tflop_per_step", "hbm_gb_per_step", "estimate_ms")
ESTIMATE_GPUS = ("h100-sxm", "rtx4090")  # the estimate columns of the --simulate --compare table


def simulated_record(mode: str, shape: str, batch: int, seq: int, bits: int = 4, group_size: int | None = None,
                     dtype: str = "bf16", depth: int = 2, seed: int = 0) -> dict:
    """`qzo2 bench --simulate` for one mode: the JSON record of `bench_mode` with what a fake-tensor run of the same
    model, placement and step can say (qzo2.simulate.simulate_mode): memory and bytes moved, no timings."""
    from quant.checkpoint import auto_group_size

    from .simulate import simulate_mode

    how = bench_modes().get(mode)
    quantized, offload = (how[1].quantized, how[1].offload) if how else (False, False)
    if group_size is None:
        group_size = auto_group_size(make_config(shape))
    sim = simulate_mode(mode, shape, batch, seq, DTYPES[dtype], bits, group_size, depth, seed=seed)
    rec = dict.fromkeys(RECORD_FIELDS)
    rec.update(shape=shape, mode=mode, device="cuda (simulated)", dtype=dtype, batch=batch, seq=seq, steps=2,
               warmup=0, bits=bits if quantized else None, group_size=group_size if quantized else None,
               depth=depth if offload else None, streamed_blocks=sim["streamed_blocks"],
               h2d_gb_per_step=sim["h2d_gb_per_step"], d2h_gb_per_step=sim["d2h_gb_per_step"], ranks=1)
    rec.update({k: sim[k] for k in SIMULATED_FIELDS})
    return rec


def _emit(rec: dict, echo, out: Path | None) -> dict:
    """One record as a JSON line: echoed, and appended to `out` (the -o file) when there is one."""
    line = json.dumps(rec)
    echo(line)
    if out is not None:
        append_line(out, line)
    return rec


def _bench_output(output, shape) -> Path | None:
    """-o FILE.jsonl: records are appended, only to a new file or an earlier bench output (never through a symlink,
    never into the model directory measured)."""
    if not output:
        return None
    from .outputs import guard_file

    inputs = [_model_dir(shape)] if shape not in SHAPES and os.path.exists(shape) else []
    out = guard_file(output, inputs, own_keys=("shape", "mode"), what="-o")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _run_simulated(shape, modes, batch, seq, bits, group_size, dtype, depth, compare, output, seed, echo):
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    out = _bench_output(output, shape)
    records = []
    for mode in modes:
        records.append(_emit(simulated_record(mode, shape, batch, seq, bits, group_size, dtype, depth, seed), echo,
                             out))
    if compare:
        echo(format_simulated(records))
    return records


def format_simulated(records: list[dict]) -> str:
    """The `--simulate --compare` summary: simulated peak and its parts per mode (GiB)."""
    r0 = records[0] if records else {}
    parts = ("weights", "trained", "state", "slots", "activations")
    lines = [f"{r0.get('shape')}, batch {r0.get('batch')} x seq {r0.get('seq')}, {r0.get('dtype')}, simulated GPU "
             f"(fake tensors; a real GPU adds its CUDA context and allocator cache)", "",
             "| mode | simulated peak GB | " + " | ".join(parts) + " | pinned host GB | H2D GB/step | D2H GB/step | "
             + " | ".join(f"est. ms {g} (bound)" for g in ESTIMATE_GPUS) + " |",
             "|" + "---|" * (len(parts) + 5 + len(ESTIMATE_GPUS))]
    for r in records:
        cells = [r["mode"], _fmt(r["simulated_peak_gb"])] + [_fmt(r["breakdown_gb"][k]) for k in parts]
        cells += [_fmt(r["pinned_host_gb"]), _fmt(r["h2d_gb_per_step"]), _fmt(r["d2h_gb_per_step"])]
        cells += [f"{_fmt(r['estimate_ms'][g]['step'])} ({r['estimate_ms'][g]['bound']})" for g in ESTIMATE_GPUS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nest. ms: a roofline estimate of one step at datasheet peaks (qzo2.simulate.estimate), not a "
                 f"measurement; a real step is slower.")
    return "\n".join(lines)


def _nxk(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a layer shape as NxK, e.g. 4096x4096") from None
    if n <= 0 or k <= 0 or k % 64:
        raise argparse.ArgumentTypeError(f"{text!r}: N and K must be positive and K a multiple of 64 (int4 g64)")
    return n, k


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
    kb.add_argument("--shape", action="append", metavar="NxK", type=_nxk,
                    help="layer shape, out x in features (repeatable; default 576x576, 1536x576, 576x1536)")
    args = p.parse_args(argv)
    if args.verb == "kernels":
        bench_kernels(args.rows, args.repeats, *([tuple(args.shape)] if args.shape else []))
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
