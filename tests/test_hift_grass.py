"""HiFT (one group of units per step) and GRASS (row-sparse projected gradients) against independent references:
torch.optim.AdamW, dense autograd, Monte-Carlo expectations; what changes and what stays; state placement and size;
resume and export through the trainer."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import build_model, input_ids, straight_and_resumed, train_config as config
from qzo2 import objective, trainer
from qzo2.config import ConfigError, TrainConfig
from qzo2.methods import base, build_method
from qzo2.methods.grass import ProjectedLinear, select_rows
from qzo2.methods.hift import hift_groups, hift_units


def batches(n, rows=2, seq=10):
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
            for ids in (input_ids(batch=rows, seq=seq, vocab=300, seed=s) for s in range(n))]


def method_on(model, name, kinds=("linear",), quantized=False, **kw):
    cfg = TrainConfig(method=name, task="", train_file="x.jsonl", lr=kw.pop("lr", 1e-3), **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = base.scale_targets(model) if quantized else base.weight_targets(model, kinds)
    return build_method(cfg, model, targets, "lm")


def snapshot(method):
    return {t.path: t.tensor.detach().clone() for t in method.targets}


# ---- HiFT ---------------------------------------------------------------------------------------------------------
def test_hift_units_are_embedding_blocks_and_head():
    model = build_model("opt")  # token + position embeddings, 2 blocks, final layer norm, head
    targets = base.weight_targets(model, ("linear", "norm", "embedding"))
    units = hift_units(model, targets)
    paths = [sorted(t.path for t in u) for u in units]
    assert len(units) == 4
    assert paths[0] == ["model.decoder.embed_positions.weight", "model.decoder.embed_tokens.weight"]
    assert all(p.startswith("model.decoder.layers.0.") for p in paths[1])
    assert all(p.startswith("model.decoder.layers.1.") for p in paths[2])
    assert paths[3] == ["lm_head.weight", "model.decoder.final_layer_norm.bias", "model.decoder.final_layer_norm.weight"]
    up = hift_groups(units, 1, "up2down", 0)
    assert [sorted(t.path for t in g) for g in up] == paths[::-1]
    pairs = hift_groups(units, 2, "down2up", 0)
    assert [len(g) for g in pairs] == [len(units[0]) + len(units[1]), len(units[2]) + len(units[3])]
    shuffled = [[t.path for t in g] for g in hift_groups(units, 1, "random", 7)]
    assert shuffled == [[t.path for t in g] for g in hift_groups(units, 1, "random", 7)]  # fixed by the seed
    assert sorted(map(sorted, shuffled)) == sorted(paths)


def test_hift_with_one_group_is_adamw_step_for_step():
    a, b = build_model("llama"), build_model("llama")
    hift = method_on(a, "hift", kinds=("linear", "norm"), hift_group_size=100, weight_decay=0.01,
                     lr_schedule="linear", steps=4)
    adamw = method_on(b, "adamw", kinds=("linear", "norm"), weight_decay=0.01, lr_schedule="linear", steps=4)
    assert hift.k == 1
    for i, batch in enumerate(batches(4)):
        assert hift.step(batch, i)["loss"] == adamw.step(batch, i)["loss"]
        assert all(torch.equal(x.tensor, y.tensor) for x, y in zip(hift.targets, adamw.targets))


def test_hift_trains_one_group_per_step_and_keeps_the_rest_in_host_memory(monkeypatch):
    model = build_model("llama")
    method = method_on(model, "hift", kinds=("linear", "norm", "embedding"), lr_schedule="linear", steps=8)
    k = method.k
    assert k == 4  # embedding, 2 blocks, norm + head
    seen_on_device = []
    real = objective.chunk_sums

    def watching(*a):  # during a step's forward: only the active group's state is on the device
        seen_on_device.append(set(method.on_device))
        return real(*a)

    monkeypatch.setattr(objective, "chunk_sums", watching)
    updated = {t.path: 0 for t in method.targets}
    for i, batch in enumerate(batches(2 * k)):
        before = snapshot(method)
        method.step(batch, i)
        group = {t.path for t in method.groups[i % k]}
        changed = {p for p, v in snapshot(method).items() if not torch.equal(v, before[p])}
        assert changed == group, (i, changed ^ group)  # every tensor of the group moved, nothing outside it
        for p in changed:
            updated[p] += 1
        if i == k - 1:
            assert set(updated.values()) == {1}  # one cycle: every unit updated exactly once
        # between steps: every group's moments in host memory, nothing on the device, no gradients left
        assert method.on_device == set()
        for opt in method.optimizers:
            assert all(st["exp_avg"].device.type == "cpu" and st["exp_avg_sq"].device.type == "cpu"
                       for st in opt.state.values())
        assert all(t.tensor.grad is None and not t.tensor.requires_grad for t in method.targets)
    assert seen_on_device == [{i % k} for i in range(2 * k)]
    lrs = [method.lr_at(i) for i in range(8)]
    assert lrs[:4] == [lrs[0]] * 4 and lrs[4:] == [lrs[4]] * 4 and lrs[4] < lrs[0]  # changes at cycle boundaries
    assert lrs[4] == pytest.approx(1e-3 * (1 - 4 / 8))


def test_hift_backward_stops_at_the_active_group():
    """Training the top block only: no gradient reaches the embedding or the lower block (they do not require
    grad, so autograd never computes it)."""
    model = build_model("llama")
    method = method_on(model, "hift", kinds=("linear", "norm", "embedding"), hift_strategy="up2down")
    reached = []
    for name, mod in model.named_modules():
        if name in ("model.layers.0", "model.layers.1"):
            mod.register_full_backward_hook(lambda m, gi, go, name=name: reached.append(name))
    method.step(batches(1)[0], 0)  # up2down: step 0 trains norm + head
    method.step(batches(1)[0], 1)  # then block 1
    assert reached == ["model.layers.1"]


# ---- GRASS --------------------------------------------------------------------------------------------------------
def test_projected_gradient_equals_rho_times_the_dense_rows():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 4, 16, requires_grad=True), torch.randn(24, 16), torch.randn(24, requires_grad=True)
    r = torch.randn(3, 4, 24)
    idx = torch.tensor([5, 2, 5, 17])  # duplicates, as sampling with replacement draws
    rho = torch.rand(4) + 0.5
    proj = torch.zeros(4, 16, requires_grad=True)
    (ProjectedLinear.apply(x, w, b, proj, idx, rho) * r).sum().backward()
    wd = w.clone().requires_grad_(True)
    xd, bd = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    (F.linear(xd, wd, bd) * r).sum().backward()
    torch.testing.assert_close(proj.grad, rho[:, None] * wd.grad[idx], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xd.grad)
    torch.testing.assert_close(b.grad, bd.grad)


def test_top_r_picks_the_largest_rows_and_sampling_is_unbiased():
    norms = torch.tensor([0.1, 3.0, 0.5, 2.0, 0.0, 1.0])
    idx, rho = select_rows(norms, 3, "top")
    assert idx.tolist() == [1, 3, 5] and rho.tolist() == [1.0, 1.0, 1.0]
    g = torch.randn(6, 5) * norms[:, None]  # rows with these norms' scale
    q = g.norm(dim=1) / g.norm(dim=1).sum()
    gen = torch.Generator().manual_seed(0)
    mean = torch.zeros_like(g)
    n = 20000
    for _ in range(n):
        idx, rho = select_rows(g.norm(dim=1), 3, "sample", gen)
        assert torch.allclose(rho, 1 / torch.sqrt(3 * q[idx]))
        mean.index_add_(0, idx, rho[:, None] ** 2 * g[idx])  # P Pᵀ G for this draw
    torch.testing.assert_close(mean / n, g, rtol=0, atol=0.05 * g.abs().max().item())
    assert (mean[4] == 0).all()  # a zero-gradient row is never drawn


def test_grass_with_all_rows_equals_dense_adamw():
    """r = m, Top-r (ρ = I): GRASS is AdamW, across refreshes when the moments are kept (the k/v projections of a
    tiny Llama, 64 rows each)."""
    a, b = build_model("llama"), build_model("llama")
    for model in (a, b):
        for p in model.parameters():
            p.requires_grad_(False)
    pick = lambda m: [t for t in base.weight_targets(m) if ".k_proj." in t.path or ".v_proj." in t.path]  # noqa
    cfg = TrainConfig(method="grass", task="", train_file="x.jsonl", lr=1e-3, grass_rank=64, grass_refresh=2,
                      grass_reset=False, weight_decay=0.01)
    grass = build_method(cfg, a, pick(a), "lm")
    ref_targets = pick(b)
    assert len(grass.mats) == 4 and all(t.tensor.shape[0] == 64 for t in grass.mats)
    for t in ref_targets:
        t.tensor.requires_grad_(True)
    ref = torch.optim.AdamW([t.tensor for t in ref_targets], lr=1e-3, weight_decay=0.01, foreach=False)
    for i, batch in enumerate(batches(5)):
        grass.step(batch, i)
        objective.loss(b, "lm", batch).backward()
        ref.step()
        ref.zero_grad(set_to_none=True)
    for x, y in zip(grass.mats, ref_targets):
        torch.testing.assert_close(x.tensor, y.tensor.detach(), rtol=1e-5, atol=1e-7, msg=x.path)
    assert not torch.equal(grass.mats[0].tensor, pick(build_model("llama"))[0].tensor)  # it trained


def test_grass_touches_only_the_selected_rows_and_keeps_r_by_n_state():
    model = build_model("llama")
    method = method_on(model, "grass", grass_rank=8, grass_refresh=3, grass_select="sample", lr=1e-2)
    for t in method.mats:
        st = method.state[t.path]
        n = t.tensor.shape[1]
        assert st["exp_avg"].nbytes + st["exp_avg_sq"].nbytes == 2 * 4 * 8 * n
    for i, batch in enumerate(batches(4)):
        before = snapshot(method)
        method.step(batch, i)
        for t in method.mats:
            rows = set(method.state[t.path]["idx"].tolist())
            changed = (t.tensor != before[t.path]).any(dim=1).nonzero().flatten().tolist()
            assert set(changed) <= rows and changed, (i, t.path)
            assert t.tensor.grad is None and t.proj.grad is None


class ShapeLog(TorchDispatchMode):
    """Every op's output shapes, except in-place ops and views (which allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func._schema.name.endswith("_") or "out" in (kwargs or {})):
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    self.shapes.append(tuple(o.shape))
        return out


