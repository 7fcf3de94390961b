"""The offload engine: decoder blocks stream from host memory into a fixed pool of device slots, once per forward.

Two kinds of block stream:
  - "codes" (QZO): the `qweight` (int32, GPTQ-packed) and `zeros` (int16) of every QuantLinear. Read-only: the
    trained scales stay resident, so nothing is ever copied back.
  - "weights" (ZO2 mode: full-weight ZO of a bf16 model): every parameter of every nn.Linear, in the model's dtype
    (bf16: 2 bytes/weight cross PCIe each way). The update of step t is deferred (`defer`) and applied on the
    device when the block arrives for step t+1's forward, right before it computes; only then are the trained
    tensors copied back, on a second side stream, overlapped with the compute. One upload and one download per
    block per step, as ZO2 (arXiv 2503.12668) does.
For every streamed block, its tensors sit in one contiguous host buffer (pinned when the device is CUDA), at aligned
byte offsets. `depth` (>= 2) device slots, each the size of the largest streamed block, receive them: the k-th
streamed block uses slot k % depth. Hooks around the decoder layers (no rewritten forwards, so any HF family works)
drive it:
  - before block k computes, uploads of streamed blocks k .. k+depth-1 have been issued, on a side stream;
  - the upload into a slot waits (CUDA event) for the compute that last read that slot;
  - the compute of block k waits (CUDA event) for its own upload (and, in weights mode, a pending update runs
    first and the download of the updated tensors waits for it);
  - the upload into a slot also waits for the download that last read it. The host never synchronizes per block.
First-order training streams codes through backward too (`backward=True`): every decoder block is checkpointed
(`checkpoint_blocks`: its forward keeps only its input), and backward walks the blocks in reverse, uploading each
block's codes again (prefetched `depth` ahead in reverse order), recomputing its forward and back-propagating
through it, so each block's codes cross twice per step (forward order, then reverse) and never come back.
During its forward a block's layers see their streamed tensors as views into its slot; the rest of the time they
are views into the host buffer (the authoritative copy, e.g. for checkpoints; `flush()` first applies any deferred
update). Scales, g_idx, QuantLinear biases, norms, embeddings, the final norm and lm_head stay resident on the
device. A dual forward (2k perturbation chunks in one batch) uploads each block once. On the CPU the same code runs
with plain synchronous copies and no events, and `trace` records the (op, block, slot) order the tests check.
"""
from __future__ import annotations

import itertools
import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from quant.checkpoint import decoder_blocks
from quant.linear import QuantLinear

from . import gpu
from .config import parse_size

ALIGN = 128  # byte alignment of each tensor inside a block buffer (any dtype view is legal, loads are coalesced)
STREAMED = ("qweight", "zeros")  # the per-layer buffers that stream; g_idx is K int32s per layer and stays resident
OFFLOAD_MODES = ("auto", "on", "off")
KINDS = ("codes", "weights")


@dataclass
class _Entry:
    """One layer tensor inside its block's host buffer / slot."""

    layer: nn.Module
    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple
    trained: bool = False


def _streamed_tensors(block: nn.Module, kind: str) -> list[tuple[nn.Module, str]]:
    """(module, name) of the tensors of a block that stream: "codes" -> qweight/zeros of every QuantLinear;
    "weights" -> every parameter of every nn.Linear."""
    if kind not in KINDS:
        raise ValueError(f"stream kind {kind!r} is not one of {', '.join(KINDS)}")
    out = []
    for m in block.modules():
        if kind == "codes" and isinstance(m, QuantLinear):
            out += [(m, name) for name in STREAMED]
        elif kind == "weights" and isinstance(m, nn.Linear):
            out += [(m, name) for name, p in m.named_parameters(recurse=False)]
    return out


