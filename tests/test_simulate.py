"""The GPU step on fake tensors (qzo2.simulate): its byte counts against real runs, where its tensors live, which host
synchronisations it makes, and the commands built on it (`qzo2 bench --simulate`, `qzo2 plan`)."""
from __future__ import annotations

import json

import pytest
import torch

from quant import kernels

from qzo2 import cli, simulate
from qzo2.bench import bench_modes, build_mode, mode_names

MODES = mode_names()  # forward and every method's bench modes (resident and streamed)
STEPS = 2


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A second, larger llama shape given the way users give theirs: a directory with only a config.json."""
    from transformers import AutoConfig

    d = tmp_path_factory.mktemp("small-shape")
    AutoConfig.for_model("llama", hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=6,
                         vocab_size=1024, max_position_embeddings=256).save_pretrained(d)
    return str(d)


def _cpu_peak(mode: str, shape: str, fake: bool, batch: int = 2, seq: int = 32) -> int:
    """Peak live bytes of STEPS steps of `mode` on the CPU: real tensors, or fake ones through the same code."""
    dev = torch.device("cpu")
    # the real CPU run without kernels' reused buffers, which the fake run (like CUDA) never keeps
    with (simulate.fake_gpu(dev) if fake else simulate.LiveBytes(dev)) as tracker, kernels.WORKSPACE.disabled():
        run = build_mode(mode, shape, batch, dev, torch.float32, 4, 32, 2, 0, seq=seq)
        tracker.reset_peak()
        for i in range(STEPS):
            run.step(i)
        return tracker.peak["cpu"]


def test_live_bytes_counts_each_storage_once_until_its_last_view_dies():
    with simulate.LiveBytes(torch.device("cpu")) as tracker:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B
        view = a[10:]
        b = torch.empty(250, dtype=torch.float64)  # 2000 B
        assert tracker.now["cpu"] == 6000
        del a
        assert tracker.now["cpu"] == 6000  # the view keeps the storage
        del view
        assert tracker.now["cpu"] == 2000
        c = torch.empty(100, dtype=torch.int8)
        assert tracker.peak["cpu"] == 6000 and tracker.now["cpu"] == 2100
        del b, c


@pytest.mark.parametrize("mode", MODES)
def test_the_fake_run_allocates_what_the_real_run_allocates(mode, small_dir):
    """The simulation is only as good as this: the same step with real tensors under the same tracker peaks where the
    fake run on device cpu does. The only difference allowed is HF's own: on fake tensors transformers takes its
    tracing path and builds the [rows, 1, T, T] attention mask (and a `where` over it) that a real run skips when
    every position is attended: at most 8 bytes per mask entry."""
    for shape in ("tiny", small_dir):
        real, fake = _cpu_peak(mode, shape, fake=False), _cpu_peak(mode, shape, fake=True)
        rows = 2 * 2  # batch 2, and a ZO step's two perturbation chunks
        assert 0 <= fake - real <= 8 * rows * 32 * 32, (shape, real, fake)


def _gpu_step(mode: str):
    """Two steps of `mode` on the simulated GPU; the second one watched -> (tracker, run)."""
    with simulate.fake_gpu() as tracker:
        run = build_mode(mode, "tiny", 2, simulate.STAND_IN, torch.bfloat16, 4, 32, 2, 0, seq=32)
        run.step(0)  # the method's state exists from here on
        tracker.reset_peak()
        tracker.watching = True
        run.step(1)
        tracker.watching = False
        return tracker, run


# the host synchronisations each step makes on purpose (everything else would stall the GPU for nothing)
INTENDED = {"zo": ["d2h methods/zo.py step_losses"],  # the 2k chunk losses, once
            "first_order": ["d2h methods/first_order.py global_value"],  # the loss, for the skip decision
            "forward": ["scalar qzo2/bench.py step"]}  # the bench floor reads its loss


def _where(sync: str) -> str:
    kind, place, func = sync.split(" ")
    return f"{kind} {place.split(':')[0]} {func}"


@pytest.mark.parametrize("mode", MODES)
def test_the_gpu_step_keeps_its_tensors_on_the_device_and_syncs_only_on_purpose(mode):
    """No silent CPU fallback: every tensor the step creates on the host is a handful of bytes (the losses read back),
    and the step's host synchronisations are exactly the intended ones. GRASS also reads, per matrix, how many
    distinct rows it sampled (torch.unique: a data-dependent size) -- listed, not hidden."""
    tracker, run = _gpu_step(mode)
    host = [(n, where) for dev, n, where in tracker.created if dev == "cpu"]
    assert all(n <= 64 for n, _ in host), host
    device = [n for dev, n, _ in tracker.created if dev == simulate.STAND_IN.type]
    assert device, "the step made no device tensors at all"
    syncs = [_where(s) for s in (f"{x.kind} {x.where}" for x in tracker.syncs)]
    spec = bench_modes().get(mode, (None, None))[0]
    expected = INTENDED["forward" if spec is None else "first_order" if spec.first_order else "zo"]
    if spec is not None and spec.name == "grass":
        assert syncs[:1] == expected and syncs[1:] and set(syncs[1:]) == {"shape methods/grass.py _update"}
    else:
        assert syncs == expected


@pytest.mark.parametrize("mode", [m for m, (_, how) in bench_modes().items() if how.offload])
def test_streamed_steps_move_what_they_should(mode):
    """QZO-offload uploads every block's codes once per step and downloads nothing but the losses; ZO2 mode also
    brings every updated weight back, once; the streamed first-order modes upload every block's codes twice (forward,
    then backward with recomputation) and download only the loss."""
    tracker, run = _gpu_step(mode)
    host_bytes = run.streamer.stats["host_bytes"]
    spec, how = bench_modes()[mode]
    if spec.first_order:
        assert tracker.moved["h2d"] == 2 * host_bytes
        assert tracker.moved["d2h"] == 8  # the step's float64 loss
        return
    assert tracker.moved["h2d"] == host_bytes
    losses = 2 * 8  # two float64 chunk losses
    if how.quantized:
        assert tracker.moved["d2h"] == losses
    else:
        assert tracker.moved["d2h"] == host_bytes + losses


def test_the_simulated_gpu_runs_the_gpu_kernels():
    """On the simulated GPU QuantLinear takes the Triton path (its custom op's fake gives the dense weight) and the
    CPU-only codes-minus-zeros cache stays off."""
    from quant.linear import QuantLinear
    from quant.triton_kernels import triton_dequant

    with simulate.fake_gpu():
        run = build_mode("qzo", "tiny", 1, simulate.STAND_IN, torch.bfloat16, 4, 32, 2, 0, seq=8)
        layers = [m for m in run.model.modules() if isinstance(m, QuantLinear)]
        assert {m.resolved_backend(torch.bfloat16) for m in layers} == {"triton"}
        assert not any(m.cache_base for m in layers)
        q = layers[0]
        w = triton_dequant(q.qweight, q.zeros, q.scales, None, 4, None, torch.bfloat16)
        assert w.shape == (q.out_features, q.in_features) and w.dtype == torch.bfloat16
        assert w.device == simulate.STAND_IN


def test_bench_simulate_prints_simulated_records(capsys):
    rc = cli.main(["bench", "--simulate", "--shape", "tiny", "--mode", "qzo,qzo-offload", "--seq", "32",
                   "--group-size", "32"])
    assert rc == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in recs] == ["qzo", "qzo-offload"]
    for r in recs:
        assert r["simulated"] is True and r["step_ms"] is None and r["device"] == "cuda (simulated)"
        parts = r["breakdown_gb"]
        assert abs(sum(parts.values()) - r["simulated_peak_gb"]) < 1e-3
    resident, streamed = recs
    assert streamed["breakdown_gb"]["slots"] > 0 and resident["breakdown_gb"]["slots"] == 0
    assert streamed["pinned_host_gb"] > 0 and streamed["d2h_gb_per_step"] < 1e-6


def test_plan_picks_the_placement_train_would_take(capsys, small_dir):
    """Resident when it fits, streamed when only that fits, and a clear 'does not fit' below both."""
    from qzo2.plan import plan

    (row,) = plan(small_dir, ["qzo"], seq=32, gpu_memory="1GB", reserve_gb=0.0, search=False)
    assert row.placement == "resident" and row.streamed_gb < row.resident_gb
    between = (row.streamed_gb + row.resident_gb) / 2
    (row2,) = plan(small_dir, ["qzo"], seq=32, gpu_memory=f"{between}GiB", reserve_gb=0.0, search=False)
    assert row2.placement == "streamed" and row2.mode == "qzo-offload"
    (row3,) = plan(small_dir, ["qzo"], seq=32, gpu_memory=f"{row.streamed_gb / 2}GiB", reserve_gb=0.0, search=False)
    assert row3.placement == "does not fit" and row3.max_batch == 0
    rc = cli.main(["plan", "tiny", "--method", "adalomo", "--seq", "32", "--no-search", "--json"])
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert rc == 0 and line["method"] == "adalomo" and line["simulated"] is True and line["placement"] == "resident"


def test_plan_search_finds_the_largest_batch_that_fits():
    """The batch search against the simulation itself: max_batch fits, max_batch + 1 does not."""
    from qzo2.plan import plan
    from qzo2.simulate import Simulation

    (row,) = plan("tiny", ["qzo"], seq=32, gpu_memory="0.004GiB", reserve_gb=0.0)
    assert 1 < row.max_batch < 1024
    with Simulation("qzo", "tiny", group_size=32) as sim:
        assert sim.measure(row.max_batch, 32)["simulated_peak_gb"] <= 0.004
        assert sim.measure(row.max_batch + 1, 32)["simulated_peak_gb"] > 0.004


def test_largest_matches_a_brute_force_search():
    from qzo2.plan import _largest

    for peaks in ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 1.5, 4, 4.1, 9, 9.5, 20, 30, 31, 40], [5, 6, 7]):
        for limit in (0.5, 1, 3.9, 4.05, 8.9, 9.5, 100):
            calls = []

            def peak_at(n, peaks=peaks):
                calls.append(n)
                return peaks[n - 1]

            brute = max([n for n in range(1, len(peaks) + 1) if peaks[n - 1] <= limit], default=0)
            assert _largest(peak_at, limit, 1, len(peaks)) == brute, (peaks, limit)


@pytest.mark.parametrize("argv, needle", [
    (["plan", "no-such-shape"], "unknown shape 'no-such-shape'"),
    (["plan", "tiny", "--method", "nope"], "unknown method 'nope'"),
    (["bench", "--simulate", "--shape", "nope"], "unknown shape 'nope'"),
    (["plan", "tiny", "--gpu-memory", "24"], "no unit"),  # 24 bytes was never meant
    (["plan", "tiny", "--gpu-memory", "0.5"], "no unit"),
    (["plan", "tiny", "--reserve", "nan"], "--reserve"),
    (["plan", "tiny", "--reserve=-100"], "--reserve"),
    (["plan", "tiny", "--method", ""], "--method is empty"),
    (["plan", "tiny", "--seq", "1000000"], "or less"),
    (["quantize", "x", "-o", "y", "--seqlen", "0"], "--seqlen"),
    (["quantize", "x", "-o", "y", "--nsamples=-5"], "--nsamples"),
    (["quantize", "x", "-o", "y", "--max-shard-size", "0.5"], "no unit"),
])
def test_bad_plan_input_gets_one_line(capsys, argv, needle):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_op_costs_count_matmul_flops_and_bytes_and_the_estimate_picks_the_bound():
    """One bf16 matmul on the simulated GPU costs 2·M·N·K FLOPs and reads and writes its three matrices; views and
    allocations cost nothing. The roofline estimate takes the longest of compute, memory and launch per op, and the
    host link's time when it is longer than the device's."""
    M, K, N = 64, 128, 256
    with simulate.fake_gpu() as tracker:
        a = torch.empty(M, K, dtype=torch.bfloat16, device=simulate.STAND_IN)
        b = torch.empty(K, N, dtype=torch.bfloat16, device=simulate.STAND_IN)
        tracker.reset_peak()
        c = (a @ b.t().t()).view(-1)  # two views around the product
        assert c.numel() == M * N
    assert tracker.op_costs == [(2 * M * N * K, 2 * (M * K + K * N + M * N), False)]
    spec = simulate.GPUSpec(half_flops=1e12, fp32_flops=1e11, mem_bw=1e9, link_bw=1e8)
    ops = [(10**9, 10**3, False),   # 1 ms of bf16 math, 1 µs of memory: compute
           (10**8, 10**3, True),    # fp32: 1 ms at the fp32 peak
           (0, 5 * 10**6, False),   # 5 ms of memory
           (10, 10, False)]         # a tiny op: the launch floor
    est = simulate.estimate(ops, 0, 0, spec)
    assert est["compute"] == 2.0 and est["memory"] == 5.0 and est["launch"] == 1e3 * simulate.LAUNCH_S
    assert est["step"] == est["device"] == round(7.0 + 1e3 * simulate.LAUNCH_S, 3) and est["bound"] == "memory"
    linked = simulate.estimate(ops, 10**6, 10**5, spec)  # 10 ms over the link, more than the device's 7
    assert linked["link"] == 10.0 and linked["step"] == 10.0 and linked["bound"] == "link"


@pytest.mark.parametrize("mode", ["lomo", "adalomo", "adalomo-offload"])
def test_first_order_gpu_steps_run_their_gemms_in_half_precision(mode):
    """bf16 first-order steps on the GPU run no fp32 GEMM: the scales' backward takes half inputs (dW with an fp32
    result), so every op with FLOPs reads bf16."""
    with simulate.Simulation(mode, "tiny", torch.bfloat16, 4, 32) as sim:
        sim.measure(2, 16, 1)
        sim.measure(2, 16, 1)  # the op list holds this step's ops (reset at each measure)
        gemms = [c for c in sim.tracker.op_costs if c[0] > 0]
    assert gemms and not [c for c in gemms if c[2]]


@pytest.mark.parametrize("mode", ["qzo", "adalomo"])
def test_simulated_flops_equal_torch_flop_counter(mode):
    """The step's FLOPs as the simulation counts them equal torch.utils.flop_counter.FlopCounterMode's count of the
    same step (an independent interception of the same ops), and at least the dense GEMMs' 2·params·tokens per
    forward."""
    from torch.utils.flop_counter import FlopCounterMode

    batch, seq = 2, 16
    with simulate.Simulation(mode, "tiny", torch.bfloat16, 4, 32) as sim:
        sim.measure(batch, seq, 1)  # the method's state is made in the first step
        with FlopCounterMode(display=False) as counter:
            rec = sim.measure(batch, seq, 1)
        linear_params = sum(m.in_features * m.out_features for m in sim.run.model.modules()
                            if hasattr(m, "in_features"))
    assert rec["tflop_per_step"] * 1e12 == counter.get_total_flops()
    # QZO: the ± pair of forwards; AdaLomo: one forward and at least the input gradient's GEMMs (the scales'
    # gradients add the weight-gradient GEMMs of the quantized layers, not of the head)
    dense = 2 * linear_params * batch * seq
    assert 2 * dense <= rec["tflop_per_step"] * 1e12 <= (2 if mode == "qzo" else 3) * dense * 1.5
    assert rec["device_ops_per_step"] > 0 and rec["hbm_gb_per_step"] > 0
    assert set(rec["estimate_ms"]) == set(simulate.GPUS)
