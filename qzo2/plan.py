"""`qzo2 plan`: will it fit? Each method's real GPU step simulated on fake tensors (qzo2.simulate) for a model shape.

For every method: the simulated peak device memory with the model resident and, for methods that stream, with
every decoder block streamed from host memory; the placement `qzo2 train` would take on a GPU of the given size
(resident when it fits, else streamed, else none); and the largest batch at the given sequence length, and the
longest sequence at batch 1, that fit. Fitting means peak + `reserve` <= gpu memory, where `reserve` stands for what
a real GPU adds to the simulated bytes: the CUDA context (~0.5 GB) and the caching allocator's rounding and cache.
"""
from __future__ import annotations

from dataclasses import dataclass

from .tracking import GB

SEQ_STEP = 256  # the longest-sequence search goes in steps of this many tokens
MAX_BATCH = 1024  # the largest-batch search stops here


@dataclass
class PlanRow:
    method: str
    placement: str  # "resident", "streamed" or "does not fit"
    mode: str  # the bench mode simulated for that placement
    peak_gb: float | None  # simulated peak at batch x seq with that placement
    resident_gb: float | None  # peak with the model resident
    streamed_gb: float | None  # peak with every block streamed (methods that stream), else None
    max_batch: int  # largest batch at seq that fits with that placement (0: none)
    max_seq: int  # longest seq (a multiple of SEQ_STEP, or seq itself) at batch 1 that fits (0: none)
    h2d_gb_per_step: float = 0.0
    pinned_host_gb: float = 0.0


def method_modes(methods=None, quantized: bool | None = None) -> dict[str, list[str]]:
    """method -> its bench modes, resident first (from the registry). `quantized`: only modes on that kind of model."""
    from .methods import registry

    out: dict[str, list[str]] = {}
    for mode, (spec, how) in registry.bench_modes().items():
        if methods and spec.name not in methods:
            continue
        if quantized is not None and how.quantized != quantized:
            continue
        out.setdefault(spec.name, []).append(mode)
    for name in out:
        out[name].sort(key=lambda m: registry.bench_modes()[m][1].offload)
    unknown = [m for m in (methods or ()) if m not in registry.names()]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(registry.names())}")
    return out


def _largest(peak_at, limit: float, start: int, cap: int) -> int:
    """The largest n in [start, cap] with peak_at(n) <= limit (peak_at grows with n), or 0. Peaks grow about
    linearly, so the line through the first two points predicts it; the simulation confirms it, and a bisection
    settles what the line missed."""
    cache: dict[int, float] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = peak_at(n)
        return cache[n] <= limit

    if not fits(start):
        return 0
    if start == cap or not fits(start + 1):
        return start
    lo, hi = start + 1, cap + 1  # fits(lo); hi does not fit, or is past the cap
    slope = cache[start + 1] - cache[start]
    guess = cap if slope <= 0 else min(cap, lo + int((limit - cache[lo]) // slope))
    if guess > lo:
        if not fits(guess):
            hi = guess
        elif guess == cap or not fits(guess + 1):
            return guess
        else:
            lo = guess + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def plan(model: str, methods=None, batch: int = 1, seq: int = 512, gpu_memory: str = "24GB", dtype: str = "bf16",
         bits: int = 4, group_size: int | None = None, reserve_gb: float = 1.0, search: bool = True,
         echo=None) -> list[PlanRow]:
    """One PlanRow per method (see the module doc). `model`: a named shape or a model directory (config.json only).
    A GPTQ directory's bits and group size are read from its config; it plans only the methods that train scales."""
    from quant.checkpoint import auto_group_size

    from .bench import check_shape, make_config
    from .config import parse_size
    from .model import DTYPES
    from .simulate import Simulation

    check_shape(model)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    config = make_config(model)
    quantized_dir = getattr(config, "quantization_config", None)
    if quantized_dir:
        q = quantized_dir if isinstance(quantized_dir, dict) else quantized_dir.to_dict()
        bits, group_size = int(q.get("bits", bits)), int(q.get("group_size", group_size or 128))
    group_size = auto_group_size(config) if group_size is None else group_size
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 0) or 1 << 17
    if seq > max_pos:
        raise ValueError(f"seq {seq} exceeds the model's {max_pos} positions; give --seq {max_pos} or less")
    limit = parse_size(gpu_memory) / GB - reserve_gb
    rows = []
    for method, modes in method_modes(methods, quantized=True if quantized_dir else None).items():
        peaks, chosen, best, longest = {}, None, 0, 0
        for mode in modes:  # resident first, then streamed: the placement train takes is the first that fits
            with Simulation(mode, model, DTYPES[dtype], bits, group_size) as sim:
                peaks[mode] = sim.measure(batch, seq)
                if chosen is None and (peaks[mode]["simulated_peak_gb"] <= limit or mode == modes[-1]):
                    chosen = mode
                    if peaks[mode]["simulated_peak_gb"] <= limit:
                        best = (_largest(lambda b: sim.measure(b, seq, 1)["simulated_peak_gb"], limit, 1,
                                         MAX_BATCH) if search else batch)
                        longest = (SEQ_STEP * _largest(lambda n: sim.measure(1, n * SEQ_STEP, 1)["simulated_peak_gb"],
                                                       limit, 1, max_pos // SEQ_STEP) if search else seq)
        rec = peaks[chosen]
        row = PlanRow(method, "does not fit" if rec["simulated_peak_gb"] > limit else
                      "resident" if chosen == modes[0] else "streamed", chosen, rec["simulated_peak_gb"],
                      peaks[modes[0]]["simulated_peak_gb"],
                      peaks[modes[-1]]["simulated_peak_gb"] if len(modes) > 1 else None,
                      best, longest, rec["h2d_gb_per_step"], rec["pinned_host_gb"])
        rows.append(row)
        if echo:
            echo(row)
    return rows


def format_plan(rows: list[PlanRow], model: str, batch: int, seq: int, gpu_memory: str, reserve_gb: float,
                dtype: str) -> str:
    lines = [f"qzo2 plan: {model}, batch {batch} x seq {seq}, {dtype}, on a {gpu_memory} GPU -- SIMULATED (fake "
             f"tensors running qzo2's GPU step; a real GPU adds its CUDA context and allocator cache, budgeted here as "
             f"{reserve_gb:g} GB)", "",
             "| method | placement | peak GB | resident GB | streamed GB | max batch @ seq | max seq @ batch 1 "
             "| H2D GB/step | pinned host GB |", "|" + "---|" * 9]

    def gb(v):
        return "-" if v is None else f"{v:.2f}"

    for r in rows:
        lines.append(f"| {r.method} | {r.placement} | {gb(r.peak_gb)} | {gb(r.resident_gb)} | {gb(r.streamed_gb)} | "
                     f"{r.max_batch or '-'} | {r.max_seq or '-'} | {gb(r.h2d_gb_per_step)} | {gb(r.pinned_host_gb)} |")
    lines += ["", "Quantized methods assume int4 codes as `qzo2 quantize` writes them; dense methods train the "
              "model's own weights. Streamed: every decoder block's codes (or weights) come from host memory each "
              "step; that host memory must be free (pinned host GB)."]
    return "\n".join(lines)
