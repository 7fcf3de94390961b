"""The CUDA paths of the engine and the estimator: pinned host buffers, side-stream uploads and downloads ordered by
events, z and stochastic rounding drawn on the device. Each test compares against the resident model on the same
GPU (bit for bit). The same code runs on CPU in test_engine.py / test_zo.py; these run only where a GPU is."""
import pytest
import torch

from quant.checkpoint import decoder_blocks
from qzo2 import engine
from qzo2.methods import base, zo
from qzo2.bench import bench_method, random_batch, random_model, run_bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU paths: test_engine.py)")
DEV = torch.device("cuda", 0)


def test_z_and_rounding_are_drawn_on_the_device_deterministically():
    z = zo.z_for((1000, 64), seed=5, index=3, pair=0, device=DEV)
    assert z.device.type == "cuda" and z.dtype == torch.float32
    assert torch.equal(z, zo.z_for((1000, 64), 5, 3, 0, DEV))
    assert not torch.equal(z, zo.z_for((1000, 64), 5, 4, 0, DEV))
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    x = torch.full((200000,), 1 + 2 ** -9, device=DEV)  # a quarter of the way from 1 to the next bf16
    r = base.round_stochastic(x, torch.bfloat16, torch.Generator(device=DEV).manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1 + 2 ** -7} and abs((r == 1 + 2 ** -7).float().mean() - 0.25) < 0.01


def _steps(model, targets, n: int, mode: str):
    batch = random_batch(model.config.vocab_size, 2, 64, DEV)
    method = bench_method(mode, model, targets)
    return [method.step(batch, i)["loss"] for i in range(n)]


@pytest.mark.parametrize("shape", ["tiny", "tiny-opt"])
@pytest.mark.parametrize("depth", [2, 3])
def test_streamed_qzo_on_cuda_is_bit_identical_to_resident(shape, depth):
    resident = random_model(shape, torch.bfloat16, DEV, quantized=True, group_size=64, seed=1)
    streamed = random_model(shape, torch.bfloat16, DEV, quantized=True, group_size=64, seed=1, codes_device="cpu")
    _, blocks = decoder_blocks(streamed)
    s = engine.BlockStreamer(streamed, DEV, set(range(len(blocks))), depth)
    assert all(h.is_pinned() for h in s.host) and all(slot.is_cuda for slot in s.slots)
    want = _steps(resident, base.scale_targets(resident), 4, "qzo")
    got = _steps(streamed, base.scale_targets(streamed), 4, "qzo")
    assert want == got
    for a, b in zip(base.scale_targets(resident), base.scale_targets(streamed)):
        assert torch.equal(a.tensor, b.tensor), a.path
    assert s.stats["uploads"] == 4 * len(blocks) and s.stats["d2h_bytes"] == 0


@pytest.mark.parametrize("shape", ["tiny", "tiny-opt"])
def test_zo2_on_cuda_is_bit_identical_to_resident_mezo(shape):
    resident = random_model(shape, torch.bfloat16, DEV, seed=2)
    streamed = random_model(shape, torch.bfloat16, DEV, seed=2)
    ref, targets = base.weight_targets(resident), base.weight_targets(streamed)
    _, blocks = decoder_blocks(streamed)
    s = engine.BlockStreamer(streamed, DEV, set(range(len(blocks))), 2, kind="weights", trained=targets)
    want, got = _steps(resident, ref, 4, "mezo"), _steps(streamed, targets, 4, "mezo")
    assert want == got
    s.flush()
    for a, b in zip(ref, targets):
        assert torch.equal(a.tensor, b.tensor.to(DEV)), a.path
    trained = sum(t.tensor.nbytes for t in targets if (id(t.module), t.name) in s.streamed_keys)
    assert s.stats["d2h_bytes"] == 4 * trained  # updates of steps 0..2 on arrival, step 3 by flush


def test_bench_runs_every_mode_on_cuda():
    recs = run_bench("tiny", "forward,qzo,qzo-offload,mezo,zo2,lomo,adalomo,adamw", batch=2, seq=64, steps=3, warmup=1, compare=True,
                     echo=lambda line: None)
    assert all(r["error"] is None and r["torch_peak_gb"] > 0 and r["gpu"] for r in recs)
    by = {r["mode"]: r for r in recs}
    assert by["qzo"]["loss"] == by["qzo-offload"]["loss"] and by["mezo"]["loss"] == by["zo2"]["loss"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scale_backward_equals_the_fp32_one(dtype):
    """On the GPU, bf16/fp16 activations take the half-precision backward (quant.linear._half_gemms): the scale
    gradient equals the fp32 backward's on the same (exactly upcast) inputs up to fp32 summation order, the input
    gradient within the half dtype's rounding, and mm(out_dtype=float32) exists for the dtype on this GPU."""
    from quant import linear as qlinear
    from quant.linear import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(512, 256, bias=False), 4, 128, sym=False).to(DEV)
    x = torch.randn(3, 7, 512, device=DEV).to(dtype)
    dy = torch.randn(3, 7, 256, device=DEV).to(dtype)
    assert qlinear._half_gemms(layer, x, dy)
    grads = {}
    for name, xi, dyi in (("half", x, dy), ("fp32", x.float(), dy.float())):
        s = layer.scales.detach().clone().requires_grad_(True)
        layer.scales = s
        xg = xi.clone().requires_grad_(True)
        (layer(xg) * dyi).sum().backward()
        grads[name] = (s.grad, xg.grad)
    torch.testing.assert_close(grads["half"][0], grads["fp32"][0], rtol=1e-4, atol=1e-6)
    assert grads["half"][1].dtype == dtype
    torch.testing.assert_close(grads["half"][1].float(), grads["fp32"][1], rtol=2e-2, atol=2e-2)
