"""The ZO options of the convergence work: masks (magnitude, Fisher) frozen outside, the z of the forward is the z of
the update, the normalized step is scale-free, a masked estimator on a quadratic converges in ~|S|/d of the steps,
resume keeps the mask and the running RMS."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import build_model, input_ids, straight_and_resumed
from qzo2 import objective, trainer
from qzo2.config import ConfigError, TrainConfig
from qzo2.methods import base, build_method, zo


def zo_method(model, quantized=False, **kw):
    cfg = TrainConfig(method="qzo" if quantized else "mezo", task="", train_file="x.jsonl", lr=kw.pop("lr", 1e-3),
                      **kw)
    targets = zo.as_zo(base.scale_targets(model) if quantized else base.weight_targets(model, ("linear",)))
    return build_method(cfg, model, targets, "lm")


def batches(n, rows=2, seq=10):
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
            for ids in (input_ids(batch=rows, seq=seq, vocab=300, seed=s) for s in range(n))]


def test_magnitude_mask_picks_the_smallest_entries_and_nothing_else_moves():
    model = build_model("llama")
    method = zo_method(model, zo_mask="magnitude", zo_mask_fraction=0.02, lr=1e-2)
    total = sum(t.tensor.numel() for t in method.targets)
    assert sum(len(t.mask) for t in method.targets) == round(0.02 * total)
    everything = torch.cat([t.tensor.detach().abs().flatten() for t in method.targets])
    threshold = everything.kthvalue(round(0.02 * total)).values
    for t in method.targets:
        assert (t.tensor.detach().abs().flatten()[t.mask] <= threshold).all()
    before = {t.path: t.tensor.detach().clone() for t in method.targets}
    for i, b in enumerate(batches(3)):
        method.step(b, i)
    for t in method.targets:
        keep = torch.ones(t.tensor.numel(), dtype=torch.bool)
        keep[t.mask] = False
        assert torch.equal(t.tensor.flatten()[keep], before[t.path].flatten()[keep]), t.path  # bitwise frozen
    assert any(not torch.equal(t.tensor.flatten()[t.mask], before[t.path].flatten()[t.mask])
               for t in method.targets if len(t.mask))


def test_fisher_mask_is_the_top_of_the_summed_squared_gradients():
    model = build_model("llama")
    method = zo_method(model, zo_mask="fisher", zo_mask_fraction=0.01, zo_mask_samples=3)
    data = batches(3, rows=1)
    method.prepare(lambda i, size: data[i])
    # reference: plain autograd, one example at a time, squared gradients summed
    ref = build_model("llama")
    params = [t.tensor for t in base.weight_targets(ref, ("linear",))]
    for p in ref.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    fisher = [torch.zeros_like(p) for p in params]
    per_example = []
    for b in data:
        objective.loss(ref, "lm", b).backward()
        per_example.append([p.grad.flatten().clone() for p in params])
        for f, p in zip(fisher, params):
            f += p.grad ** 2
            p.grad = None
    # the kept per-example gradients (what zo_subspace spans) are those of plain autograd, row i = example i
    other = build_model("llama")
    _, rows = zo.gradient_pass(other, base.weight_targets(other, ("linear",)), "lm", data, keep=True)
    for j, r in enumerate(rows):
        torch.testing.assert_close(r, torch.stack([g[j] for g in per_example]), rtol=1e-4, atol=1e-6)
    flat = torch.cat([f.flatten() for f in fisher])
    n = round(0.01 * flat.numel())
    want = set(torch.topk(flat, n).indices.tolist())
    got, start = set(), 0
    for t in method.targets:
        got |= {start + i for i in t.mask.tolist()}
        start += t.tensor.numel()
    assert len(got ^ want) <= 2  # ties at the threshold aside
    assert all(not t.tensor.requires_grad and t.tensor.grad is None for t in method.targets)


@pytest.mark.parametrize("masked", [False, True])
def test_the_z_of_the_forward_is_the_z_of_the_update(make_model_dir, tmp_path, masked):
    from quant.checkpoint import atomic_dir, load_quantized, open_source, quantize
    from quant.format import QuantConfig

    src, _ = make_model_dir("llama")
    with atomic_dir(tmp_path / "q") as tmp:
        quantize(open_source(src), tmp, QuantConfig(bits=4, group_size=32), progress=False)
    model = load_quantized(tmp_path / "q")
    method = zo_method(model, quantized=True, zo_mask="magnitude" if masked else "none", zo_mask_fraction=0.1,
                       n_pairs=2, eps=1e-3)
    t = method.targets[3]
    seen = {}
    orig = type(t.module).forward

    def spy(self, x):
        if self is t.module and self.chunk_scales is not None:
            seen["chunks"] = [c.clone() for c in self.chunk_scales]
        return orig(self, x)

    type(t.module).forward = spy
    try:
        before = t.tensor.clone()
        seed = base.step_seed(0, 0)
        with torch.no_grad(), zo.dual_forward(method.targets, seed, 1e-3, 2):
            model(input_ids(batch=4, seq=6))
    finally:
        type(t.module).forward = orig
    for j in range(2):
        z = zo.target_z(t, seed, j)
        torch.testing.assert_close(seen["chunks"][2 * j], before + 1e-3 * z, rtol=0, atol=1e-9)
        torch.testing.assert_close(seen["chunks"][2 * j + 1], before - 1e-3 * z, rtol=0, atol=1e-9)
    zo.apply_update([t], seed, [0.5, -0.25])
    expect = before - 0.5 * zo.target_z(t, seed, 0) + 0.25 * zo.target_z(t, seed, 1)
    torch.testing.assert_close(t.tensor, expect, rtol=0, atol=1e-9)
    if masked:
        assert (zo.target_z(t, seed, 0).flatten().ne(0).nonzero().flatten() == t.mask).all()


def test_the_normalized_step_is_unchanged_when_the_loss_is_scaled(monkeypatch):
    runs = {}
    for factor in (1.0, 100.0):
        model = build_model("llama")
        method = zo_method(model, zo_normalize=True, clip=3.0, lr=1e-3, n_pairs=2)
        real = objective.chunk_sums
        monkeypatch.setattr(objective, "chunk_sums", lambda *a, f=factor: (real(*a)[0] * f, real(*a)[1]))
        ds = [method.step(b, i)["d"] for i, b in enumerate(batches(4))]
        runs[factor] = ([t.tensor.detach().clone() for t in method.targets], ds)
        monkeypatch.setattr(objective, "chunk_sums", real)
    assert runs[100.0][1][0] == pytest.approx(100 * runs[1.0][1][0], rel=1e-6)  # the raw d did scale
    for a, b in zip(runs[1.0][0], runs[100.0][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_normalization_off_is_todays_step():
    a, b = build_model("llama"), build_model("llama")
    plain = zo_method(a, lr=1e-3)
    off = zo_method(b, lr=1e-3, zo_normalize=False, zo_rms_beta=0.5)
    for i, batch in enumerate(batches(3)):
        assert plain.step(batch, i) == off.step(batch, i)
    assert all(torch.equal(x.tensor, y.tensor) for x, y in zip(plain.targets, off.targets))
    assert plain.state_tensors() == {}  # nothing new in today's checkpoints


class Quadratic(nn.Module):
    """L(θ) = ½‖θ_S − 1‖² + ½‖θ_rest‖² from θ = 0: the gradient lives on S (the first s entries), and every other
    direction has curvature too, so a random walk there costs loss. Each output row is the loss of its chunk."""

    def __init__(self, d: int, s: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.s = s

    def forward(self, x):
        w = self.weight
        return (0.5 * (w[: self.s] - 1).pow(2).sum() + 0.5 * w[self.s:].pow(2).sum()).expand(x.shape[0])


def steps_to_converge(d, s, masked, lr, cap=4000):
    model = Quadratic(d, s)
    t = zo.ZOTarget(0, "weight", model, "weight")
    if masked:
        t.mask = torch.arange(s)
    start = 0.5 * s
    for step in range(cap):
        seed = base.step_seed(0, step)
        with torch.no_grad(), zo.dual_forward([t], seed, 1e-3, 1):
            losses = model(torch.zeros(2, 1)).double()
        dproj = float(zo.projected_gradients(losses, 1e-3)[0])
        zo.apply_update([t], seed, [lr * dproj])
        if float(model(torch.zeros(1, 1))[0]) < 0.05 * start:
            return step + 1
    return cap


def test_a_masked_estimator_converges_in_about_s_over_d_of_the_steps():
    d, s = 400, 10
    # the best constant lr of each from a grid wide enough to hold it (SPSA's stable lr scales like 1/(dim + 2))
    grid = (0.25, 0.5, 1, 2, 4, 8)
    full = min(steps_to_converge(d, s, False, c / (d + 2)) for c in grid)
    masked = min(steps_to_converge(d, s, True, c / (s + 2)) for c in grid)
    ratio = masked / full
    assert s / d / 4 < ratio < s / d * 4, (masked, full, ratio)  # ~|S|/d of the steps


def test_zo_options_are_refused_for_first_order_methods():
    with pytest.raises(ConfigError, match="zo_mask is a key of method qzo, mezo, not of method=lomo"):
        TrainConfig(method="lomo", zo_mask="fisher")
    with pytest.raises(ConfigError, match="zo_mask_fraction"):
        TrainConfig(zo_mask="magnitude", zo_mask_fraction=0.0)
    with pytest.raises(ConfigError, match="zo_orthogonal chooses the directions inside zo_subspace"):
        TrainConfig(zo_orthogonal=True)
    with pytest.raises(ConfigError, match="zo_one_sided is a key of method qzo, mezo, not of method=adalomo"):
        TrainConfig(method="adalomo", zo_one_sided=True)
    with pytest.raises(ConfigError, match="zo_one_sided shares one unperturbed chunk"):
        TrainConfig(zo_one_sided=True, zo_parallel="pairs")
    with pytest.raises(ConfigError, match="zo_track estimates the gradient inside zo_subspace"):
        TrainConfig(zo_track=0.1)
    with pytest.raises(ConfigError, match="zo_precondition shapes the basis of zo_subspace"):
        TrainConfig(zo_precondition="adam")
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"zo_track must be in \[0, 1\]"):
            TrainConfig(zo_subspace=4, zo_track=bad)


def test_resume_keeps_the_fisher_mask_and_the_running_rms(tiny, tmp_path):
    q, _, data = tiny
    kw = dict(eval_every=3, save_every=2, log_every=1, zo_mask="fisher", zo_mask_fraction=0.05, zo_mask_samples=4,
              zo_normalize=True, clip=3.0, n_pairs=2)
    straight, _ = straight_and_resumed(tmp_path, q, data, 7, 5, ("trained.safetensors", "method.safetensors"),
                                       calls_before=4, **kw)
    state = load_file(str(trainer.RunDir(straight.run).checkpoint("last") / "method.safetensors"))
    assert int(state["zo.rms_t"]) == 7 and sum(v.numel() for k, v in state.items() if k.endswith(".zo_mask")) > 0


@pytest.mark.parametrize("track", [0.0, 0.3])
def test_subspace_basis_is_checkpointed_and_resume_is_bit_identical(tiny, tmp_path, track):
    """The basis is made once, before step 1: a resumed run must take it from the checkpoint (it makes no new
    gradient pass), so its z, and every trained tensor, equal the uninterrupted run's. With zo_track the tracked
    gradient is state too: a resume that lost it would step differently."""
    q, _, data = tiny
    kw = dict(eval_every=3, save_every=2, log_every=1, zo_subspace=3, zo_mask_samples=4, zo_normalize=True, clip=3.0,
              zo_orthogonal=True, n_pairs=2, zo_track=track)
    straight, _ = straight_and_resumed(tmp_path, q, data, 6, 4, ("trained.safetensors", "method.safetensors"),
                                       calls_before=4, **kw)
    state = load_file(str(trainer.RunDir(straight.run).checkpoint("last") / "method.safetensors"))
    assert ("zo.track" in state) == bool(track)
    if track:
        assert state["zo.track"].shape == (3,) and state["zo.track"].abs().sum() > 0
    bases = [v for k, v in state.items() if k.endswith(".zo_basis")]
    assert bases and all(b.shape[1] == 3 for b in bases)
    joint = torch.cat(bases).double()
    torch.testing.assert_close(joint.t() @ joint, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)


def test_also_train_norms_and_a_tied_head_beside_the_scales(make_model_dir, tmp_path):
    """QZO on the scales plus the RMSNorm gains and the (tied) embedding: the new tensors are indexed after the
    scales (whose z is unchanged), are not floored like scales, and export as GPTQ (scales and gains replaced, codes
    byte for byte) and as merged HF."""
    import json

    from quant.checkpoint import atomic_dir, checkpoint_tensors, open_source, quantize, read_tensor
    from quant.format import QuantConfig
    from qzo2.exporter import export

    src, _ = make_model_dir("llama", tie_word_embeddings=True)
    with atomic_dir(tmp_path / "q") as tmp:
        quantize(open_source(src), tmp, QuantConfig(bits=4, group_size=32), progress=False)
    rows = tmp_path / "d.jsonl"
    rows.write_text("".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 2}) + "\n"
                            for _ in range(4)))
    from conftest import train_config

    cfg = train_config(tmp_path, tmp_path / "q", rows, steps=3, lr=1e-2, eval_every=0, also_train="norm,embedding")
    model, _, method = trainer.load_for_training(cfg)
    scales = [t for t in method.targets if t.name == "scales"]
    extra = [t for t in method.targets if t.name != "scales"]
    assert [t.index for t in scales] == list(range(len(scales)))
    assert [t.index for t in extra] == list(range(len(scales), len(method.targets)))
    assert "model.embed_tokens.weight" in {t.path for t in extra} and any("norm" in t.path for t in extra)
    with torch.no_grad():
        extra[0].tensor.fill_(-0.5)  # a negative gain stays negative: only scales are floored
    method.step(batches(1)[0], 0)
    assert (extra[0].tensor < 0).all()
    trainer.train(cfg)
    trained = load_file(str(trainer.RunDir(cfg.output_dir).checkpoint("last") / "trained.safetensors"))
    export(cfg.output_dir, str(tmp_path / "gptq"), checkpoint="last")
    names, where = checkpoint_tensors(tmp_path / "gptq")
    _, base_where = checkpoint_tensors(tmp_path / "q")
    for n in names:
        got = read_tensor(where, n)
        if n in trained:
            assert torch.equal(got, trained[n].to(got.dtype)), n
        else:
            assert torch.equal(got, read_tensor(base_where, n)), n
    report = export(cfg.output_dir, str(tmp_path / "hf"), fmt="hf", checkpoint="last")
    assert report.replaced == len(trained)
    with pytest.raises(trainer.TrainingError, match="also_train adds unquantized tensors"):
        trainer.load_for_training(train_config(tmp_path, src, rows, also_train="norm"))


def test_subspace_from_more_examples_than_its_rank_is_their_principal_subspace():
    """zo_mask_samples > zo_subspace: the basis is the top-r right singular subspace of the per-example gradients
    (numpy's SVD as the reference), not the span of the first r of them."""
    import numpy as np
    gen = torch.Generator().manual_seed(0)
    m = torch.nn.Module()
    m.a, m.b = (torch.nn.Parameter(torch.zeros(s), requires_grad=False) for s in ((6, 5), (40,)))
    targets = [zo.ZOTarget(0, "a", m, "a"), zo.ZOTarget(1, "b", m, "b")]
    strong = torch.linalg.qr(torch.randn(70, 2, generator=gen, dtype=torch.float64))[0]  # two dominant directions
    g = (torch.randn(12, 2, generator=gen, dtype=torch.float64) * 10) @ strong.t() + \
        0.1 * torch.randn(12, 70, generator=gen, dtype=torch.float64)
    g[0] = 0.1 * torch.randn(70, generator=gen, dtype=torch.float64)  # the first example is mostly noise
    zo.set_basis(targets, [g[:, :30].float(), g[:, 30:].float()], rank=2)
    b = torch.cat([targets[0].basis, targets[1].basis]).double()  # [70, 2]
    assert targets[0].basis.shape == (30, 2) and targets[1].basis.shape == (40, 2)
    torch.testing.assert_close(b.t() @ b, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)
    ref = np.linalg.svd(g.numpy(), full_matrices=False)[2][:2].T  # [70, 2]
    proj = torch.from_numpy(ref @ ref.T)
    assert (proj @ b - b).norm() < 1e-4  # the same subspace as numpy's top-2
    first_two = torch.linalg.qr(g[:2].t())[0]
    assert (first_two @ first_two.t() @ b - b).norm() > 0.1  # and not the span of the first two examples
    zo.set_basis(targets, [g[:2, :30].float(), g[:2, 30:].float()], rank=2)  # examples <= rank: their span
    b = torch.cat([targets[0].basis, targets[1].basis]).double()
    assert (first_two @ first_two.t() @ b - b).norm() < 1e-4


def test_preconditioned_basis_steps_along_adams_direction():
    """zo_precondition=adam: with a basis of full rank, P·Pᵀ = r·D/tr(D), D = 1/(s + 0.1·mean s) per entry and s
    the RMS of the sampled gradients (numpy float64 as the reference), so the step −lr·P·Pᵀ∇L is Adam's direction
    −D∇L, not −∇L; with a smaller rank P's columns are combinations of the D·g_i. The plain basis (set_basis) gives
    P·Pᵀ = I instead, so the test fails if the preconditioning is dropped or D has the wrong power."""
    import numpy as np
    gen = torch.Generator().manual_seed(1)
    m = torch.nn.Module()
    m.a, m.b = (torch.nn.Parameter(torch.zeros(s), requires_grad=False) for s in ((2, 2), (3,)))
    targets = [zo.ZOTarget(0, "a", m, "a"), zo.ZOTarget(1, "b", m, "b")]
    g = torch.randn(9, 7, generator=gen, dtype=torch.float64) * torch.tensor([5, 0.1, 1, 3, 0.01, 2, 1.0])
    parts = [g[:, :4].float(), g[:, 4:].float()]
    zo.precondition_basis(targets, parts, [(p * p).sum(0) for p in parts], rank=7)
    p = torch.cat([targets[0].basis, targets[1].basis]).double()
    assert targets[0].basis.shape == (4, 7) and targets[1].basis.shape == (3, 7)
    s = np.sqrt((g.numpy() ** 2).mean(0))
    d = 1 / (s + 0.1 * s.mean())
    torch.testing.assert_close(p @ p.t(), torch.from_numpy(np.diag(7 * d / d.sum())), atol=1e-5, rtol=1e-4)
    zo.precondition_basis(targets, parts, [(p * p).sum(0) for p in parts], rank=2)
    p = torch.cat([targets[0].basis, targets[1].basis]).double()
    assert float(p.pow(2).sum()) == pytest.approx(2.0, rel=1e-5)
    dg = torch.from_numpy(d)[:, None] * g.t()  # [7, 9]: the D·g_i
    coef = torch.linalg.lstsq(dg, p).solution
    assert (dg @ coef - p).norm() < 1e-4 * p.norm()
    zo.set_basis(targets, parts, rank=2)
    plain = torch.cat([targets[0].basis, targets[1].basis]).double()
    assert (plain @ torch.linalg.lstsq(plain, p).solution - p).norm() > 0.1 * p.norm()  # not the plain top-2 span


def test_a_masked_gradient_pass_keeps_only_the_masked_entries():
    """gradient_pass(masked=True) (the subspace pass after a mask: MeZO's 10⁸ weights would not fit 32 full
    gradients): each target's rows hold exactly the masked entries of the full pass, and the Fisher sums are the
    full ones."""
    model = build_model("llama")
    targets = zo.as_zo(base.weight_targets(model, ("linear",)))
    data = batches(3, rows=1)
    full_sq, full = zo.gradient_pass(model, targets, "lm", data, keep=True)
    zo.set_masks(targets, full_sq, 0.05)
    sq, rows = zo.gradient_pass(model, targets, "lm", data, keep=True, masked=True)
    for t, f, r, a, b in zip(targets, full, rows, full_sq, sq):
        assert r.shape == (3, len(t.mask))
        assert torch.equal(r, f[:, t.mask]) and torch.equal(a, b)


def test_the_trainer_builds_the_preconditioned_basis_from_its_one_off_pass():
    """zo_precondition=adam in prepare(): the basis equals precondition_basis of an independent gradient pass over
    the same examples, and differs from the plain one."""
    model = build_model("llama")
    method = zo_method(model, zo_subspace=3, zo_mask_samples=3, zo_precondition="adam", lr=1e-2)
    data = batches(3, rows=1)
    method.prepare(lambda i, size: data[i])
    ref = build_model("llama")
    ref_targets = zo.as_zo(base.weight_targets(ref, ("linear",)))
    sq, grads = zo.gradient_pass(ref, ref_targets, "lm", data, keep=True)
    zo.precondition_basis(ref_targets, grads, sq, 3)
    for t, r in zip(method.targets, ref_targets):
        torch.testing.assert_close(t.basis, r.basis, atol=1e-6, rtol=1e-4)
    zo.set_basis(ref_targets, grads, 3)
    assert max(float((t.basis - r.basis).abs().max()) for t, r in zip(method.targets, ref_targets)) > 1e-3


def test_subspace_z_lies_in_the_span_of_the_sampled_gradients():
    """zo_subspace: z = B·u, B an orthonormal basis of the per-example gradients of the one-off pass
    (restricted to the mask when there is one): the joint z of all targets has no component outside that span, and
    the update moves the parameters only inside it."""
    for mask in ("none", "fisher"):
        model = build_model("llama")
        method = zo_method(model, zo_subspace=3, zo_mask_samples=3, zo_mask=mask, zo_mask_fraction=0.05, lr=1e-2)
        data = batches(3, rows=1)
        method.prepare(lambda i, size: data[i])
        ref = build_model("llama")
        _, grads = zo.gradient_pass(ref, base.weight_targets(ref, ("linear",)), "lm", data, keep=True)
        if mask == "fisher":
            grads = [g[:, t.mask] for g, t in zip(grads, method.targets)]
        g = torch.cat(grads, dim=1).double()  # [3, N]
        z = torch.cat([zo.target_z(t, 123, 0).flatten()[t.mask] if t.mask is not None
                       else zo.target_z(t, 123, 0).flatten() for t in method.targets]).double()
        n = z.numel()
        coef = torch.linalg.lstsq(g.t(), z).solution
        assert (g.t() @ coef - z).norm() < 1e-4 * z.norm()  # z is a combination of the three gradients
        u = zo.z_for((3,), 123, zo.SUBSPACE_STREAM, 0).double()
        assert float(z.norm()) == pytest.approx(float(u.norm()), rel=1e-4)  # B has orthonormal columns
        assert n > 3
        before = torch.cat([t.tensor.detach().flatten() for t in method.targets]).double()
        method.step(batches(1)[0], 0)
        after = torch.cat([t.tensor.detach().flatten() for t in method.targets]).double()
        delta = after - before
        if mask == "fisher":
            keep = torch.cat([torch.zeros(t.tensor.numel(), dtype=torch.bool).index_fill_(0, t.mask, True)
                              for t in method.targets])
            assert (delta[~keep] == 0).all()
            delta = delta[keep]
        coef = torch.linalg.lstsq(g.t(), delta).solution
        assert delta.norm() > 0 and (g.t() @ coef - delta).norm() < 1e-3 * delta.norm()


def test_orthogonal_subspace_directions_are_a_random_rotation_fixed_by_seed_and_pair():
    """zo_orthogonal: u_j for pairs 0..r-1 are orthogonal with ‖u_j‖² = r (E‖u‖² of the Gaussian ones), pairs r..2r-1
    come from a second rotation, each u_j depends on (seed, pair, r) only, and another seed gives another rotation."""
    r, seed = 5, base.step_seed(3, 7)
    u = torch.stack([zo.subspace_u(seed, j, r, True) for j in range(2 * r)]).double()
    torch.testing.assert_close(u[:r] @ u[:r].t(), r * torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(u[r:] @ u[r:].t(), r * torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (u[:r] @ u[r:].t()).abs().max() > 0.1  # the second block is not the first again
    zo._rotation.cache_clear()
    assert torch.equal(zo.subspace_u(seed, 7, r, True), u[7].float())  # order and cache do not matter
    assert not torch.allclose(zo.subspace_u(seed + 1, 0, r, True), u[0].float())
    # off: today's i.i.d. coefficients, bit for bit
    assert torch.equal(zo.subspace_u(seed, 2, r, False), zo.z_for((r,), seed, zo.SUBSPACE_STREAM, 2))


@pytest.mark.parametrize("orthogonal", [False, True])
def test_orthogonal_pairs_spanning_the_subspace_give_its_exact_gradient_step(orthogonal):
    """n_pairs = zo_subspace = r with zo_orthogonal: mean_j d_j·u_j = Bᵀ∇L (the u_j are √r·rows of a rotation), so one
    step moves θ by −lr·B·Bᵀ∇L, the first-order step projected on the subspace, up to the finite difference. With
    i.i.d. u the same step is a noisy estimate of it (checked to be far from it, so the test can tell them apart)."""
    r, lr = 3, 1e-2
    model = build_model("llama")
    method = zo_method(model, zo_subspace=r, zo_mask_samples=r, zo_orthogonal=orthogonal, n_pairs=r, clip=0.0,
                       lr=lr, eps=1e-3)
    data = batches(r, rows=1)
    method.prepare(lambda i, size: data[i])
    batch = batches(1, rows=2)[0]
    ref = build_model("llama")  # autograd's gradient at the same θ
    params = [t.tensor for t in base.weight_targets(ref, ("linear",))]
    objective.loss(ref, "lm", batch).backward()
    g = torch.cat([p.grad.flatten() for p in params]).double()
    basis = torch.cat([t.basis for t in method.targets]).double()
    want = -lr * basis @ (basis.t() @ g)
    before = torch.cat([t.tensor.detach().flatten() for t in method.targets]).double()
    method.step(batch, 0)
    delta = torch.cat([t.tensor.detach().flatten() for t in method.targets]).double() - before
    err = float((delta - want).norm() / want.norm())
    if orthogonal:
        assert err < 1e-3
    else:
        assert err > 0.5



def subspace_setup(r=3, **kw):
    """A MeZO method on a tiny llama with an r-dim gradient subspace, a batch, and autograd's Bᵀ∇L at θ."""
    model = build_model("llama")
    method = zo_method(model, zo_subspace=r, zo_mask_samples=r, clip=0.0, eps=1e-3, **kw)
    data = batches(r, rows=1)
    method.prepare(lambda i, size: data[i])
    batch = batches(1, rows=2)[0]
    ref = build_model("llama")
    params = [t.tensor for t in base.weight_targets(ref, ("linear",))]
    objective.loss(ref, "lm", batch).backward()
    g = torch.cat([p.grad.flatten() for p in params]).double()
    basis = torch.cat([t.basis for t in method.targets]).double()
    return method, batch, basis, basis.t() @ g


def test_tracking_from_one_pair_a_step_converges_to_the_subspace_gradient():
    """zo_track: on a fixed batch (lr tiny, so θ stays put) the LMS estimate g from one ±ε pair a step converges to
    the subspace gradient Bᵀ∇L (autograd's), which no single SPSA estimate is near (‖u‖² = r per pair); and the
    update moves θ by exactly −lr·B·g."""
    method, batch, basis, want = subspace_setup(n_pairs=1, zo_track=0.3, lr=1e-9)
    errs = []
    for step in range(60):
        method.step(batch, step)
        errs.append(float((method.track - want).norm() / want.norm()))
    assert errs[0] > 0.3 and errs[-1] < 0.02, (errs[0], errs[-1])
    before = torch.cat([t.tensor.detach().flatten() for t in method.targets]).double()
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) * 1e-3
    zo.apply_update(method.targets, 0, [], subspace_step=w)
    delta = torch.cat([t.tensor.detach().flatten() for t in method.targets]).double() - before
    torch.testing.assert_close(delta, -basis @ w, atol=1e-7, rtol=0)


def test_tracking_at_one_from_zero_is_the_plain_first_step():
    """a = 1 from g = 0 is the plain SPSA step on the subspace (g = mean_j d_j u_j), whatever n_pairs."""
    deltas = []
    for track in (0.0, 1.0):
        method, batch, _, _ = subspace_setup(n_pairs=2, zo_track=track, lr=1e-2)
        before = torch.cat([t.tensor.detach().flatten() for t in method.targets]).double()
        method.step(batch, 0)
        deltas.append(torch.cat([t.tensor.detach().flatten() for t in method.targets]).double() - before)
    assert deltas[0].norm() > 0
    torch.testing.assert_close(deltas[1], deltas[0], atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("quantized", [False, True])
def test_one_sided_probes_are_the_unperturbed_loss_and_the_plus_chunks(make_model_dir, tmp_path, quantized):
    """zo_one_sided: k+1 chunks; chunk 0 is the loss at θ (as a plain forward computes it), chunk j+1 the θ + εz_j
    chunk of the two-sided forward (same z), so d_j = (L+_j − L(θ))/ε; both through QuantLinear's chunk_scales and
    the generic module-swapping path (MeZO)."""
    if quantized:
        from quant.checkpoint import atomic_dir, load_quantized, open_source, quantize
        from quant.format import QuantConfig
        src, _ = make_model_dir("llama")
        with atomic_dir(tmp_path / "q") as tmp:
            quantize(open_source(src), tmp, QuantConfig(bits=4, group_size=32), progress=False)
        model = load_quantized(tmp_path / "q")
    else:
        model = build_model("llama")
    batch, seed, k, eps = batches(1, rows=2)[0], base.step_seed(0, 3), 3, 1e-3
    two = zo_method(model, quantized=quantized, n_pairs=k, eps=eps).step_losses(batch, seed)
    one = zo_method(model, quantized=quantized, n_pairs=k, eps=eps, zo_one_sided=True).step_losses(batch, seed)
    assert one.shape == (k + 1,) and two.shape == (2 * k,)
    with torch.no_grad():
        plain = objective.loss(model, "lm", batch)
    torch.testing.assert_close(one[0], plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(one[1:], two[0::2], rtol=1e-6, atol=0)
    assert (two[0::2] - two[1::2]).abs().min() > 1e-6  # the chunks do differ, so the check can tell them apart
    d = zo.projected_gradients(one, eps, one_sided=True)
    torch.testing.assert_close(d, (one[1:] - one[0]) / eps)
    # and the step's update uses those d with the same z: θ moves by −lr·mean_j clip(d_j)·z_j
    method = zo_method(model, quantized=quantized, n_pairs=k, eps=eps, zo_one_sided=True, clip=0.0, lr=1e-4)
    t = method.targets[1]
    before = t.tensor.detach().clone()
    method.step(batch, 3)
    expect = before - sum(1e-4 * float(d[j]) / k * zo.target_z(t, seed, j) for j in range(k))
    torch.testing.assert_close(t.tensor, expect, rtol=0, atol=1e-8)


def test_one_sided_derivative_matches_autograd_on_a_smooth_model():
    """With a small ε the one-sided d_j is the directional derivative z_j·∇L of autograd, up to ε/2·zᵀHz (3.6% at
    ε = 1e-4 on this model, 33% at 1e-3: z spans all its weights, so zᵀHz is large)."""
    model = build_model("llama")
    batch, seed = batches(1, rows=2)[0], base.step_seed(0, 0)
    method = zo_method(model, n_pairs=2, eps=1e-4, zo_one_sided=True)
    d = zo.projected_gradients(method.step_losses(batch, seed), 1e-4, one_sided=True)
    ref = build_model("llama")
    objective.loss(ref, "lm", batch).backward()
    grads = [t.tensor.grad for t in base.weight_targets(ref, ("linear",))]
    want = torch.stack([sum((g.double() * zo.target_z(t, seed, j).double()).sum() for g, t in
                             zip(grads, method.targets)) for j in range(2)])
    torch.testing.assert_close(d, want, rtol=5e-2, atol=0)
