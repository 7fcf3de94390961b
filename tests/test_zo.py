"""The estimator: batched dual forward == separate forwards, z from counters, SPSA points along the gradient, DDC."""

import pytest
import torch

from conftest import FAMILIES, build_model, input_ids
from quant.checkpoint import atomic_dir, load_quantized, open_source, quantize
from quant.format import QuantConfig
from qzo2.methods import base, zo


def quantized_model(family, make_model_dir, tmp_path, backend="torch", **overrides):
    src, model = make_model_dir(family, **overrides)
    dst = tmp_path / f"{family}-q"
    with atomic_dir(dst) as tmp:
        quantize(open_source(src), tmp, QuantConfig(bits=4, group_size=32), progress=False)
    return load_quantized(dst, backend=backend), model.config.vocab_size


def separate_logits(model, targets, ids, seed, eps, n_pairs):
    """Reference: for each chunk, write θ ± εz_j into the model in place, run the plain forward, restore."""
    outs = []
    for j in range(n_pairs):
        for sign in (1, -1):
            saved = [t.tensor.clone() for t in targets]
            with torch.no_grad():
                for t in targets:
                    z = zo.z_for(t.tensor.shape, seed, t.index, j)
                    t.tensor.copy_((t.tensor.float() + sign * eps * z).to(t.tensor.dtype))
                outs.append(model(ids).logits)
                for t, s in zip(targets, saved):
                    t.tensor.copy_(s)
    return torch.cat(outs)


@pytest.mark.parametrize("family,tied", [(f, False) for f in sorted(FAMILIES)] + [("llama", True)])
@pytest.mark.parametrize("n_pairs", [1, 2])
def test_qzo_dual_forward_equals_separate_forwards(family, tied, n_pairs, make_model_dir, tmp_path):
    model, vocab = quantized_model(family, make_model_dir, tmp_path, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    targets = zo.as_zo(base.scale_targets(model))
    ids = input_ids(batch=2, seq=10, vocab=vocab)
    seed, eps = 1234, 1e-2
    with torch.no_grad(), zo.dual_forward(targets, seed, eps, n_pairs):
        batched = model(ids.repeat(2 * n_pairs, 1)).logits
    separate = separate_logits(model, targets, ids, seed, eps, n_pairs)
    # QuantLinear runs each chunk alone (same shapes as the separate run); the shared layers (attention, norms,
    # lm_head) see 2k·B rows instead of B, which may change the GEMM's blocking: fp32 rounding only.
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[:2], batched[2:4])  # the perturbation really changes the output
    assert all(m.chunk_scales is None for m in model.modules() if hasattr(m, "chunk_scales"))


@pytest.mark.parametrize("family,tied", [("llama", False), ("opt", False), ("llama", True), ("opt", True)])
@pytest.mark.parametrize("kinds", [("linear",), ("linear", "norm", "embedding")])
def test_mezo_dual_forward_equals_separate_forwards(family, tied, kinds):
    """The reference perturbs each tensor in place, so a tied lm_head (the same tensor as the embedding) sees the
    perturbation exactly when the embedding does."""
    model = build_model(family, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    targets = zo.as_zo(base.weight_targets(model, kinds))
    assert any(t.path.endswith("bias") for t in targets) == (family == "opt")
    ids = input_ids(batch=2, seq=10, vocab=300)
    seed, eps = 99, 1e-3
    with torch.no_grad(), zo.dual_forward(targets, seed, eps, 1):
        batched = model(ids.repeat(2, 1)).logits
    separate = separate_logits(model, targets, ids, seed, eps, 1)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules())  # patches removed


@pytest.mark.parametrize("tied", [False, True])
def test_mezo_estimate_matches_the_true_directional_derivative(tied):
    """(L(θ+εz) − L(θ−εz))/2ε from one dual forward ≈ ∇L·z by autograd, in float64, training the embedding of a
    model whose lm_head may be tied to it (before aliases were perturbed: relative error ~3, signs flipped)."""
    torch.manual_seed(0)
    model = build_model("llama", tie_word_embeddings=tied).double()
    targets = zo.as_zo(base.weight_targets(model, ("linear", "embedding")))
    ids = input_ids(batch=2, seq=10, vocab=300)

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    for p in model.parameters():
        p.requires_grad_(True)
    loss(model(ids).logits).backward()
    seed, eps = 5, 1e-4
    true = sum(float((t.tensor.grad * zo.z_for(t.tensor.shape, seed, t.index, 0).double()).sum()) for t in targets)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), zo.dual_forward(targets, seed, eps, 1):
        logits = model(ids.repeat(2, 1)).logits
    est = float(zo.projected_gradients(torch.stack([loss(logits[:2]), loss(logits[2:])]), eps)[0])
    assert est == pytest.approx(true, rel=1e-3), (est, true)


