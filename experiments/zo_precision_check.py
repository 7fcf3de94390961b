"""How faithful are a subspace step's finite differences in fp32 and bf16, and at which ε? (issue #12 diagnostic)

Builds the subspace recipe's basis once (seed 1, fp32), then computes the 8 directional derivatives
d_j = (L(θ+εz_j) − L(θ−εz_j)) / 2ε of step 0's batch for each (dtype, ε) with that same basis and prints each
against fp32 at ε = 1e-3 (correlation, relative error) and the step's wall time.
Run from the repo root after `python benchmarks/accuracy.py accuracy --rows rtn`:  python experiments/zo_precision_check.py
"""
import sys, time, torch
from pathlib import Path
from qzo2 import data as D
from qzo2.config import resolve_paths
from qzo2.methods import load_for_training
from qzo2.methods.base import step_seed
from qzo2.methods.zo import projected_gradients
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from accuracy import row_config  # noqa: E402  (benchmarks/accuracy.py: the accuracy benchmark's rows)
res, basis = {}, None
for dt, eps in (("fp32", 1e-3), ("bf16", 1e-3), ("bf16", 1e-2), ("bf16", 1e-1), ("fp32", 1e-2)):
    cfg = resolve_paths(row_config("qzo-subspace", ["seed=1", f"dtype={dt}", f"eps={eps}", "n_pairs=8", "model=runs/accuracy/int4-rtn"]))
    data = D.read_data(cfg)
    model, tok, method = load_for_training(cfg)
    task = D.build_task(cfg, tok, data)
    if basis is None:
        method.prepare(lambda i, size: D.encode(task.kind, D.batch_at(task.train, size, cfg.seed + 1, i), tok, cfg.max_length))
        basis = [t.basis for t in method.targets]
    for t, bb in zip(method.targets, basis):
        t.basis = bb
    b = D.encode(task.kind, D.batch_at(task.train, cfg.batch_size, cfg.seed, 0), tok, cfg.max_length)
    t0 = time.time()
    losses = method.step_losses(b, step_seed(1, 0))
    el = time.time() - t0
    d = projected_gradients(losses, eps)
    res[(dt, eps)] = d
    print(dt, eps, f"{el:.1f}s", [round(float(x), 3) for x in d], flush=True)
ref = res[("fp32", 1e-3)]
for k, d in res.items():
    print(k, "corr", round(float(torch.corrcoef(torch.stack([ref, d]))[0, 1]), 4), "rel err", round(float((ref - d).norm() / ref.norm()), 4))
