"""The offload engine on CPU: streamed and resident models compute the same bits (forward and training, two
families), prefetch order and slot reuse for every depth, H2D bytes per forward, and the residency plan."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEXT, build_model, input_ids
from quant.checkpoint import atomic_dir, decoder_blocks, open_source, quantize
from quant.format import QuantConfig
from quant.linear import QuantLinear
from qzo2 import engine, trainer
from qzo2.methods import base, zo
from qzo2.config import ConfigError, TrainConfig, parse_size
from qzo2.model import load_model

N_BLOCKS = 5


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory, tokenizer):
    """{family: quantized dir} for tiny 5-block Llama and OPT models, and a small train jsonl."""
    root = tmp_path_factory.mktemp("engine")
    out = {}
    for family in ("llama", "opt", "tied"):  # tied: a llama whose LM head is its embedding
        src = root / f"{family}-src"
        build_model("llama" if family == "tied" else family, vocab_size=len(tokenizer) + 20,
                    num_hidden_layers=N_BLOCKS, **({"tie_word_embeddings": True} if family == "tied" else {})
                    ).save_pretrained(src)
        tokenizer.save_pretrained(src)
        out[family] = root / f"{family}-q"
        with atomic_dir(out[family]) as tmp:
            quantize(open_source(src), tmp, QuantConfig(bits=4, group_size=32), progress=False)
    words = TEXT.split()
    rows = [{"prompt": " ".join(words[i:i + 4]), "completion": " " + " ".join(words[i + 4:i + 8])}
            for i in range(0, 32, 8)]
    out["data"] = root / "train.jsonl"
    out["data"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def code_bytes(model, blocks) -> int:
    """qweight + zeros bytes of the QuantLinears of the given decoder blocks."""
    _, layers = decoder_blocks(model)
    return sum(m.qweight.nbytes + m.zeros.nbytes for b in blocks for m in layers[b].modules()
               if isinstance(m, QuantLinear))


# ---- equality --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_forward_equals_resident(qdirs, family):
    resident, _ = load_model(str(qdirs[family]))
    streamed, _ = load_model(str(qdirs[family]))
    ids = input_ids(batch=2, seq=10)
    with torch.no_grad():
        want = resident(input_ids=ids).logits
        for depth, blocks in [(2, range(N_BLOCKS)), (3, range(N_BLOCKS)), (4, range(N_BLOCKS)), (2, {1, 3}),
                              (3, {0}), (2, {2, 3, 4}), (4, {0, 1, 4})]:
            s = engine.BlockStreamer(streamed, "cpu", set(blocks), depth)
            assert torch.equal(streamed(input_ids=ids).logits, want), (depth, blocks)
            for b in blocks:  # outside its forward a streamed layer's codes are views of its block's host buffer
                host = s.host[s.pos[b]]
                inside = range(host.data_ptr(), host.data_ptr() + host.numel())
                layers = [m for m in decoder_blocks(streamed)[1][b].modules() if isinstance(m, QuantLinear)]
                assert all(m.qweight.data_ptr() in inside and m.zeros.data_ptr() in inside and m._packed is None
                           for m in layers)
            s.remove()
        assert torch.equal(streamed(input_ids=ids).logits, want)  # resident again after remove()


def test_dual_forward_uploads_each_block_once_and_matches(qdirs):
    """One batched ±ε forward (2 pairs, 4 chunks) streams each block once and gives the resident losses."""
    resident, _ = load_model(str(qdirs["llama"]))
    streamed, _ = load_model(str(qdirs["llama"]))
    want_bytes = code_bytes(streamed, range(1, N_BLOCKS))
    s = engine.BlockStreamer(streamed, "cpu", set(range(1, N_BLOCKS)), depth=3)
    ids = zo.repeat_batch({"input_ids": input_ids(batch=2, seq=8)}, 4)["input_ids"]
    logits = []
    for model in (resident, streamed):
        targets = base.scale_targets(model)
        with torch.no_grad(), zo.dual_forward(targets, seed=7, eps=1e-2, n_pairs=2):
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])
    assert not torch.equal(logits[0][:2], logits[0][2:4])  # the chunks really saw different scales
    assert s.stats["uploads"] == N_BLOCKS - 1 and s.stats["h2d_bytes"] == want_bytes and s.stats["d2h_bytes"] == 0


def test_h2d_bytes_per_forward_are_the_streamed_code_bytes(qdirs):
    model, _ = load_model(str(qdirs["opt"]))
    blocks = {0, 2, 3}
    want, largest = code_bytes(model, blocks), max(code_bytes(model, [b]) for b in blocks)
    s = engine.BlockStreamer(model, "cpu", blocks, depth=2)
    assert s.stats["host_bytes"] == want
    with torch.no_grad():
        for n in (1, 2, 3):
            model(input_ids=input_ids(batch=1, seq=6, seed=n))
            assert s.stats["h2d_bytes"] == n * want and s.stats["uploads"] == n * len(blocks)
    assert s.stats["d2h_bytes"] == 0 and s.stats["slot_bytes"] == largest and len(s.slots) == 2


# ---- order -----------------------------------------------------------------------------------------------------------
def check_trace(trace, order, depth, forwards):
    """Replays (op, block, slot) against a model of the slots: an upload needs a free slot, a compute needs its block
    uploaded into its slot, a release frees it; slot = position % depth; uploads run `depth` ahead; one upload per
    streamed block per forward."""
    pos = {b: p for p, b in enumerate(order)}
    state = {s: None for s in range(depth)}  # None | ("loaded", b) | ("computing", b)
    uploads, this_forward, outstanding = [], [], 0
    for op, b, s in trace:
        assert s == pos[b] % depth, (op, b, s)
        if op == "upload":
            assert state[s] is None, f"upload of {b} into slot {s} before its previous user {state[s]} released"
            state[s] = ("loaded", b)
            this_forward = [b] if pos[b] == 0 else this_forward + [b]
            uploads.append(b)
            outstanding += 1
            assert outstanding <= depth
        elif op == "compute":
            assert state[s] == ("loaded", b), f"compute of {b} before its upload (slot {s}: {state[s]})"
            state[s] = ("computing", b)
            # prefetch: the next depth - 1 blocks of this forward are already on their way
            assert len(this_forward) >= min(pos[b] + depth, len(order)), (b, this_forward)
        elif op in ("update", "download"):  # weights mode: on arrival, before the compute
            assert state[s] == ("loaded", b), (op, b, state[s])
        else:
            assert state[s] == ("computing", b)
            state[s] = None
            outstanding -= 1
    assert uploads == list(order) * forwards
    assert all(v is None for v in state.values())  # every slot released at the end of a forward


@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("blocks", [range(N_BLOCKS), {1, 2, 3, 4}, {0, 2, 4}, {3}])
def test_prefetch_order_and_slot_reuse(qdirs, depth, blocks):
    model, _ = load_model(str(qdirs["llama"]))
    s = engine.BlockStreamer(model, "cpu", set(blocks), depth, trace=True)
    with torch.no_grad():
        for n in range(2):
            model(input_ids=input_ids(batch=1, seq=6, seed=n))
    order = sorted(blocks)
    check_trace(s.trace, order, depth, forwards=2)
    if 0 not in blocks:  # the first uploads are issued when block 0 starts, ahead of the first streamed block
        first_compute = next(i for i, t in enumerate(s.trace) if t[0] == "compute")
        assert first_compute == min(depth, len(order))


def test_a_cut_short_forward_leaves_the_pipeline_usable(qdirs):
    model, _ = load_model(str(qdirs["llama"]))
    s = engine.BlockStreamer(model, "cpu", set(range(N_BLOCKS)), 2, trace=True)
    ids = input_ids(batch=1, seq=6)

    def fail(*args):
        raise RuntimeError("cut short")

    with torch.no_grad():
        want = model(input_ids=ids).logits
        layer = next(m for m in decoder_blocks(model)[1][2].modules() if isinstance(m, QuantLinear))
        boom = layer.register_forward_pre_hook(fail)  # inside block 2: its release hook never runs
        with pytest.raises(RuntimeError, match="cut short"):
            model(input_ids=ids)
        boom.remove()
        assert s.trace[-1] == ("compute", 2, 0)
        s.trace.clear()
        assert torch.equal(model(input_ids=ids).logits, want)
    assert s.trace[0] == ("release", 2, 0)  # the next forward frees what the failed one held
    check_trace(s.trace[1:], list(range(N_BLOCKS)), 2, forwards=1)


# ---- residency -------------------------------------------------------------------------------------------------------
def test_plan_residency():
    blocks = [10] * 8
    assert engine.plan_residency(blocks, 20, 1000, 2) == set()  # everything fits
    assert engine.plan_residency(blocks, 20, None, 2) == set()  # no budget (CPU)
    assert engine.plan_residency(blocks, 20, 100, 2) == set()  # exactly fits
    # 99: streaming k <= depth blocks saves nothing (the slots cost as much), so the first fit streams 3
    assert engine.plan_residency(blocks, 20, 99, 2) == {5, 6, 7}
    assert engine.plan_residency(blocks, 20, 75, 2) == {3, 4, 5, 6, 7}
    assert engine.plan_residency(blocks, 20, 75, 3) == {2, 3, 4, 5, 6, 7}
    assert engine.plan_residency(blocks, 20, 40, 2) == set(range(8))  # only all-streamed fits
    assert engine.plan_residency(blocks, 20, 5, 2) == set(range(8))  # nothing fits: the best there is
    # slots are sized to the largest streamed block: 2 slots of 30 only pay off when 5 blocks stream
    assert engine.plan_residency([10] * 5 + [30], 0, 79, 2) == {1, 2, 3, 4, 5}
    assert engine.plan_residency(blocks, 20, 10 ** 9, 2, "on") == set(range(8))
    assert engine.plan_residency(blocks, 20, 1, 2, "off") == set()
    assert engine.plan_residency([], 20, 1, 2, "on") == set()
    with pytest.raises(ValueError, match="depth"):
        engine.plan_residency(blocks, 20, 100, 1)
    with pytest.raises(ValueError, match="not one of"):
        engine.plan_residency(blocks, 20, 100, 2, "sometimes")


def test_plan_for_model_and_budgets(qdirs):
    model, _ = load_model(str(qdirs["llama"]))
    block = code_bytes(model, [0])
    total = engine._tensor_bytes(model)
    assert engine.plan_for_model(model, total, 2) == set()
    assert engine.plan_for_model(model, total - 1, 2) == {2, 3, 4}  # 3 streamed (2 slots) is the first saving
    assert engine.plan_for_model(model, total - 2 * block, 2) == {1, 2, 3, 4}
    assert engine.plan_for_model(model, None, 2) == set()
    assert engine.plan_for_model(model, 1, 3, "off") == set()
    assert engine.device_budget("", torch.device("cpu")) is None
    assert engine.device_budget("1.5GiB", torch.device("cpu")) == 3 << 29
    assert (parse_size("500MB"), parse_size("8gib"), parse_size("4096b"), parse_size("1073741824")) == (
        500 << 20, 8 << 30, 4096, 1 << 30)
    for bare in ("24", "4096", "0.5"):  # a number without a unit under 1 MiB: a forgotten unit, never bytes
        with pytest.raises(ValueError, match="no unit"):
            parse_size(bare)
    with pytest.raises(ConfigError, match="gpu_memory"):
        TrainConfig(gpu_memory="lots")
    with pytest.raises(ConfigError, match="prefetch_depth"):
        TrainConfig(prefetch_depth=1)
    with pytest.raises(ConfigError, match="offload"):
        TrainConfig(offload="maybe")


# ---- training --------------------------------------------------------------------------------------------------------
def train_run(tmp_path, qdirs, family, name, monkeypatch, **kw):
    """Train 5 steps; -> (trained tensors, first training metrics record, streamer or None)."""
    zo_keys = dict(eps=1e-3, n_pairs=2) if kw.get("method", "qzo") in ("qzo", "mezo") else {}
    cfg = TrainConfig(**{**dict(model=str(qdirs[family]), task="", train_file=str(qdirs["data"]),
                                dev_file=str(qdirs["data"]), steps=5, batch_size=2, lr=1e-3, max_length=24,
                                eval_every=0, save_every=5, log_every=5, output_dir=str(tmp_path / name),
                                progress=False, **zo_keys), **kw})
    import qzo2.methods

    made = []
    real = qzo2.methods.place_model
    monkeypatch.setattr(qzo2.methods, "place_model", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    trainer.train(cfg)
    run = trainer.RunDir(cfg.output_dir)
    rec = [r for r in run.read_metrics() if "loss" in r and "dev_loss" not in r][0]
    return load_file(str(run.checkpoint("last") / "trained.safetensors")), rec, made[0]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_offloaded_training_is_bit_identical_to_resident(qdirs, tmp_path, monkeypatch, family):
    want, rec, s = train_run(tmp_path, qdirs, family, "resident", monkeypatch, offload="off")
    assert s is None and rec["streamed_blocks"] == 0 and rec["device"] == "cpu"
    start = json.loads((tmp_path / "resident" / "checkpoints" / "step-000000" / "state.json").read_text())
    assert start["step"] == 0
    first = load_file(str(tmp_path / "resident" / "checkpoints" / "step-000000" / "trained.safetensors"))
    assert any(not torch.equal(first[k], want[k]) for k in want)  # training moved the scales
    for depth in (2, 3):
        got, rec, s = train_run(tmp_path, qdirs, family, f"offload-{depth}", monkeypatch, offload="on",
                                prefetch_depth=depth)
        assert rec["streamed_blocks"] == N_BLOCKS and rec["prefetch_depth"] == depth
        # 5 dual-forward steps + dev evaluations at step 0 and 5 (one forward each: 4 rows <= eval_batch_size)
        assert s.stats["uploads"] == N_BLOCKS * 7 and s.stats["d2h_bytes"] == 0
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (family, depth)


def test_auto_offload_streams_what_the_budget_leaves_out(qdirs, tmp_path, monkeypatch):
    model, _ = load_model(str(qdirs["llama"]))
    budget = engine._tensor_bytes(model) - 2 * code_bytes(model, [0])
    want, _, _ = train_run(tmp_path, qdirs, "llama", "resident", monkeypatch, offload="off")
    got, rec, s = train_run(tmp_path, qdirs, "llama", "auto", monkeypatch, gpu_memory=f"{budget}B")  # bytes: a bare number under 1 MiB is refused
    assert rec["streamed_blocks"] == 4 and s.order == [1, 2, 3, 4]
    assert all(torch.equal(got[k], want[k]) for k in want)
    _, rec, s = train_run(tmp_path, qdirs, "llama", "auto-cpu", monkeypatch)  # CPU, no budget: all resident
    assert s is None and rec["streamed_blocks"] == 0


# ---- ZO2 mode: full weights streamed, the update applied on arrival, trained tensors copied back ----------------------
@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("zo2")
    out = {}
    for family in ("llama", "opt"):
        out[family] = root / family
        build_model(family, vocab_size=len(tokenizer) + 20, num_hidden_layers=N_BLOCKS).save_pretrained(out[family])
        tokenizer.save_pretrained(out[family])
    return out


def linear_bytes(model, blocks, names=None) -> int:
    """Bytes of the nn.Linear parameters of the given decoder blocks (only those whose name matches `names`)."""
    _, layers = decoder_blocks(model)
    return sum(p.nbytes for b in blocks for n, m in layers[b].named_modules() if isinstance(m, torch.nn.Linear)
               for pn, p in m.named_parameters(recurse=False) if names is None or names in f"{n}.{pn}")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_zo2_training_is_bit_identical_to_resident(qdirs, dense_dirs, tmp_path, monkeypatch, family):
    kw = dict(model=str(dense_dirs[family]), method="mezo", dtype="bf16")
    want, rec, s = train_run(tmp_path, qdirs, family, "resident", monkeypatch, offload="off", **kw)
    assert s is None
    start = load_file(str(tmp_path / "resident" / "checkpoints" / "step-000000" / "trained.safetensors"))
    moved = [k for k in want if not torch.equal(start[k], want[k])]
    assert len(moved) > len(want) // 2  # bf16 weights did move (stochastic rounding keeps the small updates)
    model, _ = load_model(str(dense_dirs[family]), dtype=torch.bfloat16)
    block, trained = linear_bytes(model, [0]), linear_bytes(model, range(N_BLOCKS))
    for depth in (2, 3):
        got, rec, s = train_run(tmp_path, qdirs, family, f"zo2-{depth}", monkeypatch, offload="on",
                                prefetch_depth=depth, **kw)
        assert rec["streamed_blocks"] == N_BLOCKS and s.stats["kind"] == "weights"
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (family, depth)
        # 5 dual-forward steps + dev evaluations at step 0 and 5: one upload per block per forward; each step's
        # update rides on the next forward (the last one on the final evaluation) and is copied back once
        assert s.stats["uploads"] == N_BLOCKS * 7 and s.stats["h2d_bytes"] == 7 * N_BLOCKS * block
        assert s.stats["downloads"] == N_BLOCKS * 5 and s.stats["d2h_bytes"] == 5 * trained


def test_zo2_resume_continues_bit_for_bit(qdirs, dense_dirs, tmp_path, monkeypatch):
    kw = dict(model=str(dense_dirs["llama"]), method="mezo", dtype="bf16", offload="on", save_every=1)
    want, _, _ = train_run(tmp_path, qdirs, "llama", "straight", monkeypatch, **kw)
    train_run(tmp_path, qdirs, "llama", "resumed", monkeypatch, **{**kw, "steps": 3})
    got, _, _ = train_run(tmp_path, qdirs, "llama", "resumed", monkeypatch, **kw)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_deferred_updates_apply_on_arrival_and_flush(dense_dirs):
    """A deferred update runs when its block arrives, before it computes, and only trained tensors come back."""
    resident, _ = load_model(str(dense_dirs["opt"]), dtype=torch.bfloat16)
    model, _ = load_model(str(dense_dirs["opt"]), dtype=torch.bfloat16)
    pick = lambda m: [t for t in base.weight_targets(m) if ".fc1." in t.path or "q_proj.bias" in t.path]  # noqa: E731
    ref, targets = pick(resident), pick(model)
    blocks = {1, 2, 4}
    s = engine.BlockStreamer(model, "cpu", blocks, depth=2, trace=True, kind="weights", trained=targets)
    assert s.stats["host_bytes"] == linear_bytes(model, blocks)
    ids = input_ids(batch=1, seq=6)
    method = zo.ZeroOrder(model, TrainConfig(method="mezo"), targets, "lm")
    for seed in (11, 12):
        zo.apply_update(ref, seed, [1e-2], weight_decay=0.1, lr=0.5)
        method.apply_step_update(seed, [1e-2], 0.1, 0.5)
    streamed = [t for t in targets if (id(t.module), t.name) in s.streamed_keys]
    assert streamed and len(streamed) < len(targets)  # block 0 and 3 are resident: updated at once
    assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(ref, targets) if b not in streamed)
    assert not all(torch.equal(a.tensor, b.tensor) for a, b in zip(ref, targets))  # the rest waits
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, resident(input_ids=ids).logits)
    check_trace(s.trace, sorted(blocks), 2, forwards=1)
    assert [op for op, b, _ in s.trace if b == 2] == ["upload", "update", "download", "compute", "release"]
    assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(ref, targets))  # host copies are current
    assert s.stats["d2h_bytes"] == sum(t.tensor.nbytes for t in streamed)  # fc1 + q_proj.bias only
    zo.apply_update(ref, 13, [-1e-2])
    method.apply_step_update(13, [-1e-2], 0.0, 0.0)
    uploads = s.stats["uploads"]
    method.flush()
    assert s.stats["uploads"] == uploads + len(blocks) and all(not p for p in s._pending)
    assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(ref, targets))
    s.remove()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, resident(input_ids=ids).logits)


# ---- first-order: codes streamed through backward too ---------------------------------------------------------------
def scale_grads(qdir, place):
    """The scales' gradients of one LM-loss backward of a fresh model placed by `place(model)` -> (grads, placed)."""
    model, _ = load_model(str(qdir))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    targets = base.scale_targets(model)
    for t in targets:
        t.tensor.requires_grad_(True)
    placed = place(model)
    ids = input_ids(batch=2, seq=10)
    model(input_ids=ids, labels=ids).loss.backward()
    return [t.tensor.grad for t in targets], placed


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_checkpointed_and_streamed_backward_give_the_resident_gradients(qdirs, family):
    want, _ = scale_grads(qdirs[family], lambda m: None)
    assert all(g is not None and g.abs().sum() > 0 for g in want)
    got, _ = scale_grads(qdirs[family], engine.checkpoint_blocks)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for depth, blocks in [(2, range(N_BLOCKS)), (3, range(N_BLOCKS)), (2, {2, 3, 4}), (4, {1, 3})]:
        got, s = scale_grads(qdirs[family], lambda m: engine.BlockStreamer(m, "cpu", set(blocks), depth,
                                                                          backward=True))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (family, depth, blocks)
        assert s.stats["uploads"] == 2 * len(s.order) and s.stats["d2h_bytes"] == 0


