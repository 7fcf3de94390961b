"""First-order methods against independent references: the scales' backward against autograd through the float64
dequant; LOMO against torch.optim.SGD and the reference package lomo_optim.Lomo; AdaLomo against transformers'
Adafactor; at most one gradient alive; fp16 loss scaling; bit-identical resume; export of first-order runs."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import build_model, input_ids, straight_and_resumed, train_config as config
from quant import kernels
from quant.linear import QuantLinear
from qzo2 import objective, trainer
from qzo2.config import ConfigError, TrainConfig
from qzo2.methods import base, build_method


# ---- the scales' backward -----------------------------------------------------------------------------------------
def quant_layer(k=64, n=48, group=16, bias=True, sym=True, act_order=False, seed=0):
    torch.manual_seed(seed)
    layer = QuantLinear.from_linear(torch.nn.Linear(k, n, bias=bias), 4, group, sym=sym)
    if act_order:  # a GPTQ desc_act g_idx: groups in a permuted column order
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        layer.g_idx = (perm // group).to(torch.int32)
        layer._reset_caches()
    layer.scales = layer.scales * (1 + 0.1 * torch.rand_like(layer.scales))
    return layer


@pytest.mark.parametrize("sym,act_order,bias", [(True, False, True), (False, False, False), (True, True, True)])
def test_scales_backward_matches_autograd_through_the_float64_dequant(sym, act_order, bias):
    layer = quant_layer(sym=sym, act_order=act_order, bias=bias)
    x = torch.randn(3, 5, 64)
    r = torch.randn(3, 5, 48)
    s = layer.scales.clone().requires_grad_(True)
    layer.scales = s
    xg = x.clone().requires_grad_(True)
    (layer(xg) * r).sum().backward()
    # reference: float64 dequant (kernels.dequant_reference) with autograd on the scales
    s64 = s.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    w = kernels.dequant_reference(layer.qweight, layer.zeros, s64, layer.g_idx, 4)
    y = x64 @ w.t() + (layer.bias.double() if bias else 0)
    (y * r.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)


def test_scales_backward_keeps_no_dense_weight_alive():
    """Between forward and backward only x and the scales are saved: no [N, K] weight (plain autograd through the
    dequant would keep one per layer)."""
    layers = [quant_layer(k=128, n=128, group=32, seed=i) for i in range(3)]
    for m in layers:
        m.scales.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(2, 128)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = x
        for m in layers[:-1]:
            y = torch.tanh(m(y))
        loss = layers[-1](y).sum()
    assert max(saved) < 128 * 128 // 8, saved  # activations and scales only
    loss.backward()
    assert all(m.scales.grad is not None and m.scales.grad.shape == m.scales.shape for m in layers)


def test_int4pack_forward_gets_the_same_backward():
    """bf16 activations on CPU run torch's int4pack kernel forward (which has no backward of its own)."""
    layer = quant_layer(k=128, n=64, group=32, bias=False)
    assert layer.resolved_backend(torch.bfloat16) == "int4pack"
    layer.scales.requires_grad_(True)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    g = layer.scales.grad.clone()
    layer.scales.grad = None
    layer.backend = "torch"
    layer(x.float()).sum().backward()
    torch.testing.assert_close(g, layer.scales.grad, rtol=2e-2, atol=1e-2)  # bf16 vs fp32 activations


@pytest.mark.parametrize("act_order", [False, True])
def test_half_gemm_backward_matches_the_float64_reference(monkeypatch, act_order):
    """The GPU's half-precision backward (bf16 activations: q − z and W in bf16, dW from bf16 inputs with an fp32
    result), taken here on CPU: the scale gradient equals the float64 reference to fp32 rounding (dW's products of
    bf16 values are exact in fp32), the input gradient to bf16 rounding."""
    import quant.linear as qlinear

    layer = quant_layer(k=128, n=64, group=32, bias=False, act_order=act_order)
    layer.backend = "torch"
    monkeypatch.setattr(qlinear, "_half_gemms", lambda *a: True)
    x = torch.randn(4, 128).to(torch.bfloat16)
    r = torch.randn(4, 64).to(torch.bfloat16)
    s = layer.scales.clone().requires_grad_(True)
    layer.scales = s
    xg = x.clone().requires_grad_(True)
    (layer(xg) * r).sum().backward()  # dy = r, exactly
    assert s.grad.dtype == torch.float32 and xg.grad.dtype == torch.bfloat16
    s64 = s.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    w = kernels.dequant_reference(layer.qweight, layer.zeros, s64, layer.g_idx, 4)
    ((x64 @ w.t()) * r.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-2, atol=1e-2)