def test_grass_allocates_no_full_gradient_between_refreshes():
    model = build_model("llama", hidden_size=96, intermediate_size=160, num_attention_heads=4,
                        num_key_value_heads=4)  # matrix shapes distinct from every activation shape
    method = method_on(model, "grass", grass_rank=4, grass_refresh=10)
    shapes = {tuple(t.tensor.shape) for t in method.mats}
    data = batches(2, rows=1, seq=7)
    method.step(data[0], 0)  # a refresh: full gradients, one matrix at a time
    log = ShapeLog()
    with log:
        method.step(data[1], 1)
    assert not shapes & set(log.shapes), shapes & set(log.shapes)


def test_grass_refuses_a_quantized_model_and_accumulation(tiny, tmp_path):
    q, _, data = tiny
    with pytest.raises(ValueError, match="method=grass trains full weights"):
        trainer.train(config(tmp_path, q, data, method="grass", steps=1))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps > 1 does not work with method=grass"):
        TrainConfig(method="grass", gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="method=hift"):
        TrainConfig(method="hift", gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="method=grass does not scale the loss"):
        TrainConfig(method="grass", dtype="fp16")
    TrainConfig(method="grass", dtype="bf16")


# ---- through the trainer -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,on", [("hift", "scales"), ("hift", "weights"), ("grass", "weights")])
def test_resume_is_bit_identical_and_the_run_exports(tiny, tmp_path, name, on):
    from qzo2.exporter import export

    q, src, data = tiny
    model = q if on == "scales" else src
    kw = dict(method=name, lr=1e-3, eval_every=3, save_every=2, log_every=1)
    if name == "grass":
        kw.update(grass_rank=8, grass_refresh=3, grass_select="sample")
    straight, _ = straight_and_resumed(tmp_path, model, data, 7, 5, ("trained.safetensors", "method.safetensors"),
                                       **kw)
    report = export(straight.run, str(tmp_path / "out"), fmt="gptq" if on == "scales" else "hf")
    assert report.replaced > 0
