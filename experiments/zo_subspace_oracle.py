"""Where does the gradient-subspace ZO recipe's walk go, and how much of the gap is ZO noise?

A diagnostic for issue #12 (uses backward, so it is not a recipe): it builds the recipe's basis B (span of
`--samples` per-example gradients, or their top-r singular subspace) and then trains the same int4 scales on the same
step batches with the exact projected gradient G = Bᵀ∇L of each batch (one fwd/bwd per step) in one of two modes:
  fo   θ ← θ − lr·B·G/rms       the expectation of the normalized ZO step (rms: running RMS of |G|, like zo_normalize)
  zo   θ ← θ − lr·B·mean_j clip(u_jᵀG/rms)·u_j   SPSA with exact directional derivatives u_jᵀG, k = --pairs pairs
       (--ortho: the trainer's zo_orthogonal directions; --pairs = --rank then gives fo's step up to the RMS;
       --momentum b: the step is the EMA of those, m ← b·m + (1−b)·mean_j(...), θ ← θ − lr·B·m)
  full θ ← θ − lr·∇L/rms on every scale, no basis (--adam b: per-entry Adam without momentum, ∇L/√v̂/√N, so
       lr 0.13 is AdamW's per-entry 1e-4 here): is the basis or the step's geometry the ceiling?
--precond adam|fisher|scale: a diagonally preconditioned basis (the trainer's zo_precondition=adam is `adam`);
--refresh N: the basis rebuilt at θ_t every N steps (an upper bound for a basis that follows θ).
lr (warmup, linear decay) and the RMS normaliser are the trainer's own (method.lr_at, method.normalized).
If `fo` reaches the goal and `zo --pairs 1` does not, the noise of one direction per step is what to cut.
Run from the repo root after `python benchmarks/accuracy.py accuracy --rows rtn`:
    python experiments/zo_subspace_oracle.py --seed 1 --mode fo --lr 1e-2     (about 6 CPU-minutes for 100 steps)
"""
import argparse, math, sys, time, torch
from pathlib import Path
from qzo2 import data as D, objective
from qzo2.config import resolve_paths
from qzo2.methods import load_for_training
from qzo2.methods.base import step_seed
from qzo2.methods.zo import gradient_pass, precondition_basis, set_basis, subspace_u
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from accuracy import row_config  # noqa: E402  (benchmarks/accuracy.py: the accuracy benchmark's rows)

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--mode", choices=["fo", "zo", "full"], default="fo")
ap.add_argument("--rank", type=int, default=32)
ap.add_argument("--samples", type=int, default=32)
ap.add_argument("--pairs", type=int, default=1)
ap.add_argument("--lr", type=float, default=1e-2)
ap.add_argument("--clip", type=float, default=3.0)
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--warmup", type=int, default=0)
ap.add_argument("--n-dev", type=int, default=200)
ap.add_argument("--eval-every", type=int, default=25)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--ortho", action="store_true")
ap.add_argument("--momentum", type=float, default=0.0, help="zo: EMA of the subspace step, m = b*m + (1-b)*step")
ap.add_argument("--track", type=float, default=0.0,
                help="zo: gradient tracking, g <- g + a*mean_j u_j (d_j - u_j.g), the step -lr*g (0: off)")
ap.add_argument("--adam", type=float, default=0.0,
                help="precondition the step per coordinate of c: s / sqrt(EMA_b(s^2)) / sqrt(r), b = this (0: off)")
ap.add_argument("--precond", choices=["none", "adam", "fisher", "scale"], default="none",
                help="a diagonally preconditioned basis P = D^1/2 Q, Q = orth(D^1/2 g_i), so a full-rank step would be -D grad: "
                     "adam D = 1/(s + delta*mean(s)), s = sqrt(mean g_i^2) (Adam's), fisher D = its square "
                     "(diagonal natural gradient), scale D^1/2 = |theta_0| (relative steps); ||P||_F^2 kept at r")
ap.add_argument("--delta", type=float, default=0.1)
ap.add_argument("--principal", action="store_true",
                help="rotate the basis onto the principal axes of the sampled gradients (same span)")
ap.add_argument("--refresh", type=int, default=0,
                help="upper bound for a basis that follows theta: every N steps rebuild it from new gradients at "
                     "theta_t (uses backward during training: a diagnosis only; 0: off)")
a = ap.parse_args()
cfg = resolve_paths(row_config("qzo-subspace",
                                [f"seed={a.seed}", "zo_subspace=0", f"n_dev={a.n_dev}", "model=runs/accuracy/int4-rtn",
                                 f"lr={a.lr}", f"steps={a.steps}", f"warmup_steps={a.warmup}",
                                 f"batch_size={a.batch}"]))
data = D.read_data(cfg)
model, tok, method = load_for_training(cfg)
method.cfg.zo_track, method.cfg.zo_orthogonal = a.track, a.ortho  # read by method.tracked (after validation)
task = D.build_task(cfg, tok, data)
T = method.targets
t0 = time.time()


def grads(first):
    return gradient_pass(model, T, method.kind, [D.encode(task.kind, D.batch_at(task.train, 1, cfg.seed + 1, i), tok,
                                                          cfg.max_length) for i in range(first, first + a.samples)],
                         keep=True)[1]


