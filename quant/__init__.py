"""qzo2's quantization library: GPTQ-format codes with continuous per-group scales. Knows nothing of training."""
from .format import QuantConfig, pack_rows, unpack_rows, pack_cols, unpack_cols, pack_zeros, unpack_zeros
from .linear import QuantLinear
from .rtn import quantize_rtn

__all__ = ["QuantConfig", "QuantLinear", "quantize_rtn", "pack_rows", "unpack_rows", "pack_cols", "unpack_cols",
           "pack_zeros", "unpack_zeros"]
