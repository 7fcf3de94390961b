"""qzo2: quantization-first, memory-lean zeroth-order fine-tuning of large language models.

The Python API (qzo2/api.py), the same functions the `qzo2` command calls:

    from qzo2 import quantize, train, export, evaluate, TrainConfig

They are imported on first use, so `import qzo2` (and the CLI's start) stays free of torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["quantize", "train", "export", "evaluate", "TrainConfig", "TrainResult", "make_config", "__version__"]
_API = set(__all__) - {"__version__"}

if TYPE_CHECKING:
    from .api import TrainConfig, TrainResult, evaluate, export, make_config, quantize, train


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'qzo2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
