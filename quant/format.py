"""GPTQ checkpoint layout: bit packing of codes and zero points, v1/v2 zero conventions, quantize_config.

Layout of one quantized Linear (in_features K, out_features N, bits b, group size G; the GPTQ format as auto-gptq/gptqmodel write it):
  qweight int32 [K*b/32, N]   codes packed along the input dim, lowest bits first:
                              q[k, n] = (qweight[k // (32/b), n] >> (b * (k % (32/b)))) & (2^b - 1)
  qzeros  int32 [K/G, N*b/32] zero points packed along the output dim, same order
  scales  fp16  [K/G, N]
  g_idx   int32 [K]           group of each input channel (k // G unless act-order)
  W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]),  g = g_idx[k]

v1 ("gptq", what auto-gptq, gptqmodel and most hub checkpoints use) stores zero - 1 and loaders add the 1 back;
v2 ("gptq_v2") stores the true zero. In memory qzo2 always holds true zeros, unpacked.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

SUPPORTED_BITS = (2, 4, 8)
FORMATS = ("gptq", "gptq_v2")


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits}; qzo2 supports {SUPPORTED_BITS}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> int32 with the same bit pattern (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack(v: torch.Tensor, bits: int, dim: int, name: str, what: str) -> torch.Tensor:
    """Values in [0, 2^bits) -> int32, 32/bits of them per word along `dim` (low bits first)."""
    _check_bits(bits)
    per = 32 // bits
    if v.shape[dim] % per:
        raise ValueError(f"{name} {v.shape[dim]} is not a multiple of {per} (needed to pack {bits}-bit {what})")
    shape = list(v.shape)
    shape[dim:dim + 1] = [shape[dim] // per, per]
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view([per if d == dim + 1 else 1 for d in range(len(shape))])
    return _to_int32((v.to(torch.int64).reshape(shape) << shifts).sum(dim=dim + 1))


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [K, N] (values in [0, 2^bits)) -> qweight int32 [K*bits/32, N], packed along dim 0."""
    return _pack(q, bits, 0, "in_features", "codes")


def unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [K*bits/32, N] -> codes uint8/int16 [K, N]."""
    _check_bits(bits)
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int32, device=qweight.device) * bits).view(1, per, 1)
    q = (qweight.unsqueeze(1) >> shifts) & (2**bits - 1)
    return q.reshape(-1, qweight.shape[1]).to(torch.uint8)


def pack_cols(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Values [G, N] -> int32 [G, N*bits/32], packed along dim 1 (the qzeros layout)."""
    return _pack(z, bits, 1, "out_features", "zeros")


def unpack_cols(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros int32 [G, N*bits/32] -> stored values int16 [G, N]."""
    _check_bits(bits)
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int32, device=qzeros.device) * bits).view(1, 1, per)
    z = (qzeros.unsqueeze(2) >> shifts) & (2**bits - 1)
    return z.reshape(qzeros.shape[0], -1).to(torch.int16)


def _ones_word(bits: int) -> int:
    """The int32 word with a 1 in every bits-wide field (0x11111111 for 4-bit)."""
    return sum(1 << (bits * i) for i in range(32 // bits))


def _add_word(words: torch.Tensor, delta: int) -> torch.Tensor:
    return _to_int32((words.to(torch.int64) + delta) % 2**32)


def pack_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """True zero points [G, N] -> qzeros in the given checkpoint format.

    v1 subtracts 1 from every field as one 32-bit word subtraction (0x11111111 at 4 bits), exactly as gptqmodel
    writes it and transformers/gptqmodel read it back (they add the word back). A true zero of 0 borrows from its
    neighbour, and the loader's word addition carries it back, so every zero in [0, 2^bits) round-trips.
    """
    _check_format(checkpoint_format)
    if int(zeros.max()) >= 2**bits or int(zeros.min()) < 0:
        raise ValueError(f"zero points out of range for {bits} bits")
    words = pack_cols(zeros, bits)
    return _add_word(words, -_ones_word(bits)) if checkpoint_format == "gptq" else words


def unpack_zeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """qzeros -> true zero points int16 [G, N] (v1: add 0x11..1 to each word, then unpack)."""
    _check_format(checkpoint_format)
    words = _add_word(qzeros, _ones_word(bits)) if checkpoint_format == "gptq" else qzeros
    return unpack_cols(words, bits)


def convert_qzeros(qzeros: torch.Tensor, bits: int, src: str, dst: str) -> torch.Tensor:
    """Re-encode packed zero points between v1 ("gptq") and v2 ("gptq_v2")."""
    return pack_zeros(unpack_zeros(qzeros, bits, src), bits, dst)


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in FORMATS:
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}; expected one of {FORMATS}")


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    g = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, dtype=torch.int32) // g).to(torch.int32)


@dataclasses.dataclass
class QuantConfig:
    """What `quantize_config.json` (and `quantization_config` in config.json) holds."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    quant_method: str = "gptq"
    method: str = "rtn"  # how the codes were chosen: rtn | gptq (informational, ignored by loaders)

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.group_size != -1 and (self.group_size < 1 or self.group_size % (32 // self.bits)):
            raise ValueError(
                f"unsupported group size {self.group_size}; use -1 (per channel) or a multiple of {32 // self.bits}"
            )
        _check_format(self.checkpoint_format)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["meta"] = {"quantizer": [f"qzo2:{_version()}"], "method": d.pop("method")}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if d.get("quant_method", "gptq") != "gptq":
            raise ValueError(f"not a GPTQ quantization config (quant_method={d.get('quant_method')!r})")
        fmt = d.get("checkpoint_format", d.get("format", "gptq"))
        method = (d.get("meta") or {}).get("method", "gptq")
        return cls(
            bits=int(d["bits"]),
            group_size=int(d.get("group_size", 128)),
            sym=bool(d.get("sym", True)),
            desc_act=bool(d.get("desc_act", False)),
            checkpoint_format=fmt,
            damp_percent=float(d.get("damp_percent", 0.01)),
            true_sequential=bool(d.get("true_sequential", True)),
            static_groups=bool(d.get("static_groups", False)),
            method=method,
        )


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qzo2")
    except Exception:
        return "0"
