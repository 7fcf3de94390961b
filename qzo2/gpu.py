"""The narrow seams between qzo2 and the CUDA runtime: everything qzo2 asks of a GPU that is not a tensor op.

Streams, events, host-memory registration and pinning, free-memory queries, the current device and device
generators cannot run on fake tensors (and not at all on a CPU build of torch). Every other line of the GPU path
is ordinary tensor code, so `qzo2.simulate` can run it unchanged on fake tensors: inside `simulating(device)` each
seam below answers as a GPU would -- streams and events that order nothing (fake tensors hold no data), host
buffers counted as pinned but not registered, a CPU generator -- and `is_gpu` says that `device` is the GPU.

Outside a simulation the seams are plain torch.cuda calls.
"""
from __future__ import annotations

import contextlib

import torch

_SIM: torch.device | None = None  # the device that stands in for the GPU while simulating (see qzo2.simulate)


def simulated_device() -> torch.device | None:
    return _SIM


@contextlib.contextmanager
def simulating(device: torch.device):
    """Within this block, `device` is the GPU and every seam answers without a CUDA runtime."""
    global _SIM
    previous, _SIM = _SIM, torch.device(device)
    try:
        yield
    finally:
        _SIM = previous


def is_gpu(device) -> bool:
    """Is `device` a GPU (CUDA, or the simulated one)? The GPU code paths (streams, pinned host buffers, the Triton
    kernel, no CPU-only caches) are taken exactly when this is true."""
    device = torch.device(device)
    return device.type == "cuda" or (_SIM is not None and device == _SIM)


def indexed(device) -> torch.device:
    """`cuda` -> `cuda:<current>` (streams and events need an index); any other device as it is."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _Ordered:
    """A stream or event of the simulated GPU: ordering is all they do, and fake tensors have nothing to order."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return _Ordered()

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


def new_stream(device):
    return _Ordered() if _SIM is not None else torch.cuda.Stream(device)


def new_event():
    return _Ordered() if _SIM is not None else torch.cuda.Event()


def current_stream(device):
    return _Ordered() if _SIM is not None else torch.cuda.current_stream(device)


def use_stream(stream):
    """`with use_stream(s):` -- torch.cuda.stream(s), or nothing when simulating."""
    return contextlib.nullcontext() if _SIM is not None else torch.cuda.stream(stream)


def synchronize(device) -> None:
    if _SIM is None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def host_register(buf: torch.Tensor) -> bool:
    """Page-lock `buf` in place (cudaHostRegister) -> whether it worked. Simulated: False (`pinned` stands in)."""
    if _SIM is not None:
        return False
    return int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 0)) == 0


def host_unregister(buf: torch.Tensor) -> None:
    if _SIM is None:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A page-locked copy of a host tensor (torch's pinned allocator); simulated: the tensor itself."""
    return t if _SIM is not None else t.pin_memory()


def free_bytes(device) -> int | None:
    """Free memory of a GPU (cudaMemGetInfo); None when simulating (the simulation is given its budget)."""
    if _SIM is not None:
        return None
    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def generator(device) -> torch.Generator:
    """A torch.Generator for random draws on `device`. Simulated: a CPU generator (fake draws hold no data, and a
    generator of the stand-in device does not exist)."""
    if _SIM is not None and torch.device(device) == _SIM:
        return torch.Generator()
    return torch.Generator(device=device)


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """What identifies the memory a tensor reads (its storage and offset): equal for tied parameters. Unlike
    data_ptr() it also works on fake tensors, which have no data."""
    return t.untyped_storage()._cdata, t.storage_offset()