def test_half_gemms_only_on_the_gpu_with_half_activations_and_integer_codes():
    import quant.linear as qlinear

    layer = quant_layer(k=64, n=32, group=16, bias=False)
    nf4 = QuantLinear.from_linear(torch.nn.Linear(64, 32, bias=False), 4, 16)
    nf4.codebook = torch.linspace(-1, 1, 16)
    half = lambda dt, dev: qlinear._half_gemms(layer, torch.empty(2, 64, dtype=dt, device=dev),  # noqa: E731
                                                 torch.empty(2, 32, dtype=dt, device=dev))
    assert half(torch.bfloat16, "meta") and half(torch.float16, "meta")  # meta: the simulation's stand-in GPU
    assert not half(torch.float32, "meta") and not half(torch.bfloat16, "cpu")
    x, dy = torch.empty(2, 64, dtype=torch.bfloat16, device="meta"), torch.empty(2, 32, dtype=torch.bfloat16,
                                                                                device="meta")
    assert not qlinear._half_gemms(nf4, x, dy)  # codebook values are not exact in bf16


# ---- LOMO / AdaLomo against references ---------------------------------------------------------------------------
def batches(n, vocab=300, rows=2, seq=10):
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
            for ids in (input_ids(batch=rows, seq=seq, vocab=vocab, seed=s) for s in range(n))]


def method_on(model, method="lomo", kinds=("linear",), quantized=False, **kw):
    cfg = TrainConfig(method=method, task="", train_file="x.jsonl", lr=kw.pop("lr", 1e-2), **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = base.scale_targets(model) if quantized else base.weight_targets(model, kinds)
    return build_method(cfg, model, targets, "lm")


def reference_steps(model, params, opt, data, clip_norm=0.0, clip_value=0.0):
    for p in params:
        p.requires_grad_(True)
    for b in data:
        objective.loss(model, "lm", b).backward()
        if clip_value:
            torch.nn.utils.clip_grad_value_(params, clip_value)
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1), dict(clip_grad_norm=0.05), dict(clip_grad_value=1e-3)])
def test_lomo_equals_sgd(kw):
    model = build_model("llama")
    ref = copy.deepcopy(model)
    method = method_on(model, **kw)
    data = batches(3)
    for i, b in enumerate(data):
        m = method.step(b, i)
        assert "skipped" not in m and method.max_grads_alive == 1
        assert all(t.tensor.grad is None for t in method.targets)  # nothing left behind
        if kw.get("clip_grad_norm"):
            assert m["grad_norm"] > kw["clip_grad_norm"]  # the clip really acted
    params = [p for n, p in ref.named_parameters() if n in {t.path for t in method.targets}]
    opt = torch.optim.SGD(params, lr=1e-2, weight_decay=kw.get("weight_decay", 0.0))
    reference_steps(ref, params, opt, data, kw.get("clip_grad_norm", 0.0), kw.get("clip_grad_value", 0.0))
    got = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n].detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.equal(got[n], p) for n, p in build_model("llama").named_parameters())  # it trained


@pytest.mark.parametrize("clip", [None, 0.05])
def test_lomo_equals_the_reference_package(clip):
    from lomo_optim import Lomo as RefLomo

    model = build_model("llama", tie_word_embeddings=True)
    ref = copy.deepcopy(model)
    method = method_on(model, kinds=("linear", "embedding"), clip_grad_norm=clip or 0.0)
    data = batches(3)
    for i, b in enumerate(data):
        method.step(b, i)
    for p in ref.parameters():
        p.requires_grad_(False)
    for t in base.weight_targets(ref, ("linear", "embedding")):
        t.tensor.requires_grad_(True)
    opt = RefLomo(ref, lr=1e-2, clip_grad_norm=clip)
    for b in data:
        if clip:
            opt.grad_norm(objective.loss(ref, "lm", b))
        opt.fused_backward(objective.loss(ref, "lm", b), 1e-2)
    got = dict(model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, updated once per step
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n].detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_lomo_on_scales_equals_sgd_through_plain_autograd_and_touches_nothing_else(make_model_dir, tmp_path):
    from quant.checkpoint import atomic_dir, load_quantized, open_source, quantize
    from quant.format import QuantConfig

    src, _ = make_model_dir("llama")
    with atomic_dir(tmp_path / "q") as tmp:
        quantize(open_source(src), tmp, QuantConfig(bits=4, group_size=32), progress=False)
    model, ref = load_quantized(tmp_path / "q"), load_quantized(tmp_path / "q")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".scales")}
    method = method_on(model, quantized=True, lr=1e-3, clip_grad_norm=1.0)
    data = batches(3)
    for i, b in enumerate(data):
        method.step(b, i)
    assert method.max_grads_alive == 1
    # reference: every QuantLinear as F.linear(x, dequantize(scales)) (autograd through the dequant), SGD on scales
    for m in ref.modules():
        if isinstance(m, QuantLinear):
            m.forward = (lambda m: lambda x: F.linear(x, kernels.dequant(m.qweight, m.zeros, m.scales, None, 4),
                                                      m.bias))(m)
    for p in ref.parameters():
        p.requires_grad_(False)
    params = [t.tensor for t in base.scale_targets(ref)]
    reference_steps(ref, params, torch.optim.SGD(params, lr=1e-3), data, clip_norm=1.0)
    for a, b in zip(base.scale_targets(model), base.scale_targets(ref)):
        torch.testing.assert_close(a.tensor.detach(), b.tensor.detach(), rtol=1e-5, atol=1e-7, msg=a.path)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # codes, zeros, norms, embeddings, head