def _layout(block: nn.Module, kind: str = "codes", trained: set = frozenset()) -> tuple[list[_Entry], int]:
    """The streamed tensors of a block at aligned offsets -> (entries, bytes of the buffer). `trained` holds the
    (id(module), name) keys whose updates must be copied back."""
    entries, end = [], 0
    for m, name in _streamed_tensors(block, kind):
        t = getattr(m, name)
        start = -(-end // ALIGN) * ALIGN
        entries.append(_Entry(m, name, start, t.numel() * t.element_size(), t.dtype, tuple(t.shape),
                              (id(m), name) in trained))
        end = start + entries[-1].nbytes
    return entries, end


def _set(e: _Entry, t: torch.Tensor) -> None:
    """Point entry e's layer attribute at tensor t (a parameter stays a Parameter; derived layouts are dropped)."""
    if e.name in e.layer._parameters:
        e.layer._parameters[e.name] = nn.Parameter(t, requires_grad=False)
    else:
        setattr(e.layer, e.name, t)
    if isinstance(e.layer, QuantLinear):
        e.layer._packed = None  # CPU int4pack layout derived from the codes
        e.layer._cached_base = None


def _move(model: nn.Module, device: torch.device) -> None:
    """model.to(device), tensor by tensor: only those elsewhere move, each tied tensor once. (module.to swaps
    tensor objects when they are fake tensors (qzo2.simulate), which fails for any that is weakly referenced.)"""
    moved = {}
    for m in model.modules():
        changed = False
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None or t.device == device:
                    continue
                if id(t) not in moved:
                    new = t.detach().to(device)
                    moved[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
                table[name] = moved[id(t)]
                changed = True
        if changed and isinstance(m, QuantLinear):
            m._reset_caches()


def _view(buf: torch.Tensor, e: _Entry) -> torch.Tensor:
    """The typed tensor of entry `e` inside a uint8 buffer."""
    return buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of a model, each storage once (tied weights count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.numel() and gpu.storage_key(t) not in seen:
            seen.add(gpu.storage_key(t))
            total += t.numel() * t.element_size()
    return total


def _host_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """An uninitialized uint8 host buffer -> (buffer, registered). With `pin` it is page-locked in place
    (cudaHostRegister): torch's pinned allocator rounds every allocation up to a power of two, +26% for a
    Llama-2-7B bf16 block and +61% at 13B. If registration fails, that allocator is the fallback."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or not nbytes:
        return buf, False
    if gpu.host_register(buf):
        return buf, True
    return gpu.pinned(buf), False


def _unregister(buffers: list) -> None:
    """Undo _host_buffer's registration (the list keeps the memory alive until then)."""
    for buf in buffers:
        gpu.host_unregister(buf)
    buffers.clear()


# ---- residency -------------------------------------------------------------------------------------------------------
def plan_residency(block_bytes: list[int], resident_bytes: int, budget_bytes: int | None, depth: int,
                   mode: str = "auto") -> set[int]:
    """Which decoder blocks to stream -> set of block indices. "off": none; "on": all; "auto": the fewest last blocks
    such that resident_bytes + the resident blocks + `depth` slots (each the largest streamed block) fit in
    budget_bytes; none when everything fits or there is no budget; all when even that does not fit.
    The last blocks are the streamed ones, so their first uploads overlap the compute of the resident blocks."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload mode {mode!r} is not one of {', '.join(OFFLOAD_MODES)}")
    if depth < 2:
        raise ValueError(f"prefetch depth must be >= 2 (got {depth})")
    n = len(block_bytes)
    if mode == "off" or n == 0:
        return set()
    if mode == "on":
        return set(range(n))
    if budget_bytes is None:
        return set()
    for k in range(n + 1):  # k = number of streamed blocks
        slots = depth * max(block_bytes[n - k:]) if k else 0
        if resident_bytes + sum(block_bytes[:n - k]) + slots <= budget_bytes:
            return set(range(n - k, n))
    return set(range(n))


def device_budget(gpu_memory: str, device: torch.device) -> int | None:
    """The byte budget for the model on `device`: `gpu_memory` parsed ("8GiB"), else 90% of a CUDA device's free
    memory (the rest is left for activations), else None (CPU with no budget: nothing needs streaming)."""
    if gpu_memory:
        return parse_size(gpu_memory)
    free = gpu.free_bytes(device) if gpu.is_gpu(device) else None
    return None if free is None else int(free * 0.9)


def plan_for_model(model: nn.Module, budget_bytes: int | None, depth: int, mode: str = "auto",
                   kind: str = "codes") -> set[int]:
    """plan_residency for a model's decoder blocks (their streamable bytes against everything else)."""
    _, blocks = decoder_blocks(model)
    layouts = [_layout(b, kind) for b in blocks]
    block_bytes = [nbytes for _, nbytes in layouts]
    if not any(block_bytes):
        return set()  # nothing of this kind to stream (e.g. codes of an unquantized model)
    streamable = sum(e.nbytes for entries, _ in layouts for e in entries)
    return plan_residency(block_bytes, _tensor_bytes(model) - streamable, budget_bytes, depth, mode)


# ---- checkpointed blocks (first-order backward) -----------------------------------------------------------------------
class _Call:
    """One checkpointed call of a decoder block: its forward with the call's other arguments, and the streamer that
    must bring its codes back before it recomputes (None when it is resident)."""

    def __init__(self, block: nn.Module, forward, args, kwargs, streamer):
        self.block, self.forward, self.args, self.kwargs, self.streamer = block, forward, args, kwargs, streamer
        self.rest = None  # what a block returning a tuple returns beside the hidden states

    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.forward(hidden, *self.args, **self.kwargs)
        if isinstance(out, tuple):
            out, self.rest = out[0], out[1:]
        return out


class _Recompute(torch.autograd.Function):
    """A decoder block that keeps only its input between forward and backward (activation checkpointing at block
    boundaries, in the reentrant form: the recomputed forward is back-propagated by a nested backward inside this
    node's, which lets the streamer bind the block's codes around exactly that). The block's trained tensors get
    their gradients from the nested backward (where LOMO's fused update hooks run); `anchor`, an empty tensor that
    requires grad, is an input only so that autograd reaches this node when the hidden states need no gradient
    (the trained tensors themselves as inputs would have their hooks run a second time, with no gradient).
    The model trains in eval mode (no dropout), so the recomputation is the same computation as the forward."""

    @staticmethod
    def forward(ctx, call: _Call, hidden: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.call = call
        ctx.save_for_backward(hidden)
        return call.run(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (hidden,) = ctx.saved_tensors
        call = ctx.call
        if call.streamer is not None:
            call.streamer._bind_backward(call.block.qzo2_index)
        try:
            with torch.enable_grad():
                h = hidden.detach().requires_grad_(ctx.needs_input_grad[1])
                out = call.run(h)
            torch.autograd.backward(out, grad)
        finally:
            if call.streamer is not None:
                call.streamer._release_backward(call.block.qzo2_index)
        return None, h.grad if ctx.needs_input_grad[1] else None, None


def _needs_grad(block: nn.Module) -> bool:
    """Does any parameter or buffer of the block require grad (a quantized model's scales are buffers)?"""
    return any(t.requires_grad for t in itertools.chain(block.parameters(), block.buffers()))


def _flat_tensors(tree) -> list[torch.Tensor]:
    """The tensors in nested lists, tuples and dicts (a block's call arguments)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for x in tree for t in _flat_tensors(x)]
    return []


_CACHES = ("cache", "past_key_values", "past_key_value", "layer_past")  # the names HF families have used


def checkpoint_blocks(model: nn.Module, streamer=None) -> None:
    """Checkpoint every decoder block: under grad, its forward keeps only its input, and backward recomputes it (see
    _Recompute), with `streamer` (a BlockStreamer) binding the codes of the blocks it streams around each
    recomputation. Installed as an instance `forward` of each block, which calls the block's own, so any HF family
    works and the module's hooks still run around it in the forward; `uncheckpoint_blocks` takes it off."""
    uncheckpoint_blocks(model)
    _, blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        own = block.forward

        def forward(hidden_states, *args, _block=block, _own=own, **kwargs):
            if not torch.is_grad_enabled() or not (hidden_states.requires_grad or _needs_grad(_block)):
                return _own(hidden_states, *args, **kwargs)
            # no KV cache under a checkpointed block (as HF's gradient checkpointing): the recomputation would read
            # this forward's keys and values back from it, and they carry no gradient
            kwargs = {k: (None if k in _CACHES else False if k == "use_cache" else v) for k, v in kwargs.items()}
            if any(t.requires_grad for t in _flat_tensors((args, kwargs))):
                raise RuntimeError("a checkpointed decoder block got an argument that requires grad besides its "
                                   "hidden states; turn gradient_checkpointing off (and offload off)")
            call = _Call(_block, _own, args, kwargs, streamer)
            anchor = torch.empty(0, device=hidden_states.device, requires_grad=True)
            out = _Recompute.apply(call, hidden_states, anchor)
            if streamer is not None:
                streamer._recomputes = True
            return out if call.rest is None else (out, *call.rest)

        block.qzo2_index = i
        block.forward = forward
    model.qzo2_checkpointed = True


def uncheckpoint_blocks(model: nn.Module) -> None:
    """Undo checkpoint_blocks (the blocks' own forwards again)."""
    if not getattr(model, "qzo2_checkpointed", False):
        return
    for block in decoder_blocks(model)[1]:
        block.__dict__.pop("forward", None)
    model.qzo2_checkpointed = False


# ---- the streamer ----------------------------------------------------------------------------------------------------
class BlockStreamer:
    """Streams decoder blocks `streamed` of `model` into `depth` slots on `device` (see module doc).

    kind "codes" streams QuantLinear codes; kind "weights" streams nn.Linear parameters, and `trained` (objects with
    `.module` and `.name`, e.g. methods.Target) names those whose deferred updates are applied and copied back.
    Construction packs the streamed tensors into host buffers, points the layers at views of them, moves the rest
    of the model to `device`, allocates the slots and installs the hooks. `stats` counts uploads, downloads and
    bytes; with `trace=True`, `trace` lists ("upload" | "compute" | "update" | "download" | "release", block index,
    slot) in the order they were issued ("recompute": a block bound again in backward). With `backward` (first-order
    training of a quantized model) every block is checkpointed and its codes stream again, in reverse, through
    backward (module doc). The streamer attaches itself as `model.qzo2_streamer`; `remove()` makes
    the model fully resident again. Do not move or cast the model while a streamer is attached."""

    def __init__(self, model: nn.Module, device, streamed, depth: int = 2, trace: bool = False, kind: str = "codes",
                 trained=(), backward: bool = False):
        if depth < 2:
            raise ValueError(f"prefetch depth must be >= 2 (got {depth})")
        if backward and kind != "codes":
            raise ValueError("streaming through backward is for a quantized model's codes: a dense model's trained "
                             "weights would have to travel back every step")
        self.model, self.device, self.depth = model, gpu.indexed(device), depth
        self.cuda = gpu.is_gpu(self.device)
        _, self.blocks = decoder_blocks(model)
        bad = [b for b in streamed if not 0 <= b < len(self.blocks)]
        if bad:
            raise ValueError(f"block {bad[0]} does not exist (the model has {len(self.blocks)} decoder blocks)")
        by_key = {(id(t.module), t.name): t for t in trained}
        layouts = {b: _layout(self.blocks[b], kind, by_key.keys()) for b in sorted(streamed)}
        self.order = [b for b, (_, nbytes) in layouts.items() if nbytes]  # blocks that stream, in forward order
        self.pos = {b: p for p, b in enumerate(self.order)}
        self.entries = [layouts[b][0] for b in self.order]
        self.streamed_keys = {(id(e.layer), e.name) for es in self.entries for e in es}
        self.trained_at = [[by_key[id(e.layer), e.name] for e in es if e.trained] for es in self.entries]
        self._registered: list[torch.Tensor] = []
        self.host = [self._pack(p) for p in range(len(self.order))]
        self._unpin = weakref.finalize(self, _unregister, self._registered)  # at remove() or when collected
        trivial = {e.layer: not e.layer.act_order for es in self.entries for e in es
                   if isinstance(e.layer, QuantLinear)}  # computed here, on the host, not per forward
        _move(model, self.device)  # the streamed tensors are empty placeholders now: only the rest moves
        for m, t in trivial.items():
            m._trivial = t
        for p in range(len(self.order)):
            self._park(p)
        slot_bytes = max((h.numel() for h in self.host), default=0)
        n_slots = min(depth, len(self.order))  # with fewer streamed blocks than depth, slot p % depth = p
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        self.stream = gpu.new_stream(self.device) if self.cuda else None  # uploads
        self.down = gpu.new_stream(self.device) if self.cuda else None  # downloads (the other copy engine)
        self._uploaded = [None] * depth  # per slot: CUDA event recorded after its latest upload
        self._released = [None] * depth  # per slot: CUDA event recorded after the latest compute that read it
        self._downloaded = [None] * depth  # per slot: CUDA event recorded after the latest download from it
        self._pending: list[list] = [[] for _ in self.order]  # per position: deferred updates, oldest first
        self._next = 0  # next streamed position to upload in this pass
        self._expect = 0  # next streamed position expected to compute
        self._dir = 1  # the pass's order: 1 forward, -1 backward
        self._recomputes = False  # this forward's streamed blocks will recompute in backward
        self._bound: set[int] = set()
        self.trace: list[tuple[str, int, int]] | None = [] if trace else None
        self.stats = {"kind": kind, "streamed_blocks": len(self.order), "blocks": len(self.blocks), "depth": depth,
                      "slots": n_slots, "slot_bytes": slot_bytes, "host_bytes": sum(h.numel() for h in self.host),
                      "uploads": 0, "h2d_bytes": 0, "downloads": 0, "d2h_bytes": 0}
        self._handles = []
        for b in sorted(set(self.order) | {0}):  # block 0 starts every forward, streamed or not
            self._handles.append(self.blocks[b].register_forward_pre_hook(lambda mod, args, b=b: self._pre(b)))
        for b in self.order:
            self._handles.append(self.blocks[b].register_forward_hook(lambda mod, args, out, b=b: self._post(b)))
        model.qzo2_streamer = self  # how the trainer finds it (trainer.apply_step_update, flush)
        self.backward = backward
        if backward:
            checkpoint_blocks(model, self)

    def _pack(self, p: int) -> torch.Tensor:
        """Host buffer of streamed position p (pinned for CUDA); the layers' own copies are dropped."""
        entries = self.entries[p]
        buf, registered = _host_buffer(entries[-1].offset + entries[-1].nbytes, self.cuda)
        if registered:
            self._registered.append(buf)
        for e in entries:
            _view(buf, e).copy_(getattr(e.layer, e.name))
            if isinstance(e.layer, QuantLinear):
                e.layer.cache_base = False  # a cached codes-minus-zeros would be a full-precision resident copy
            _set(e, torch.empty(0, dtype=e.dtype, device=self.device))
        return buf

    def _park(self, p: int) -> None:
        """Point streamed position p's layers at their host copies."""
        for e in self.entries[p]:
            _set(e, _view(self.host[p], e))

    # ---- ordering --------------------------------------------------------------------------------------------------
    def _record(self, p: int, op: str) -> None:
        if self.trace is not None:
            self.trace.append((op, self.order[p], p % self.depth))

    def _upload(self, p: int) -> None:
        """Copy streamed position p's host buffer into its slot, after the slot's last reader is done."""
        s, host = p % self.depth, self.host[p]
        dst = self.slots[s][:host.numel()]
        if self.cuda:
            with gpu.use_stream(self.stream):
                for ev in (self._released[s], self._downloaded[s]):
                    if ev is not None:
                        self.stream.wait_event(ev)
                dst.copy_(host, non_blocking=True)
                self._uploaded[s] = self._uploaded[s] or gpu.new_event()
                self._uploaded[s].record(self.stream)
        else:
            dst.copy_(host)
        self.stats["uploads"] += 1
        self.stats["h2d_bytes"] += host.numel()
        self._record(p, "upload")

    def _download(self, p: int) -> None:
        """Copy streamed position p's trained tensors from its slot back into the host buffer, after the update
        that wrote them (queued on the compute stream) and overlapped with the block's compute."""
        s = p % self.depth
        pairs = [(_view(self.host[p], e), _view(self.slots[s], e)) for e in self.entries[p] if e.trained]
        if self.cuda:
            written = gpu.current_stream(self.device).record_event()
            with gpu.use_stream(self.down):
                self.down.wait_event(written)
                for host, dev in pairs:
                    host.copy_(dev, non_blocking=True)
                self._downloaded[s] = self._downloaded[s] or gpu.new_event()
                self._downloaded[s].record(self.down)
        else:
            for host, dev in pairs:
                host.copy_(dev)
        self.stats["downloads"] += 1
        self.stats["d2h_bytes"] += sum(h.numel() * h.element_size() for h, _ in pairs)
        self._record(p, "download")

    def _issue(self, upto: int) -> None:
        """Issue uploads up to streamed position `upto` in the pipeline's direction (the slots they need have been
        released)."""
        while 0 <= self._next < len(self.order) and (self._next - upto) * self._dir <= 0:
            self._upload(self._next)
            self._next += self._dir

    def _begin(self, p: int, direction: int = 1) -> None:
        """Start streaming at position p, in forward order (direction 1) or in reverse (-1, backward); release
        anything a pass cut short left bound."""
        for q in sorted(self._bound):
            self._release(q)
        self._dir = direction
        self._next = self._expect = p
        self._issue(p + direction * (self.depth - 1))

    def _bind(self, p: int) -> None:
        """Wait for position p's upload, point its layers at the slot, and apply its deferred updates there."""
        self._issue(p + self._dir * (self.depth - 1))  # slot of p + depth - 1 was freed when p - 1 released
        s = p % self.depth
        if self.cuda:
            gpu.current_stream(self.device).wait_event(self._uploaded[s])
        for e in self.entries[p]:
            _set(e, _view(self.slots[s], e))
        self._bound.add(p)
        if self._pending[p]:
            for update in self._pending[p]:
                update(self.trained_at[p])
            self._pending[p] = []
            self._record(p, "update")
            self._download(p)

    def _release(self, p: int) -> None:
        """After streamed position p computed: mark its slot reusable and point its layers at the host copies."""
        s = p % self.depth
        if self.cuda:
            self._released[s] = self._released[s] or gpu.new_event()
            self._released[s].record(gpu.current_stream(self.device))
        self._park(p)
        self._bound.discard(p)
        self._record(p, "release")

    def _pre(self, b: int) -> None:
        """Before decoder block b: start the forward at block 0; for a streamed block, prefetch, wait, bind."""
        if b == 0:
            self._begin(0)
            self._recomputes = False
        p = self.pos.get(b)
        if p is None:
            return
        if p != self._expect or self._dir != 1:  # blocks ran out of the expected order: restart the pipeline here
            self._begin(p)
        self._bind(p)
        self._record(p, "compute")

    def _post(self, b: int) -> None:
        p = self.pos[b]
        if p in self._bound:
            self._release(p)
        self._expect = p + 1
        if self._recomputes and p == len(self.order) - 1:
            # a forward whose blocks backward will recompute: the last blocks start back up at once, in reverse,
            # overlapped with the LM head's forward and backward
            self._begin(p, -1)

    # ---- backward (first-order training: `backward=True`) ----------------------------------------------------------
    def _bind_backward(self, b: int) -> None:
        """Before decoder block b recomputes in backward: its codes in their slot, the blocks below prefetched."""
        p = self.pos.get(b)
        if p is None:
            return
        if p != self._expect or self._dir != -1:
            self._begin(p, -1)
        self._bind(p)
        self._record(p, "recompute")

    def _release_backward(self, b: int) -> None:
        p = self.pos.get(b)
        if p is None:
            return
        if p in self._bound:
            self._release(p)
        self._expect = p - 1

    # ---- deferred updates (weights mode) ---------------------------------------------------------------------------
    def defer(self, update) -> None:
        """Run `update(targets)` (in place, on the device) on each streamed block's trained targets when the block
        next arrives, before it computes; the result is then copied back to the host buffer."""
        for p, targets in enumerate(self.trained_at):
            if targets:
                self._pending[p].append(update)

    def flush(self) -> None:
        """Apply every deferred update now (stream each pending block through: upload, update, download) and wait
        for the downloads, so the host copies -- what the layers point at between forwards -- are current."""
        todo = [p for p, pending in enumerate(self._pending) if pending]
        if todo:
            self._begin(todo[0])
            for p in range(todo[0], todo[-1] + 1):  # pipelined like a forward
                self._bind(p)
                self._release(p)
            self._expect = 0
        if self.cuda:
            self.down.synchronize()

    # ---- teardown --------------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Apply deferred updates, remove the hooks and make every streamed tensor resident on the device again."""
        self.flush()
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.backward:
            uncheckpoint_blocks(self.model)
        if self.cuda:
            gpu.current_stream(self.device).wait_stream(self.stream)
        for p, entries in enumerate(self.entries):
            for e in entries:
                _set(e, _view(self.host[p], e).to(self.device, copy=True))
        self._bound.clear()
        self.slots = []
        if self.cuda:
            gpu.synchronize(self.device)  # the copies back to the device read the host buffers
        self._unpin()
        self.model.qzo2_streamer = None


# ---- placing a model (train, eval and bench) -------------------------------------------------------------------------
def place_model(model, device, offload: str = "auto", gpu_memory: str = "", prefetch_depth: int = 2, targets=(),
                first_order: bool = False, checkpoint: bool = False) -> BlockStreamer | None:
    """Move the model to `device`, streaming the decoder blocks that offload/gpu_memory say do not fit: their codes
    for a quantized model; for a dense one their Linear weights, `targets` among them trained with deferred updates
    (ZO2 mode) -> the streamer, also kept as `model.qzo2_streamer`, or None when everything is resident.
    `first_order`: the codes also stream through backward (every block checkpointed); a dense model's weights
    cannot (its trained weights would travel back every step), so such a plan is refused. `checkpoint`: checkpoint
    every decoder block of a resident model too (gradient checkpointing)."""
    kind = "codes" if any(isinstance(m, QuantLinear) for m in model.modules()) else "weights"
    streamed = plan_for_model(model, device_budget(gpu_memory, device), prefetch_depth, offload, kind)
    if streamed and first_order and kind != "codes":
        raise ValueError(f"{'offload=on' if offload == 'on' else 'the model does not fit gpu_memory and'} streams "
                         f"the decoder blocks of a dense model, which works for zeroth-order training only: "
                         f"first-order training streams a quantized model's codes (run `qzo2 quantize` first, or "
                         f"offload=off with more gpu_memory)")
    streamer = (BlockStreamer(model, device, streamed, prefetch_depth, kind=kind, trained=targets,
                              backward=first_order) if streamed else None)
    if streamer is None:
        model.to(device)
        model.qzo2_streamer = None
        if checkpoint:
            checkpoint_blocks(model)
    return streamer


def placement(model) -> dict:
    """Where the model runs, for the first metrics line: device and decoder blocks streamed."""
    streamer = getattr(model, "qzo2_streamer", None)
    out = {"device": str(model.get_input_embeddings().weight.device)}
    if streamer is not None:
        out.update(streamed_blocks=streamer.stats["streamed_blocks"], blocks=streamer.stats["blocks"],
                   prefetch_depth=streamer.depth)
    else:
        out.update(streamed_blocks=0)
    return out


def set_cache_base(mode: str, layers, device) -> None:
    """cache_base on/off/auto for QuantLinears computing on `device`: keep codes-minus-zeros unpacked (4 B/weight)
    so the CPU torch backend skips unpacking every forward; auto = when that takes less than a quarter of host RAM.
    Always off on a GPU, where the Triton kernel dequantizes on the fly."""
    need = sum(m.in_features * m.out_features * 4 for m in layers)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    on = torch.device(device).type == "cpu" and (mode == "on" or (mode == "auto" and need < ram / 4))
    for m in layers:
        m.cache_base = on
