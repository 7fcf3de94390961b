"""Round-to-nearest group quantization into the GPTQ layout, on GPTQ's own grid (`Quantizer.find_params`), so
an RTN checkpoint and a GPTQ one differ only in the codes chosen:
  sym:  scale = 2·max|w| / (2^b − 1),  zero = 2^(b−1)
  asym: xmin = min(w, 0), xmax = max(w, 0), scale = (xmax − xmin) / (2^b − 1), zero = round(−xmin / scale)
  q = clamp(round(w / scale) + zero, 0, 2^b − 1)
Measured on SmolLM2-135M int4 g64 (Hamlet perplexity, 8x256 tokens): this grid 65.0; the "unclipped" symmetric
grid scale = max|w| / (2^(b−1) − 1) 75.0, so we keep GPTQ's.
"""
from __future__ import annotations

import torch


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nn.Linear weight [N, K] -> (codes uint8 [K, N], zeros int16 [G, N], scales fp32 [G, N])."""
    N, K = weight.shape
    G = K if group_size == -1 else group_size
    if K % G:
        raise ValueError(f"in_features {K} is not divisible by group size {G}")
    maxq = 2**bits - 1
    w = weight.detach().to(torch.float32).reshape(N, K // G, G)
    if sym:
        xmax = w.abs().amax(dim=2)
        xmax = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
        scale = 2 * xmax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        xmin = w.amin(dim=2).clamp(max=0)
        xmax = w.amax(dim=2).clamp(min=0)
        both0 = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both0, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(w / scale.unsqueeze(2)) + zero.unsqueeze(2), 0, maxq)
    codes = q.reshape(N, K).t().contiguous().to(torch.uint8)
    return codes, zero.t().contiguous().to(torch.int16), scale.t().contiguous()