@pytest.mark.parametrize("quantized", [False, True])
def test_adalomo_equals_hf_adafactor(quantized, make_model_dir, tmp_path):
    from transformers.optimization import Adafactor

    if quantized:
        from quant.checkpoint import atomic_dir, load_quantized, open_source, quantize
        from quant.format import QuantConfig

        src, _ = make_model_dir("llama")
        with atomic_dir(tmp_path / "q") as tmp:
            quantize(open_source(src), tmp, QuantConfig(bits=4, group_size=32), progress=False)
        model, ref = load_quantized(tmp_path / "q"), load_quantized(tmp_path / "q")
    else:
        # norm gains: 1-D tensors with a full second moment. (Not OPT: its k_proj bias has an exactly-zero gradient,
        # so both optimizers would normalize rounding noise into full-size steps of arbitrary sign.)
        model = build_model("llama")
        ref = copy.deepcopy(model)
    kinds = ("linear", "norm")
    method = method_on(model, "adalomo", kinds=kinds, quantized=quantized, lr=1e-2,
                       weight_decay=0.0 if quantized else 0.01)
    data = batches(4)
    for i, b in enumerate(data):
        assert "skipped" not in method.step(b, i)
    for p in ref.parameters():
        p.requires_grad_(False)
    targets = base.scale_targets(ref) if quantized else base.weight_targets(ref, kinds)
    decay = [t.tensor for t in targets if t.decay]
    rest = [t.tensor for t in targets if not t.decay]
    groups = [{"params": decay, "weight_decay": 0.0 if quantized else 0.01}] + ([{"params": rest,
                                                                                  "weight_decay": 0.0}] if rest else [])
    opt = Adafactor(groups, lr=1e-2, scale_parameter=True, relative_step=False, warmup_init=False, beta1=None,
                    clip_threshold=1.0, decay_rate=-0.8, eps=(1e-30, 1e-3))
    reference_steps(ref, [t.tensor for t in targets], opt, data)
    for a, b in zip(method.targets, targets):
        torch.testing.assert_close(a.tensor.detach(), b.tensor.detach(), rtol=1e-5, atol=1e-7, msg=a.path)
    assert int(method.t) == 4


# ---- fp16 loss scaling ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_fp16_overflow_skips_the_step_halves_the_scale_and_it_grows_back(name):
    model = build_model("llama").half()
    method = method_on(model, name, dtype="fp16", loss_scale_window=2)
    before = {t.path: t.tensor.clone() for t in method.targets}
    method.scaler.scale.fill_(2.0 ** 40)  # loss * 2^40: the fp16 gradients overflow
    b = batches(1)[0]
    m = method.step(b, 0)
    assert m["skipped"] == "overflow" and float(method.scaler.scale) == 2.0 ** 39
    assert all(torch.equal(t.tensor, before[t.path]) for t in method.targets)  # not one tensor moved
    assert all(t.tensor.grad is None for t in method.targets)
    method.scaler.scale.fill_(2.0 ** 4)
    for i in (1, 2):
        m = method.step(b, i)
        assert "skipped" not in m and m["loss_scale"] == 16.0
    assert float(method.scaler.scale) == 32.0  # two clean steps (the window): doubled
    assert any(not torch.equal(t.tensor, before[t.path]) for t in method.targets)
    assert all(torch.isfinite(t.tensor).all() for t in method.targets)


