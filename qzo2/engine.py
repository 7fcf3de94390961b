"""The offload engine: the codes of decoder blocks stream from host memory into a fixed pool of device slots.

For every streamed block, the `qweight` (int32, GPTQ-packed) and `zeros` (int16) of all its QuantLinears sit in one
contiguous host buffer (pinned when the device is CUDA), at aligned byte offsets. `depth` (>= 2) device slots, each
the size of the largest streamed block, receive them: the k-th streamed block uses slot k % depth. Hooks around the
decoder layers (no rewritten forwards, so any HF family works) drive it:
  - before block k computes, uploads of streamed blocks k .. k+depth-1 have been issued, on a side stream;
  - the upload into a slot waits (CUDA event) for the compute that last read that slot;
  - the compute of block k waits (CUDA event) for its own upload. The host never synchronizes per block.
During its forward a block's QuantLinears see `qweight`/`zeros` as views into its slot; afterwards they point at empty
placeholders, so stale codes can never be read. Scales (the trained fp32 tensors), biases, g_idx, norms, embeddings,
the final norm and lm_head stay resident on the device; nothing is copied back. A dual forward (2k scale chunks in
one batch) uploads each block once. On the CPU the same code runs with plain synchronous copies and no events, and
`trace` records the (op, block, slot) order the tests check.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quant.checkpoint import decoder_blocks
from quant.linear import QuantLinear

from .config import parse_size

ALIGN = 128  # byte alignment of each tensor inside a block buffer (any dtype view is legal, loads are coalesced)
STREAMED = ("qweight", "zeros")  # the per-layer buffers that stream; g_idx is K int32s per layer and stays resident
OFFLOAD_MODES = ("auto", "on", "off")


@dataclass
class _Entry:
    """One layer buffer inside its block's host buffer / slot."""

    layer: QuantLinear
    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple


def _layout(block: nn.Module) -> tuple[list[_Entry], int]:
    """The streamed buffers of a block's QuantLinears at aligned offsets -> (entries, bytes of the buffer)."""
    entries, end = [], 0
    for m in block.modules():
        if isinstance(m, QuantLinear):
            for name in STREAMED:
                t = getattr(m, name)
                start = -(-end // ALIGN) * ALIGN
                entries.append(_Entry(m, name, start, t.numel() * t.element_size(), t.dtype, tuple(t.shape)))
                end = start + entries[-1].nbytes
    return entries, end


def _view(buf: torch.Tensor, e: _Entry) -> torch.Tensor:
    """The typed tensor of entry `e` inside a uint8 buffer."""
    return buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of a model, each storage once (tied weights count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


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
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0] * 0.9)
    return None


def plan_for_model(model: nn.Module, budget_bytes: int | None, depth: int, mode: str = "auto") -> set[int]:
    """plan_residency for a model's decoder blocks (their code + zero bytes against everything else)."""
    _, blocks = decoder_blocks(model)
    layouts = [_layout(b) for b in blocks]
    block_bytes = [nbytes for _, nbytes in layouts]
    if not any(block_bytes):
        return set()  # no quantized blocks: nothing this engine can stream
    streamable = sum(e.nbytes for entries, _ in layouts for e in entries)
    return plan_residency(block_bytes, _tensor_bytes(model) - streamable, budget_bytes, depth, mode)