def check_backward_trace(trace, order, depth):
    """One forward and one backward: the forward as check_trace replays it, then every streamed block uploaded
    again in reverse order, each upload before the recompute that needs it and `depth` - 1 ahead of it, never more
    than `depth` slots holding a block, nothing downloaded."""
    turn = next(i for i, t in enumerate(trace) if t[0] == "release" and t[1] == order[-1]) + 1
    check_trace(trace[:turn], order, depth, forwards=1)
    back = trace[turn:]
    assert [b for op, b, _ in back if op == "upload"] == order[::-1]
    assert [b for op, b, _ in back if op == "recompute"] == order[::-1]
    assert not [t for t in back if t[0] in ("download", "compute", "update")]
    pos = {b: p for p, b in enumerate(order)}
    state, uploaded = {}, []
    for op, b, s in back:
        assert s == pos[b] % depth
        if op == "upload":
            assert s not in state, f"upload of {b} into slot {s} held by {state.get(s)}"
            state[s] = b
            uploaded.append(b)
        elif op == "recompute":
            assert state.get(s) == b
            # the next depth - 1 blocks below are already on their way
            assert len(uploaded) >= min(len(order) - pos[b] + depth - 1, len(order)), (b, uploaded)
        else:
            assert state.pop(s) == b
    assert not state


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("blocks", [range(N_BLOCKS), {1, 2, 3, 4}, {0, 2, 4}, {3}])
def test_backward_streams_each_block_once_more_in_reverse(qdirs, depth, blocks):
    _, s = scale_grads(qdirs["llama"], lambda m: engine.BlockStreamer(m, "cpu", set(blocks), depth, trace=True,
                                                                      backward=True))
    check_backward_trace(s.trace, sorted(blocks), depth)
    assert s.stats["h2d_bytes"] == 2 * s.stats["host_bytes"] and s.stats["downloads"] == 0