# ---- through the trainer: resume, export, errors ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lomo", "adalomo", "adamw"])
@pytest.mark.parametrize("on", ["scales", "weights"])
def test_first_order_resume_is_bit_identical(tiny, tmp_path, name, on):
    q, src, data = tiny
    model = q if on == "scales" else src
    kw = dict(method=name, lr=1e-2 if name != "adamw" else 1e-3, eval_every=3, save_every=2, log_every=1,
              clip_grad_norm=1.0)
    files = ("trained.safetensors",) + (("method.safetensors",) if name != "lomo" else ())
    straight, resumed = straight_and_resumed(tmp_path, model, data, 6, 4, files, **kw)
    a, b = trainer.RunDir(straight.run), trainer.RunDir(resumed.run)
    assert straight.best_step == resumed.best_step
    losses = [[r["loss"] for r in run.read_metrics() if "loss" in r and "dev_loss" not in r] for run in (a, b)]
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0]


def test_first_order_runs_export_as_gptq_and_hf(tiny, tmp_path):
    from quant.checkpoint import checkpoint_tensors, read_tensor
    from qzo2.exporter import export

    q, src, data = tiny
    cfg = config(tmp_path, q, data, method="lomo", steps=3, lr=1e-2, eval_every=0)
    trainer.train(cfg)
    trained = load_file(str(trainer.RunDir(cfg.output_dir).checkpoint("last") / "trained.safetensors"))
    export(cfg.output_dir, str(tmp_path / "gptq"))
    names, where = checkpoint_tensors(tmp_path / "gptq")
    base_names, base_where = checkpoint_tensors(q)
    for n in names:
        got, was = read_tensor(where, n), read_tensor(base_where, n)
        if n.endswith(".scales"):
            assert torch.equal(got, trained[n].half()) and not torch.equal(got, was)
        else:
            assert torch.equal(got, was), n  # codes, zeros, g_idx, norms, embeddings: byte for byte
    card = (tmp_path / "gptq" / "README.md").read_text()
    assert "Method: lomo, trains the quantization scales;" in card and "- first-order" in card
    assert "zeroth-order" not in card
    export(cfg.output_dir, str(tmp_path / "hf"), fmt="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"
    assert "Method: lomo, trains the quantization scales;" in (tmp_path / "hf" / "README.md").read_text()
    wcfg = config(tmp_path / "w", src, data, method="adalomo", steps=2, lr=1e-2, eval_every=0)
    trainer.train(wcfg)
    report = export(wcfg.output_dir, str(tmp_path / "whf"), fmt="hf")
    assert "Method: adalomo, trains the weights;" in (tmp_path / "whf" / "README.md").read_text()
    assert report.replaced == len(load_file(str(trainer.RunDir(wcfg.output_dir).checkpoint("last") /
                                                "trained.safetensors")))


def test_adamw_gradient_accumulation_equals_the_whole_batch(tiny, tmp_path):
    q, _, data = tiny
    one = trainer.train(config(tmp_path / "a", q, data, method="adamw", steps=3, lr=1e-3, eval_every=0))
    two = trainer.train(config(tmp_path / "b", q, data, method="adamw", steps=3, lr=1e-3, eval_every=0,
                               gradient_accumulation_steps=2))
    ta, tb = (load_file(str(trainer.RunDir(r.run).checkpoint("last") / "trained.safetensors")) for r in (one, two))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-7)


def test_first_order_config_errors():
    with pytest.raises(ConfigError, match="LOMO updates each tensor inside backward"):
        TrainConfig(method="lomo", gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="AdaLomo updates"):
        TrainConfig(method="adalomo", gradient_accumulation_steps=4)
    with pytest.raises(ConfigError, match="clip_grad_norm is a key of method lomo, adalomo, adamw, hift, grass, not of "
                                          "method=qzo"):
        TrainConfig(method="qzo", clip_grad_norm=1.0)
    TrainConfig(method="adamw", gradient_accumulation_steps=2, batch_size=16)


def test_first_order_refuses_streaming_a_dense_model(tiny, tmp_path):
    """A quantized model's codes stream through backward (tests/test_engine.py); a dense model's trained weights
    would have to travel back every step, so first-order training does not stream them."""
    _, src, data = tiny
    with pytest.raises(ValueError, match="first-order training streams a quantized model's codes"):
        trainer.train(config(tmp_path, src, data, method="lomo", offload="on", steps=1))
