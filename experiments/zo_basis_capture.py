"""How much of the held-out mean gradient does each candidate ZO basis capture at the start of training?

rho = |B^T g|^2 / |g|^2 for an orthonormal basis B [N, r] built from per-example gradients of the benchmark's
training examples (the one-off pass of zo_subspace, 128 examples at batch 1), and g the mean gradient of the first 16
training batches (batch 16: the 256 examples training sees first, drawn from another shuffle of the same 1,000, so
the two may share a few). SPSA in span(B) makes progress ~ rho/r per
step (MeZO Lemma 2), so rho/r is the efficiency of a basis at theta_0.
Run from the repo root after `python benchmarks/accuracy.py accuracy --rows rtn` made runs/accuracy/int4-rtn:
    python experiments/zo_basis_capture.py SEED      (about 5 CPU-minutes, 0.9 GB for the 128 gradients)
"""
import sys, time, torch
from pathlib import Path
from qzo2 import data as D
from qzo2.config import resolve_paths
from qzo2.methods import load_for_training
from qzo2.methods.zo import gradient_pass, set_basis
from qzo2 import objective
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from accuracy import row_config  # noqa: E402  (benchmarks/accuracy.py: the accuracy benchmark's rows)
seed = int(sys.argv[1]); nb = int(sys.argv[2]) if len(sys.argv) > 2 else 128
cfg = resolve_paths(row_config("qzo-subspace", [f"seed={seed}", "zo_subspace=0"]))
data = D.read_data(cfg)
model, tok, method = load_for_training(cfg)
task = D.build_task(cfg, tok, data)
T = method.targets
t0 = time.time()
_, rows = gradient_pass(model, T, method.kind, [D.encode(task.kind, D.batch_at(task.train, 1, cfg.seed + 1, i), tok, cfg.max_length) for i in range(nb)], keep=True)
G = torch.cat(rows, 1)  # [nb, N]
print("basis grads", G.shape, f"{time.time()-t0:.0f}s", flush=True)
# held-out mean gradient: 16 batches of 16 from the step stream (seed cfg.seed, steps 0..15: what training sees first)
acc = [torch.zeros(t.tensor.numel()) for t in T]
for t in T: t.tensor.requires_grad_(True)
for s in range(16):
    b = D.encode(task.kind, D.batch_at(task.train, 16, cfg.seed, s), tok, cfg.max_length)
    objective.loss(model, method.kind, b).backward()
    for a, t in zip(acc, T):
        a.add_(t.tensor.grad.flatten()); t.tensor.grad = None
g = torch.cat(acc).double() / 16
print("mean grad", f"{time.time()-t0:.0f}s", "norm", float(g.norm()), flush=True)
def rho(Q): return float(((Q.t().double() @ g) ** 2).sum() / (g @ g))
def span(M):
    q, _ = torch.linalg.qr(M.t().double()); return q
def top(M, r):
    M = M.double(); e, u = torch.linalg.eigh(M @ M.t()); i = e.argsort(descending=True)[:r]
    q = M.t() @ (u[:, i] / e[i].sqrt()); return torch.linalg.qr(q)[0]
Gn = G / G.norm(dim=1, keepdim=True)
mean1 = G.mean(0, keepdim=True)
print("norms of per-example grads: min %.2f median %.2f max %.2f" % (G.norm(dim=1).min(), G.norm(dim=1).median(), G.norm(dim=1).max()))
for name, Q in [("span32 (recipe)", span(G[:32])), ("span16", span(G[:16])), ("span64", span(G[:64])), ("span128", span(G)),
                ("mean1 of 128", span(mean1)), ("mean1 of 32", span(G[:32].mean(0, keepdim=True))),
                ("svd top32 of 128", top(G, 32)), ("svd top8 of 128", top(G, 8)), ("svd top1 of 128", top(G, 1)),
                ("norm-svd top32 of 128", top(Gn, 32)), ("norm-svd top8 of 128", top(Gn, 8)),
                ("span of 32 means of 4", span(G.view(32, 4, -1).mean(1))), ("span of 16 means of 8", span(G.view(16, 8, -1).mean(1))),
                ("span of 8 means of 16", span(G.view(8, 16, -1).mean(1)))]:
    r = Q.shape[1]; p = rho(Q)
    print(f"{name:28s} r={r:3d} rho={p:.4f} rho/r={p/r:.5f}", flush=True)
print("full space N", G.shape[1], "rho/N", 1 / G.shape[1])