def flat_theta():
    return torch.cat([t.tensor.detach().float().flatten() for t in T])


def write(flat):
    start = 0
    for t in T:
        n = t.tensor.numel()
        t.tensor.data.copy_(flat[start:start + n].view_as(t.tensor))
        start += n


rows = grads(0)
if a.precond == "adam":  # the trainer's own zo_precondition=adam
    precondition_basis(T, rows, [x.pow(2).sum(0) for x in rows], a.rank)
    B = torch.cat([t.basis for t in T])  # [N, r], ||B||_F^2 = r
elif a.precond != "none":
    if a.precond == "fisher":
        sd = torch.cat(rows, dim=1).pow(2).mean(0).sqrt()
        dh = 1 / (sd + a.delta * sd.mean())
    else:
        dh = torch.cat([t.tensor.detach().float().abs().flatten() for t in T])
    dh = dh / dh.pow(2).mean().sqrt()
    start = 0
    for i, t in enumerate(T):
        rows[i] = rows[i] * dh[start:start + t.tensor.numel()]
        start += t.tensor.numel()
    set_basis(T, rows, a.rank)
    B = torch.cat([t.basis for t in T]) * dh[:, None]
    B = B * (B.shape[1] / B.pow(2).sum()).sqrt()
else:
    set_basis(T, rows, a.rank)
    B = torch.cat([t.basis for t in T])  # [N, r]
if a.principal:
    _, S, Vh = torch.linalg.svd(torch.cat(rows, dim=1).double() @ B.double(), full_matrices=False)
    B = (B.double() @ Vh.t()).float()
    print("principal singular values", [round(float(x), 2) for x in S[:8]], flush=True)
del rows
theta0 = torch.cat([t.tensor.detach().float().flatten() for t in T])
c = torch.zeros(B.shape[1], dtype=torch.float64)
print(f"basis {tuple(B.shape)} in {time.time() - t0:.0f}s", flush=True)


def put(c):
    write(theta0 + B @ c.float())


def dev(step):
    m = objective.evaluate(model, task.dev_kind, task.dev, tok, cfg.max_length, cfg.eval_batch_size)
    print(f"step {step}: dev {m['accuracy']:.3f} loss {m['loss']:.4f} " +
          " ".join(f"{k} {v}" for k, v in m.items() if k.startswith("pred")), f"({time.time() - t0:.0f}s)",
          flush=True)


v, beta, m, w = 0.0, cfg.zo_rms_beta, 0.0, 0.0
dev(0)
for step in range(a.steps):
    if a.refresh and step and step % a.refresh == 0:
        theta0, c = flat_theta(), torch.zeros_like(c)
        set_basis(T, grads(step * a.samples), a.rank)
        B = torch.cat([t.basis for t in T])
    for t in T:
        t.tensor.requires_grad_(True)
    b = D.encode(task.kind, D.batch_at(task.train, cfg.batch_size, cfg.seed, step), tok, cfg.max_length)
    loss = objective.loss(model, method.kind, b)
    loss.backward()
    loss = float(loss.detach())
    g = torch.cat([t.tensor.grad.float().flatten() for t in T])
    for t in T:
        t.tensor.grad = None
        t.tensor.requires_grad_(False)
    lr = method.lr_at(step)
    if a.mode == "full":  # no basis: normalized SGD (or --adam: per-entry Adam without momentum) on every scale
        if a.adam:
            w = a.adam * w + (1 - a.adam) * g * g
            g = g / ((w / (1 - a.adam ** (step + 1))).sqrt() + 1e-8) / math.sqrt(g.numel())
        else:
            v = beta * v + (1 - beta) * float(g.double() @ g.double())
            g = g / math.sqrt(v / (1 - beta ** (step + 1)))
        theta0 -= lr * g
        norms = f"|g| {float(g.norm()):.4f}"
    else:
        G = (B.t() @ g).double()  # [r]
        if a.mode == "fo":
            v = beta * v + (1 - beta) * float(G @ G)
            rms = math.sqrt(v / (1 - beta ** (step + 1)))
            s = G / rms
        else:
            seed = step_seed(cfg.seed, step)
            u = torch.stack([subspace_u(seed, j, B.shape[1], a.ortho) for j in range(a.pairs)]).double()
            d = u @ G  # exact directional derivatives [k]
            dc = method.normalized(d)[0].clamp(-a.clip, a.clip)
            if a.track:  # the trainer's own tracking step (ZeroOrder.tracked draws the same u from the seed)
                m = method.tracked(dc, seed)
            else:
                m = a.momentum * m + (1 - a.momentum) * (dc[:, None] * u).mean(0)
            s = m
        if a.adam:  # Adam's second moment per coordinate of c (no first moment), the step's norm kept ~ lr
            w = a.adam * w + (1 - a.adam) * s * s
            s = s / (w / (1 - a.adam ** (step + 1))).sqrt().clamp_min(1e-12) / math.sqrt(B.shape[1])
        c -= lr * s
        norms = f"|G| {float(G.norm()):.4f} |c| {float(c.norm()):.4f}"
    put(c)
    if step % 10 == 0:
        print(f"step {step}: loss {loss:.4f} {norms}", flush=True)
    if (step + 1) % a.eval_every == 0:
        dev(step + 1)