def test_z_is_a_function_of_seed_index_pair_only():
    a = zo.z_for((3, 5), 7, 2, 0)
    zo.z_for((100,), 7, 1, 0)  # other draws in between change nothing
    torch.manual_seed(123)  # nor does the global RNG
    assert torch.equal(a, zo.z_for((3, 5), 7, 2, 0))
    assert not torch.equal(a, zo.z_for((3, 5), 7, 3, 0))
    assert not torch.equal(a, zo.z_for((3, 5), 7, 2, 1))
    assert not torch.equal(a, zo.z_for((3, 5), 8, 2, 0))
    assert base.mix_seed(1, 2) != base.mix_seed(2, 1) and 0 <= base.mix_seed(2**70, -5) < 2**63


def test_z_same_in_any_generation_order():
    shapes = [(4, 8), (16,), (2, 3, 5)]
    forward = [zo.z_for(s, 11, i, 0) for i, s in enumerate(shapes)]
    backward = [zo.z_for(s, 11, i, 0) for i, s in reversed(list(enumerate(shapes)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))


def test_spsa_mean_points_along_true_gradient():
    """On a small differentiable problem (a float64 quadratic through a dequantized weight), the mean SPSA estimate
    over many seeds has high cosine similarity with the autograd gradient w.r.t. the scales."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 8, dtype=torch.float64)
    from quant.linear import QuantLinear

    q = QuantLinear.from_linear(layer.float(), 4, 16)
    x, y = torch.randn(64, 32), torch.randn(64, 8)

    def loss_of(scales):
        w = q.dequantize(scales.float(), dtype=torch.float64) if not scales.requires_grad else \
            (q.dequantize(torch.ones_like(q.scales), dtype=torch.float64) *
             scales.t().repeat_interleave(16, dim=1))
        return ((x.double() @ w.t() - y.double()) ** 2).mean()

    s = q.scales.double().clone().requires_grad_(True)
    loss_of(s).backward()
    true = s.grad.flatten()
    target = zo.ZOTarget(0, "scales", q, "scales")
    est = torch.zeros_like(true)
    n, eps = 400, 1e-4
    for seed in range(n):
        with torch.no_grad():
            (sp, sm) = zo.perturbed(target, seed, eps, 1)
            d = (loss_of(sp.double()) - loss_of(sm.double())) / (2 * eps)
        est += d * zo.z_for(q.scales.shape, seed, 0, 0).double().flatten()
    cos = torch.nn.functional.cosine_similarity(est / n, true, dim=0).item()
    # a random direction in 2*8=16... dims: 16 scales -> chance level ~ 1/sqrt(16) = 0.25
    assert cos > 0.9, cos


def test_projected_gradient_and_update():
    losses = torch.tensor([2.0, 1.0, 0.5, 0.7])
    d = zo.projected_gradients(losses, eps=0.5)
    assert d.tolist() == pytest.approx([1.0, -0.2])
    p = torch.nn.Parameter(torch.ones(3, 4), requires_grad=False)
    m = torch.nn.Module()
    m.w = p
    t = zo.ZOTarget(5, "w", m, "w")
    before = p.clone()
    zo.apply_update([t], seed=3, coeffs=[0.1, -0.05])
    z0, z1 = zo.z_for((3, 4), 3, 5, 0), zo.z_for((3, 4), 3, 5, 1)
    assert torch.allclose(p, before - 0.1 * z0 + 0.05 * z1)
    zo.apply_update([t], seed=3, coeffs=[100.0], floor=1e-7)
    assert p.min() < 0  # only quantization scales are floored; a tensor trained beside them is not
    m.scales = torch.nn.Parameter(torch.ones(3, 4), requires_grad=False)
    zo.apply_update([zo.ZOTarget(5, "scales", m, "scales")], seed=3, coeffs=[100.0], floor=1e-7)
    assert m.scales.min().item() == pytest.approx(1e-7)
    q = torch.ones(2)
    m.v = torch.nn.Parameter(q.clone(), requires_grad=False)
    zo.apply_update([zo.ZOTarget(0, "v", m, "v")], seed=1, coeffs=[0.0], weight_decay=0.1, lr=0.5)
    assert torch.allclose(m.v, torch.full((2,), 1 - 0.05))


def test_mezo_targets_treat_a_tied_lm_head_as_the_embedding():
    model = build_model("llama", tie_word_embeddings=True)
    linear = {t.path for t in base.weight_targets(model, ("linear",))}
    assert "lm_head.weight" not in linear and len(linear) == 14
    everything = [t.path for t in base.weight_targets(model, ("linear", "embedding"))]
    assert "model.embed_tokens.weight" in everything and "lm_head.weight" not in everything
    untied = {t.path for t in base.weight_targets(build_model("llama"), ("linear",))}
    assert "lm_head.weight" in untied


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours(dtype):
    x = torch.tensor([1.0 + 2 ** -9, -3.3, 1e-3, 0.1234567, 1.0, -0.0], dtype=torch.float32)
    draws = torch.stack([base.round_stochastic(x.clone(), dtype, torch.Generator().manual_seed(i))
                         for i in range(4000)]).float()
    nearest = x.to(dtype).float()
    below = torch.where(nearest > x, torch.nextafter(x.to(dtype), torch.tensor(-1e9, dtype=dtype)).float(), nearest)
    above = torch.nextafter(below.to(dtype), torch.tensor(1e9, dtype=dtype)).float()
    exact = nearest == x
    assert ((draws == below) | (draws == above) | exact).all()  # only ever one of the two neighbours
    assert (draws[:, exact] == x[exact]).all()  # representable values never move
    p_up = (x - below) / (above - below)
    frac = (draws == above).double().mean(0)
    assert torch.allclose(frac[~exact], p_up[~exact].double(), atol=0.03), (frac, p_up)
    again = base.round_stochastic(x.clone(), dtype, torch.Generator().manual_seed(0))
    assert torch.equal(again.float(), draws[0])  # a function of the generator's seed


def test_bf16_updates_below_half_an_ulp_survive_in_expectation():
    """MeZO-size steps on bf16 weights: round-to-nearest drops every one of them; apply_update (stochastic rounding)
    moves the mean by what was asked."""
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16), requires_grad=False)
    t = zo.ZOTarget(0, "w", m, "w")
    step = 2 ** -11  # a quarter of bf16's ulp at 1.0 (2^-7 ... half-ulp 2^-8)
    m.v = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16), requires_grad=False)
    for i in range(40):  # weight decay alone, no z: θ ← θ − lr·wd·θ with lr·wd = step
        zo.apply_update([t], seed=i, coeffs=[0.0], weight_decay=step, lr=1.0)
        m.v.copy_((m.v.float() * (1 - step)).to(torch.bfloat16))  # what round-to-nearest would keep
    want = (1 - step) ** 40
    assert torch.equal(m.v, torch.ones_like(m.v))  # nearest: nothing moved
    assert abs(m.w.float().mean().item() - want) < 2e-3 and want < 0.99


def test_large_tensors_are_perturbed_and_updated_a_block_at_a_time(monkeypatch):
    """Past Z_BLOCK entries z is drawn in row blocks, each its own stream (block 0 the tensor's old one), and the
    perturbation and the update are built block by block: the values equal the whole-tensor formulas with that z,
    and θ is never touched while perturbations are built."""
    monkeypatch.setattr(zo, "Z_BLOCK", 40)  # rows of 16: blocks of 2 rows
    shape, seed, eps = (7, 16), 5, 1e-2
    assert zo.row_blocks(shape) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    z = zo.z_for(shape, seed, 3, 1)
    blocks = [zo.z_block(shape, seed, 3, 1, c) for c in range(4)]
    assert torch.equal(z, torch.cat(blocks))
    gen = base.generator(seed, 3, 1, "cpu")  # block 0 is the start of the tensor's own stream, as before blocks
    assert torch.equal(blocks[0], torch.randn((2, 16), generator=gen))
    assert not torch.equal(blocks[1], torch.randn((2, 16), generator=base.generator(seed, 3, 1, "cpu")))

    lin = torch.nn.Linear(16, 7, bias=False)
    t = base.Target(3, "w", lin, "weight")
    before = lin.weight.detach().clone()
    plus, minus = zo.perturbed_pair(t, seed, eps, 1)
    assert torch.equal(lin.weight, before)
    assert torch.equal(plus, before + eps * z) and torch.equal(minus, before - eps * z)

    coeffs = [0.5, -0.25]
    with torch.no_grad():
        zo.apply_update([t], seed, coeffs, weight_decay=0.1, lr=0.01)
    expect = before - 0.5 * zo.z_for(shape, seed, 3, 0) + 0.25 * z - before * (0.01 * 0.1)
    torch.testing.assert_close(lin.weight.detach(), expect, rtol=0, atol=1e-6)
