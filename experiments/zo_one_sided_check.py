"""How far are one-sided directional derivatives from two-sided ones in the subspace recipe? (issue #12 diagnostic)

Builds the subspace recipe's basis (seed 1, fp32), then for the batches of steps 0 and 1 and each ε computes the 8
two-sided d_j = (L+ − L−)/2ε, the one-sided (L+ − L(θ))/ε of `zo_one_sided`, and the curvature zᵀHz ≈ (L+ + L− −
2L(θ))/ε² that separates them (one-sided − two-sided = ε/2·zᵀHz + O(ε²)).
Run from the repo root after `python benchmarks/accuracy.py accuracy --rows rtn`:  python experiments/zo_one_sided_check.py
"""
import sys
from pathlib import Path

import torch
from qzo2 import data as D, objective
from qzo2.config import resolve_paths
from qzo2.methods import load_for_training
from qzo2.methods.base import step_seed
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from accuracy import row_config  # noqa: E402  (benchmarks/accuracy.py: the accuracy benchmark's rows)

cfg = resolve_paths(row_config("qzo-subspace", ["seed=1", "n_pairs=8", "model=runs/accuracy/int4-rtn"]))
data = D.read_data(cfg)
model, tok, method = load_for_training(cfg)
task = D.build_task(cfg, tok, data)
method.prepare(lambda i, size: D.encode(task.kind, D.batch_at(task.train, size, cfg.seed + 1, i), tok, cfg.max_length))
for step in (0, 1):
    b = D.encode(task.kind, D.batch_at(task.train, cfg.batch_size, cfg.seed, step), tok, cfg.max_length)
    with torch.no_grad():
        l0 = float(objective.loss(model, method.kind, b))
    for eps in (1e-3, 3e-3, 1e-2):
        method.cfg.eps = eps
        losses = method.step_losses(b, step_seed(cfg.seed, step)).view(-1, 2)
        two = (losses[:, 0] - losses[:, 1]) / (2 * eps)
        one = (losses[:, 0] - l0) / eps
        curv = (losses[:, 0] + losses[:, 1] - 2 * l0) / eps ** 2
        print(f"step {step} eps {eps:g}: two-sided {[round(float(x), 2) for x in two]}", flush=True)
        print(f"    one-sided rel err {float((one - two).norm() / two.norm()):.3f}, corr "
              f"{float(torch.corrcoef(torch.stack([two, one]))[0, 1]):.4f}; zHz {[round(float(x)) for x in curv]}",
              flush=True)
