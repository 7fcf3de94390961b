"""The GPU step without a GPU: qzo2's real step code on fake tensors, with every byte it keeps alive counted.

`fake_gpu()` runs a block of ordinary qzo2 code -- build a model, place it (resident or streamed), build a method,
take steps -- on PyTorch fake tensors (torch._subclasses.fake_tensor.FakeTensorMode): every tensor has its shape,
dtype and device but no data, so each op allocates exactly the outputs it would allocate on the GPU and nothing
is computed. `LiveBytes` counts them: the live bytes of every storage per device, from its creation to its last
reference, and their peak, which is what `torch.cuda.max_memory_allocated` reports for the same code on a GPU.
What a real GPU adds and this does not see: the CUDA context (~0.5 GB), the caching allocator's rounding and
reserve, and kernel workspaces (cuBLAS ~ tens of MB).

The stand-in for the GPU is a fake tensor on the `meta` device: on a CPU build of torch, fake `cuda` tensors cannot
be indexed (the Python binding takes a CUDA device guard) and autograd refuses them ("Cannot access accelerator
device when none is available"). `qzo2.gpu` makes that device the GPU for qzo2's own code, so every GPU branch is
taken: streams and events (no-ops), pinned host buffers (counted), the Triton dequant (its custom op's fake), no
CPU caches. Two choices torch makes per device are made here as CUDA makes them:
  - scaled_dot_product_attention: the flash kernel for fp16/bf16 without a mask, else memory-efficient attention
    (never the math path, which would keep a T x T score matrix per head);
  - a host read of a device scalar (`.item()`, `float(t)`, `bool(t)`; `aten._local_scalar_dense`) has no data to
    read: it is counted as a host synchronisation and answered with 1 (1.0, True), so the step goes on as if the
    loss were finite and nothing overflowed.
The tracker also records each device op's FLOPs and the bytes it reads and writes; `estimate` turns a step's into a
roofline time on a named GPU (an estimate, never a measurement).
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from . import gpu

aten = torch.ops.aten
STAND_IN = torch.device("meta")  # the simulated GPU's device (see the module doc)
_COPIES = {aten._to_copy.default, aten.copy_.default}
# ops that move no data on the device (besides views): reshapes of contiguous tensors, allocations, scalar reads
_NO_TRAFFIC = {aten._unsafe_view, aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty,
               aten.new_empty_strided, aten.detach, aten.lift_fresh, aten._local_scalar_dense}


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet peaks (dense, no sparsity) for the roofline estimate: tensor-core fp16/bf16 FLOP/s, plain fp32
    FLOP/s (torch's default: TF32 off for matmuls), memory bytes/s, host link bytes/s each way (PCIe x16)."""

    half_flops: float
    fp32_flops: float
    mem_bw: float
    link_bw: float


GPUS = {
    "h100-sxm": GPUSpec(989e12, 67e12, 3.35e12, 63e9),   # PCIe 5.0 x16
    "h200": GPUSpec(989e12, 67e12, 4.8e12, 63e9),
    "a100-80gb": GPUSpec(312e12, 19.5e12, 2.039e12, 31.5e9),  # PCIe 4.0 x16
    "rtx4090": GPUSpec(165.2e12, 82.6e12, 1.008e12, 31.5e9),
}
LAUNCH_S = 4e-6  # the least a kernel takes, launch to launch (an assumption, stated with the estimate)