def test_streaming_through_backward_is_refused_for_dense_weights(dense_dirs):
    model, _ = load_model(str(dense_dirs["llama"]))
    with pytest.raises(ValueError, match="quantize"):
        engine.place_model(model, "cpu", offload="on", first_order=True)
    with pytest.raises(ValueError, match="dense model"):
        engine.BlockStreamer(model, "cpu", {0}, kind="weights", backward=True)


@pytest.mark.parametrize("family,method,kw", [
    ("llama", "lomo", {}), ("opt", "adalomo", {}), ("llama", "adalomo", dict(clip_grad_norm=0.05)),
    ("tied", "lomo", dict(clip_grad_value=0.01, also_train="norm,embedding")),
    ("tied", "adalomo", dict(clip_grad_norm=0.05, also_train="embedding")),
    ("llama", "adamw", {}), ("llama", "hift", dict(hift_group_size=2))])
def test_first_order_streamed_training_is_bit_identical_to_resident(qdirs, tmp_path, monkeypatch, family, method,
                                                                     kw):
    """Trained tensors after 5 steps: resident, gradient-checkpointed and streamed (depth 2, 3) all the same bits;
    the tied model trains its embedding, which is also its LM head."""
    kw = dict(method=method, lr=1e-2, **kw)
    want, _, s = train_run(tmp_path, qdirs, family, "resident", monkeypatch, offload="off", **kw)
    start = load_file(str(tmp_path / "resident" / "checkpoints" / "step-000000" / "trained.safetensors"))
    assert s is None and sum(not torch.equal(start[k], want[k]) for k in want) > len(want) // 2
    got, _, _ = train_run(tmp_path, qdirs, family, "checkpointed", monkeypatch, offload="off",
                          gradient_checkpointing=True, **kw)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for depth in (2, 3):
        got, rec, s = train_run(tmp_path, qdirs, family, f"streamed-{depth}", monkeypatch, offload="on",
                                prefetch_depth=depth, **kw)
        assert rec["streamed_blocks"] == N_BLOCKS and s.backward
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), depth
        assert s.stats["d2h_bytes"] == 0


def test_first_order_streamed_upload_count(qdirs, tmp_path, monkeypatch):
    """5 steps: forward + backward stream every block twice (norm clipping's measuring pass once more); the two dev
    evaluations (no backward) once."""
    for kw, per_step in [({}, 2), (dict(clip_grad_norm=0.05), 3)]:
        _, _, s = train_run(tmp_path, qdirs, "llama", f"count-{per_step}", monkeypatch, offload="on",
                            method="adalomo", lr=1e-2, **kw)
        assert s.stats["uploads"] == N_BLOCKS * (5 * per_step + 2) and s.stats["downloads"] == 0


def test_first_order_streamed_resume_is_bit_identical(qdirs, tmp_path, monkeypatch):
    kw = dict(method="adalomo", lr=1e-2, offload="on", save_every=1, clip_grad_norm=0.05)
    want, _, _ = train_run(tmp_path, qdirs, "llama", "straight", monkeypatch, **kw)
    train_run(tmp_path, qdirs, "llama", "resumed", monkeypatch, **{**kw, "steps": 3})
    got, _, _ = train_run(tmp_path, qdirs, "llama", "resumed", monkeypatch, **kw)
    assert all(torch.equal(got[k], want[k]) for k in want)