# ---- the streamer ----------------------------------------------------------------------------------------------------
class BlockStreamer:
    """Streams the codes of decoder blocks `streamed` of `model` into `depth` slots on `device` (see module doc).

    Construction packs those codes into host buffers, replaces them in the layers by placeholders, moves the rest of
    the model to `device`, allocates the slots and installs the hooks. `stats` counts uploads and bytes; with
    `trace=True`, `trace` lists ("upload" | "compute" | "release", block index, slot) in the order they were issued.
    `remove()` makes the model fully resident again. Do not move or cast the model while a streamer is attached."""

    def __init__(self, model: nn.Module, device, streamed, depth: int = 2, trace: bool = False):
        if depth < 2:
            raise ValueError(f"prefetch depth must be >= 2 (got {depth})")
        self.model, self.device, self.depth = model, torch.device(device), depth
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        _, self.blocks = decoder_blocks(model)
        bad = [b for b in streamed if not 0 <= b < len(self.blocks)]
        if bad:
            raise ValueError(f"block {bad[0]} does not exist (the model has {len(self.blocks)} decoder blocks)")
        layouts = {b: _layout(self.blocks[b]) for b in sorted(streamed)}
        self.order = [b for b, (_, nbytes) in layouts.items() if nbytes]  # blocks with codes, in forward order
        self.pos = {b: p for p, b in enumerate(self.order)}
        self.entries = [layouts[b][0] for b in self.order]
        self.host = [self._pack(p) for p in range(len(self.order))]
        self.layers = {e.layer for es in self.entries for e in es}
        trivial = {m: not m.act_order for m in self.layers}  # computed here, on the host, not per forward
        model.to(self.device)
        for m, t in trivial.items():
            m._trivial = t
        self._empty = {e.dtype: torch.empty(0, dtype=e.dtype, device=self.device) for es in self.entries for e in es}
        slot_bytes = max((h.numel() for h in self.host), default=0)
        n_slots = min(depth, len(self.order))  # with fewer streamed blocks than depth, slot p % depth = p
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._uploaded = [None] * depth  # per slot: CUDA event recorded after its latest upload
        self._released = [None] * depth  # per slot: CUDA event recorded after the latest compute that read it
        self._next = 0  # next streamed position to upload in this forward
        self._expect = 0  # next streamed position expected to compute
        self._bound: set[int] = set()
        self.trace: list[tuple[str, int, int]] | None = [] if trace else None
        self.stats = {"streamed_blocks": len(self.order), "blocks": len(self.blocks), "depth": depth,
                      "slots": n_slots, "slot_bytes": slot_bytes, "host_bytes": sum(h.numel() for h in self.host),
                      "uploads": 0, "h2d_bytes": 0, "d2h_bytes": 0}
        self._handles = []
        for b in sorted(set(self.order) | {0}):  # block 0 starts every forward, streamed or not
            self._handles.append(self.blocks[b].register_forward_pre_hook(lambda mod, args, b=b: self._pre(b)))
        for b in self.order:
            self._handles.append(self.blocks[b].register_forward_hook(lambda mod, args, out, b=b: self._post(b)))

    def _pack(self, p: int) -> torch.Tensor:
        """Host buffer of streamed position p (pinned for CUDA); the layers' own copies are dropped."""
        entries = self.entries[p]
        buf = torch.empty(entries[-1].offset + entries[-1].nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        for e in entries:
            _view(buf, e).copy_(getattr(e.layer, e.name))
            e.layer.cache_base = False  # a cached codes-minus-zeros would be a full-precision resident copy
            setattr(e.layer, e.name, torch.empty(0, dtype=e.dtype))
        return buf

    # ---- ordering --------------------------------------------------------------------------------------------------
    def _record(self, p: int, op: str) -> None:
        if self.trace is not None:
            self.trace.append((op, self.order[p], p % self.depth))

    def _upload(self, p: int) -> None:
        """Copy streamed position p's host buffer into its slot, after the slot's last reader is done."""
        s, host = p % self.depth, self.host[p]
        dst = self.slots[s][:host.numel()]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                if self._released[s] is not None:
                    self.stream.wait_event(self._released[s])
                dst.copy_(host, non_blocking=True)
                self._uploaded[s] = self._uploaded[s] or torch.cuda.Event()
                self._uploaded[s].record(self.stream)
        else:
            dst.copy_(host)
        self.stats["uploads"] += 1
        self.stats["h2d_bytes"] += host.numel()
        self._record(p, "upload")

    def _issue(self, upto: int) -> None:
        """Issue uploads up to streamed position `upto` (the slots they need have been released)."""
        while self._next <= min(upto, len(self.order) - 1):
            self._upload(self._next)
            self._next += 1

    def _begin(self, p: int) -> None:
        """Start streaming a forward at position p; release anything a forward cut short left bound."""
        for q in sorted(self._bound):
            self._release(q)
        self._next = self._expect = p
        self._issue(p + self.depth - 1)

    def _release(self, p: int) -> None:
        """After streamed position p computed: mark its slot reusable and point its layers at empty placeholders."""
        s = p % self.depth
        if self.cuda:
            self._released[s] = self._released[s] or torch.cuda.Event()
            self._released[s].record(torch.cuda.current_stream(self.device))
        for e in self.entries[p]:
            setattr(e.layer, e.name, self._empty[e.dtype])
            e.layer._packed = None  # CPU int4pack layout derived from the slot's codes
        self._bound.discard(p)
        self._record(p, "release")

    def _pre(self, b: int) -> None:
        """Before decoder block b: start the forward at block 0; for a streamed block, prefetch, wait, bind."""
        if b == 0:
            self._begin(0)
        p = self.pos.get(b)
        if p is None:
            return
        if p != self._expect:  # blocks ran out of the expected order: restart the pipeline here
            self._begin(p)
        self._issue(p + self.depth - 1)  # slot of p + depth - 1 was freed when p - 1 released
        s = p % self.depth
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._uploaded[s])
        for e in self.entries[p]:
            setattr(e.layer, e.name, _view(self.slots[s], e))
            e.layer._packed = None
            e.layer._cached_base = None
        self._bound.add(p)
        self._record(p, "compute")

    def _post(self, b: int) -> None:
        p = self.pos[b]
        if p in self._bound:
            self._release(p)
        self._expect = p + 1

    # ---- teardown --------------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove the hooks and give every streamed layer its codes back, resident on the device."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for p, entries in enumerate(self.entries):
            for e in entries:
                setattr(e.layer, e.name, _view(self.host[p], e).to(self.device, copy=True))
                e.layer._packed = None
        self._bound.clear()
        self.slots = []