def _tensors(tree):
    """Every tensor in a nested (tuple/list/dict) op argument or result."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


@dataclass
class Sync:
    """One host synchronisation the step made: a scalar read of a device tensor, or a device -> host copy."""

    kind: str  # "scalar" | "d2h"
    nbytes: int
    where: str  # the innermost qzo2 frame that asked for it (file:line function)


class LiveBytes(TorchDispatchMode):
    """Live storage bytes per device type, with their peaks, and what crosses between host and device.

    Every op's output storages are counted from creation until Python frees the last tensor or view of them
    (a weakref finalizer), so the live total at any moment is what the allocator would hold. `peak` and
    `peak_keys` (the storages alive at the device peak, to break it down) start over at `reset_peak()`.
    With `answer_scalars` (fake tensors) a scalar read is answered (see the module doc); on real tensors it runs.
    While `watching` is on, `created` lists every storage ops make: (device type, bytes, the qzo2 line)."""

    def __init__(self, device: torch.device, answer_scalars: bool = False):
        super().__init__()
        self.device = torch.device(device)
        self.answer_scalars = answer_scalars
        self.live: dict[int, tuple[int, str, int]] = {}  # storage key -> (bytes, device type, serial)
        self.now: Counter = Counter()
        self.peak: Counter = Counter()
        self.peak_keys: set[int] = set()  # serials of the device storages alive at the device peak
        self.serial = 0
        self.syncs: list[Sync] = []
        self.moved: Counter = Counter()  # "h2d" / "d2h" bytes
        self.created: list[tuple[str, int, str]] = []  # (device type, bytes, where) made while `watching`
        self.watching = False
        self.peak_where = ""  # the qzo2 line that allocated the device peak's last bytes
        self.op_costs: list[tuple[int, int, bool]] = []  # per device op: (FLOPs, bytes read + written, fp32 math)

    # ---- bookkeeping ---------------------------------------------------------------------------------------------
    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        nbytes, dev = st.nbytes(), t.device.type
        self.serial += 1
        self.live[key] = (nbytes, dev, self.serial)
        weakref.finalize(st, self._free, key, self.serial)
        self.now[dev] += nbytes
        if self.watching:
            self.created.append((dev, nbytes, _caller()))
        if self.now[dev] > self.peak[dev]:
            self.peak[dev] = self.now[dev]
            if dev == self.device.type:
                self.peak_keys = {s for n, d, s in self.live.values() if d == dev}
                self.peak_where = _caller()

    def _free(self, key: int, serial: int) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[2] == serial:
            del self.live[key]
            self.now[entry[1]] -= entry[0]

    def serial_of(self, t: torch.Tensor) -> int | None:
        entry = self.live.get(t.untyped_storage()._cdata)
        return None if entry is None else entry[2]

    def reset_peak(self) -> None:
        self.peak = Counter(self.now)
        self.peak_keys = {s for n, d, s in self.live.values() if d == self.device.type}
        self.syncs, self.moved, self.created, self.op_costs = [], Counter(), [], []

    def adopt(self, tensors) -> None:
        """Count tensors made before this tracker was entered (e.g. a model built outside it)."""
        for t in tensors:
            self._add(t)

    # ---- the dispatch hook ---------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = [t for t in _tensors(args) if t.device == self.device and self.device.type != "cpu"]
        if func is aten._local_scalar_dense.default:
            if on_device:
                self.syncs.append(Sync("scalar", args[0].element_size(), _caller()))
            if self.answer_scalars:
                dtype = args[0].dtype
                return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        if func is aten.equal.default:  # a bool read on the host, like a scalar
            if on_device:
                self.syncs.append(Sync("scalar", 1, _caller()))
            if self.answer_scalars:
                return True
        if self.answer_scalars and func in _DATA_SHAPED:  # output size depends on values: the largest it can be
            if on_device:
                self.syncs.append(Sync("shape", 0, _caller()))
            out = _DATA_SHAPED[func](*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if func in _COPIES:
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0] if func is aten.copy_.default else out
            nbytes = src.numel() * src.element_size()
            if src.device.type == "cpu" and dst.device.type != "cpu":
                self.moved["h2d"] += nbytes
            elif src.device.type != "cpu" and dst.device.type == "cpu":
                self.moved["d2h"] += nbytes
                if not (args[2] if func is aten.copy_.default and len(args) > 2 else kwargs.get("non_blocking")):
                    self.syncs.append(Sync("d2h", nbytes, _caller()))  # a blocking copy waits for the device
        for t in _tensors(out):
            self._add(t)
        if self.device.type != "cpu" and not func.is_view and func.overloadpacket not in _NO_TRAFFIC:
            self._cost(func, args, kwargs, out, on_device)
        return out

    def _cost(self, func, args, kwargs, out, on_device) -> None:
        """What one device op costs for the roofline estimate: its FLOPs (torch.utils.flop_counter's formulas:
        matmuls and attention; elementwise ops count as memory traffic only) and the bytes it reads and writes."""
        outs = [t for t in _tensors(out) if t.device == self.device]
        if not outs:  # no device tensor made or written (prim.device, sizes, a copy to the host: the link's)
            return
        nbytes = sum(t.numel() * t.element_size() for t in on_device) + sum(t.numel() * t.element_size() for t in outs)
        formula = flop_registry.get(func.overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        self.op_costs.append((flops, nbytes, (on_device or outs)[0].dtype == torch.float32))


def _unique_bound(x, sorted=True, return_inverse=False, return_counts=False):
    long = dict(dtype=torch.long, device=x.device)
    return (torch.empty(x.numel(), dtype=x.dtype, device=x.device),
            torch.empty(x.shape if return_inverse else (0,), **long), torch.empty(x.numel() if return_counts else 0, **long))


# ops whose output shape depends on the data (a host sync on a GPU too), answered with their largest output
_DATA_SHAPED = {
    aten._unique2.default: _unique_bound,
    aten.nonzero.default: lambda x: torch.empty(x.numel(), x.dim(), dtype=torch.long, device=x.device),
}


def _caller() -> str:
    """The innermost frame of qzo2 or quant code on the stack (what asked for a host sync)."""
    import sys

    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if ("/qzo2/" in name or "/quant/" in name) and not name.endswith("simulate.py"):
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "?"


@contextlib.contextmanager
def _cuda_kernel_choice():
    """scaled_dot_product_attention on the stand-in device picks the kernel CUDA would pick (see the module doc).
    The function itself is swapped while simulating, not intercepted by a TorchFunctionMode: autograd runs a
    backward without the caller's function modes, and a block recomputed inside backward (the streamed first-order
    modes, engine._Recompute) would take the math path there, with fp32 T x T scores."""
    original = F.scaled_dot_product_attention

    def attention(q, *args, **kwargs):
        if gpu.is_gpu(q.device):
            return _fused_attention(q, *args, **kwargs)
        return original(q, *args, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and k.shape[-3] != q.shape[-3]:  # grouped-query heads, expanded as the efficient kernel needs
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16):
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # the efficient kernel takes an additive bias
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~attn_mask, float("-inf"))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, grad, dropout_p, is_causal,
                                                        scale=scale)[0]


@contextlib.contextmanager
def fake_gpu(device=STAND_IN):
    """Run the block on fake tensors with `device` as the GPU (the default) or, with device "cpu", as the CPU path
    on fake tensors -> the LiveBytes tracker (enter it before building anything the count should include)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from quant.triton_kernels import assume_triton

    device = torch.device(device)
    tracker = LiveBytes(device, answer_scalars=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        if device.type != "cpu":
            stack.enter_context(gpu.simulating(device))
            stack.enter_context(assume_triton())
            stack.enter_context(_cuda_kernel_choice())
        stack.enter_context(tracker)
        yield tracker


@dataclass
class Breakdown:
    """The bytes alive at the device peak, by what they are."""

    weights: int = 0  # resident model tensors that are not trained: codes, zeros, embeddings, norms, lm_head
    trained: int = 0  # the trained tensors (scales, or weights) themselves
    state: int = 0  # method state: optimizer moments, masters, masks
    slots: int = 0  # the streamer's device slots
    activations: int = 0  # everything else: activations, gradients, temporaries
    other: dict = field(default_factory=dict)

    def as_gb(self) -> dict:
        from .tracking import GB

        return {k: round(getattr(self, k) / GB, 4) for k in ("weights", "trained", "state", "slots", "activations")}


def breakdown(tracker: LiveBytes, model, method=None, streamer=None) -> Breakdown:
    """Split the device peak (tracker.peak_keys) into Breakdown's kinds, by which object holds each storage now."""
    kinds: dict[int, str] = {}

    def mark(tensors, kind):
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == tracker.device.type:
                s = tracker.serial_of(t)
                if s is not None:
                    kinds.setdefault(s, kind)

    if streamer is not None:
        mark(streamer.slots, "slots")
    if method is not None:
        mark([t.tensor for t in method.targets], "trained")
        mark(method.state_tensors().values(), "state")
        for opt in _optimizers(method):
            mark([v for st in opt.state.values() for v in st.values()], "state")
    mark(list(model.parameters()) + list(model.buffers()), "weights")
    sizes = {s: n for n, d, s in tracker.live.values()}
    out = Breakdown()
    total = 0
    for s in tracker.peak_keys:
        kind = kinds.get(s, "activations")
        n = sizes.get(s)
        if n is None:  # freed since the peak: a temporary
            continue
        setattr(out, kind, getattr(out, kind) + n)
        total += n
    out.activations += tracker.peak[tracker.device.type] - total  # storages freed since the peak
    return out


def _optimizers(method) -> list:
    found = []
    for v in vars(method).values() if method is not None else ():
        if isinstance(v, torch.optim.Optimizer):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found += [x for x in v if isinstance(x, torch.optim.Optimizer)]
    return found


class Simulation:
    """One bench mode's model, placement and method (bench.build_mode: what `qzo2 bench` times) built once on fake
    tensors; `measure(batch, seq)` takes `steps` steps on a random batch of that size and says what they needed.
    Use as a context manager (the fake-tensor mode stays on while it is open)."""

    def __init__(self, mode: str, shape, dtype: torch.dtype = torch.bfloat16, bits: int = 4, group_size: int = 128,
                 depth: int = 2, device=STAND_IN, seed: int = 0, steps: int = 2):
        self.args = (mode, shape, dtype, bits, group_size, depth, torch.device(device), seed)
        self.steps = steps
        self._stack = contextlib.ExitStack()
        self.run = None

    def __enter__(self):
        from .bench import build_mode

        mode, shape, dtype, bits, group_size, depth, device, seed = self.args
        self.tracker = self._stack.enter_context(fake_gpu(device))
        try:
            self.run = build_mode(mode, shape, 1, device, dtype, bits, group_size, depth, seed, seq=2)
        except BaseException:
            self._stack.close()
            raise
        self.resident = self.tracker.now[device.type]
        return self

    def __exit__(self, *exc):
        self.run = None
        self._stack.close()

    def measure(self, batch: int, seq: int, steps: int | None = None) -> dict:
        """Peak live device bytes over `steps` steps at batch x seq (what max_memory_allocated would say after the
        model was built), their breakdown at the peak, pinned host bytes, and the last step's H2D/D2H bytes and host
        synchronisations. The method's state persists between calls (as it does between a run's steps), so after
        the first call one step (`steps` 1) already holds all of it."""
        from .bench import random_batch
        from .tracking import GB

        mode, shape, dtype, bits, group_size, depth, device, seed = self.args
        run, tracker, dev = self.run, self.tracker, device.type
        run.data = random_batch(run.model.config.vocab_size, batch, seq, device, seed)
        tracker.reset_peak()
        moved, syncs = Counter(), []
        for i in range(self.steps if steps is None else steps):
            before, n_syncs, n_ops = Counter(tracker.moved), len(tracker.syncs), len(tracker.op_costs)
            run.step(i)
            moved, syncs, ops = Counter(tracker.moved) - before, tracker.syncs[n_syncs:], tracker.op_costs[n_ops:]
        parts = breakdown(tracker, run.model, run.method, run.streamer)
        pinned = 0
        if gpu.is_gpu(device):
            if run.streamer is not None:
                pinned += run.streamer.stats["host_bytes"]
            pinned += sum(v.numel() * v.element_size() for opt in _optimizers(run.method)
                          for st in opt.state.values() for v in st.values()
                          if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dim())  # not step counts
        return {"simulated": True, "simulated_peak_gb": tracker.peak[dev] / GB,
                "resident_gb": self.resident / GB, "breakdown_gb": parts.as_gb(), "pinned_host_gb": pinned / GB,
                "host_peak_gb": tracker.peak["cpu"] / GB,
                "h2d_gb_per_step": moved["h2d"] / GB, "d2h_gb_per_step": moved["d2h"] / GB,
                "host_syncs": [f"{s.kind} {s.where}" for s in syncs], "peak_at": tracker.peak_where,
                "streamed_blocks": run.streamer.stats["streamed_blocks"] if run.streamer else 0,
                "device_ops_per_step": len(ops), "tflop_per_step": sum(o[0] for o in ops) / 1e12,
                "hbm_gb_per_step": sum(o[1] for o in ops) / GB,
                "estimate_ms": {name: estimate(ops, moved["h2d"], moved["d2h"], spec) for name, spec in GPUS.items()}}


def estimate(ops, h2d_bytes: int, d2h_bytes: int, spec: GPUSpec) -> dict:
    """A roofline estimate of one step (ms), never a measurement: each device op takes the longest of its FLOPs at
    the datasheet peak for its precision, its bytes at the memory bandwidth, and LAUNCH_S; the host link moves the
    step's H2D and D2H bytes at its peak, each way at once, behind the compute (the streamer prefetches), so the step
    takes the longer of the two. Peaks are never reached and the host's own op dispatch is not counted, so a real
    step is slower; what the estimate says is which bound a mode hits (`bound`: compute, memory, launch or link)."""
    by = Counter()
    for flops, nbytes, fp32 in ops:
        t = {"compute": flops / (spec.fp32_flops if fp32 else spec.half_flops), "memory": nbytes / spec.mem_bw,
             "launch": LAUNCH_S}
        kind = max(t, key=t.get)
        by[kind] += t[kind]
    device = sum(by.values())
    link = max(h2d_bytes, d2h_bytes) / spec.link_bw
    bound = "link" if link > device else max(by, key=by.get) if by else "launch"
    ms = {"step": max(device, link), "device": device, "link": link, **{k: by[k] for k in ("compute", "memory", "launch")}}
    return {**{k: round(1e3 * v, 3) for k, v in ms.items()}, "bound": bound}


def simulate_mode(mode: str, shape, batch: int, seq: int, dtype: torch.dtype = torch.bfloat16, bits: int = 4,
                  group_size: int = 128, depth: int = 2, steps: int = 2, device=STAND_IN, seed: int = 0) -> dict:
    """Simulation(...).measure(batch, seq) for one size."""
    with Simulation(mode, shape, dtype, bits, group_size, depth, device, seed, steps) as sim:
        return sim.measure(batch, seq)
