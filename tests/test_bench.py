"""Benchmark helpers: random-weight checkpoints of named shapes are real HF checkpoints qzo2 can quantize; `qzo2 bench`
builds working random models in place and reports one JSON line per mode."""
import json
import math
import sys

import pytest
import torch

from qzo2.bench import SHAPES, bench_kernels, make_config, run_bench, skeleton_tensors, write_random_checkpoint
from qzo2.cli import main


def test_random_checkpoint_loads_and_quantizes(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "tiny"
    n = write_random_checkpoint("tiny", src, max_shard_bytes=200_000)
    assert (src / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(src)
    assert sum(p.numel() for p in model.parameters()) == n
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "-q"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["group_size"] == 128


def test_shapes_have_the_published_parameter_counts():
    counts = {name: sum(torch.Size(s).numel() for _, s, _ in skeleton_tensors(make_config(name)))
              for name in ("llama2-7b", "opt-6.7b")}
    assert counts == {"llama2-7b": 6_738_415_616, "opt-6.7b": 6_658_473_984}
    assert set(SHAPES) >= {"tiny", "llama-3b", "llama2-7b", "llama2-13b", "llama2-70b", "opt-6.7b"}


def test_kernel_bench_reports_every_path():
    recs = bench_kernels(rows=8, repeats=1, shapes=((64, 128),))
    assert [r["dtype"] for r in recs] == ["float32", "bfloat16"]
    assert all(r[k] > 0 for r in recs for k in ("dense_ms", "dequant_ms", "dequant_cached_ms", "int4pack_ms"))


def test_kernel_bench_cli_takes_shapes(capsys):
    from qzo2.bench import main as bench_main
    assert bench_main(["kernels", "--rows", "4", "--repeats", "1", "--shape", "64x128", "--shape", "32X64"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["N"], r["K"], r["rows"]) for r in recs] == [(64, 128, 4)] * 2 + [(32, 64, 4)] * 2
    with pytest.raises(SystemExit):
        bench_main(["kernels", "--shape", "64x100"])       # K not a multiple of the group
    assert "multiple of 64" in capsys.readouterr().err


# ---- `qzo2 bench`: random models built in place, one ZO step per mode ------------------------------------------------
FIELDS = ("shape", "mode", "device", "dtype", "batch", "seq", "steps", "step_ms", "tok_s", "torch_peak_gb",
          "nvml_used_gb", "h2d_gb_per_step", "d2h_gb_per_step", "host_rss_gb", "ratio_to_forward")


def _streamed_bytes(shape: str) -> int:
    """Code + zero bytes of every QuantLinear inside the decoder blocks, from the layers themselves."""
    from quant.checkpoint import decoder_blocks
    from quant.linear import QuantLinear
    from qzo2.bench import random_model

    _, blocks = decoder_blocks(random_model(shape, quantized=True, bits=4, group_size=128))
    return sum(m.qweight.numel() * m.qweight.element_size() + m.zeros.numel() * m.zeros.element_size()
               for b in blocks for m in b.modules() if isinstance(m, QuantLinear))


def _linear_bytes(shape: str) -> int:
    """Bytes of every nn.Linear parameter inside the decoder blocks of the fp32 random model."""
    from quant.checkpoint import decoder_blocks
    from qzo2.bench import random_model

    _, blocks = decoder_blocks(random_model(shape, torch.float32))
    return sum(p.nbytes for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)
               for p in m.parameters(recurse=False))


def test_bench_compare_writes_a_line_per_mode_and_a_table(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    argv = ["bench", "--shape", "tiny", "--mode", "qzo,qzo-offload,mezo,zo2,forward", "--batch", "2", "--seq", "16",
            "--steps", "3", "--warmup", "1", "--compare", "--output", str(out)]
    assert main(argv) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["mode"] for r in recs] == ["forward", "qzo", "qzo-offload", "mezo", "zo2"]  # --compare: floor first
    for r in recs:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        assert (r["shape"], r["device"], r["dtype"], r["batch"], r["seq"], r["steps"]) == ("tiny", "cpu", "float32",
                                                                                          2, 16, 3)
        assert r["step_ms"] > 0 and r["tok_s"] == pytest.approx(2 * 16 / (r["step_ms"] / 1e3))
        assert r["torch_peak_gb"] is None and r["nvml_used_gb"] is None  # CPU
        assert r["host_rss_gb"] > 0 and r["error"] is None and math.isfinite(r["loss"])
        assert r["d2h_gb_per_step"] == 0 or r["mode"] == "zo2"
    by = {r["mode"]: r for r in recs}
    for m in ("qzo", "qzo-offload", "mezo", "zo2"):
        assert by[m]["ratio_to_forward"] == pytest.approx(by[m]["step_ms"] / by["forward"]["step_ms"])
    assert by["qzo"]["h2d_gb_per_step"] == 0 and by["mezo"]["h2d_gb_per_step"] == 0
    assert by["qzo-offload"]["streamed_blocks"] == 2 and by["qzo-offload"]["depth"] == 2
    # every decoder block's codes and zeros cross once per step (one batched dual forward), nothing else
    assert by["qzo-offload"]["h2d_gb_per_step"] * 2**30 == pytest.approx(_streamed_bytes("tiny"), rel=1e-12)
    assert by["qzo"]["loss"] == pytest.approx(by["qzo-offload"]["loss"], rel=1e-6)  # same model, same steps
    # zo2: every block's Linear weights go up once per step and, all being trained, come back once (the previous
    # step's update, applied on arrival); the losses are MeZO's
    assert by["zo2"]["streamed_blocks"] == 2 and by["zo2"]["depth"] == 2
    assert by["zo2"]["h2d_gb_per_step"] * 2**30 == pytest.approx(_linear_bytes("tiny"), rel=1e-12)
    assert by["zo2"]["d2h_gb_per_step"] == by["zo2"]["h2d_gb_per_step"]
    assert by["zo2"]["loss"] == by["mezo"]["loss"]
    assert by["zo2"]["h2d_floor_ms"] > 0 and by["qzo-offload"]["h2d_floor_ms"] > 0 and by["qzo"]["h2d_floor_ms"] is None
    stdout = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(x) for x in stdout[:5]] == recs
    table = stdout[5:]
    assert table[2].startswith("| mode | step ms | tok/s | x forward |") and len(table) == 4 + 5
    assert [row.split("|")[1].strip() for row in table[4:]] == ["forward", "qzo", "qzo-offload", "mezo", "zo2"]
    assert table[2].endswith("| user s/step | sys s/step |")
    assert all(r["cpu_user_s_per_step"] > 0 and r["cpu_sys_s_per_step"] >= 0 and r["profile"] is None for r in recs)


def test_bench_profile_names_the_ops_of_a_step(capsys):
    recs = run_bench("tiny", "qzo", batch=2, seq=16, steps=1, warmup=0, device="cpu", profile=True,
                     echo=lambda line: None)
    ops = {e["op"]: e for e in recs[0]["profile"]}
    assert "aten::mm" in ops and ops["aten::mm"]["calls"] >= 14 and ops["aten::mm"]["self_ms"] > 0


def test_random_quantized_model_works_and_a_qzo_step_moves_only_the_scales():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from quant.checkpoint import decoder_blocks
    from quant.format import unpack_rows
    from quant.linear import QuantLinear
    from qzo2.methods import base
    from qzo2.bench import bench_method, random_batch, random_model

    model = random_model("tiny", quantized=True, bits=4, group_size=128, seed=3)
    _, blocks = decoder_blocks(model)
    layers = [m for m in blocks.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 7 and not any(type(m) is torch.nn.Linear for m in blocks.modules())
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    # non-persistent rotary buffers are the real ones (to_empty would have left garbage there)
    expected = LlamaRotaryEmbedding(model.config).inv_freq
    assert torch.equal(model.model.rotary_emb.inv_freq, expected)
    codes = unpack_rows(layers[0].qweight, 4)
    assert codes.shape == (128, 128) and set(codes.unique().tolist()) == set(range(16))
    assert (layers[0].zeros == 8).all() and (layers[0].scales > 0).all()
    assert model.model.norm.weight.eq(1).all() and 0.015 < model.model.embed_tokens.weight.std() < 0.025

    batch = random_batch(model.config.vocab_size, 2, 16, "cpu")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    assert logits.shape == (2, 16, 512) and torch.isfinite(logits).all()

    targets = base.scale_targets(model)
    before = {m: (m.qweight.clone(), m.zeros.clone(), m.scales.clone()) for m in layers}
    metrics = bench_method("qzo", model, targets).step(batch, 0)
    assert math.isfinite(metrics["loss"]) and metrics["d"] > 0
    for m, (q, z, s) in before.items():
        assert torch.equal(m.qweight, q) and torch.equal(m.zeros, z)
        changed = (m.scales != s).float().mean()
        assert changed > 0.9, changed  # every scale moves by lr * d * z
        assert 0 < (m.scales - s).abs().max() < 0.5 * s.abs().max()


def test_random_dense_opt_model_ties_its_head_and_streams(tmp_path):
    from qzo2.bench import random_model, run_bench

    model = random_model("tiny-opt", torch.float32)
    dec = model.model.decoder
    assert model.lm_head.weight is dec.embed_tokens.weight  # tied, one tensor
    assert dec.layers[0].self_attn_layer_norm.weight.eq(1).all()
    assert dec.layers[0].self_attn_layer_norm.bias.eq(0).all() and dec.layers[0].fc1.bias.eq(0).all()
    assert not any(p.is_meta for p in model.parameters())
    lines = []
    recs = run_bench("tiny-opt", "qzo-offload,qzo", batch=1, seq=8, steps=1, warmup=0, depth=3, echo=lines.append)
    assert len(lines) == 2 and recs[0]["ratio_to_forward"] is None and recs[0]["depth"] == 3
    assert recs[0]["h2d_gb_per_step"] * 2**30 == pytest.approx(_streamed_bytes("tiny-opt"), rel=1e-12)


@pytest.mark.parametrize("args, message", [
    (["--mode", "qzo,bogus"], "unknown mode 'bogus'"),
    (["--mode", "zo2,zo2"], "mode 'zo2' is given twice"),
    (["--shape", "llama-1t"], "unknown shape 'llama-1t'"),
    (["--batch", "0"], "batch must be >= 1"),
    (["--seq", "0"], "seq must be >= 2"),
    (["--seq", "4096"], "exceeds the tiny shape's 512 positions"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--depth", "1", "--mode", "qzo-offload"], "depth must be >= 2"),
    (["--group-size", "96"], "not divisible by group size 96"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--bits", "3"], "invalid choice"),
])
def test_bench_rejects_bad_arguments_in_one_line(capsys, args, message, tmp_path):
    out = tmp_path / "never.jsonl"
    assert main(["bench", "--seq", "16", "--steps", "1", "--warmup", "0", "-o", str(out), *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("qzo2 bench: error:"), err
    assert captured.out == "" and not out.exists()


def test_opt_shapes_have_the_published_parameter_counts():
    counts = {name: sum(torch.Size(s).numel() for _, s, _ in skeleton_tensors(make_config(name)))
              for name in ("opt-13b", "opt-175b")}
    assert counts["opt-13b"] == 12_853_473_280  # facebook/opt-13b
    assert 174e9 < counts["opt-175b"] < 176e9


def test_bench_first_order_modes_time_the_trainers_step():
    """lomo/adalomo/adamw: one first-order step on the int4 scales, the same Method the trainer builds; the loss
    of the first step is the same random quantized model's before any update, so all three agree on it."""
    from qzo2.bench import run_bench

    recs = run_bench("tiny", "forward,lomo,adalomo,adamw,hift,grass", batch=2, seq=16, steps=1, warmup=0,
                     compare=True, echo=lambda line: None)
    by = {r["mode"]: r for r in recs}
    assert all(r["error"] is None and r["bits"] == 4 for m, r in by.items() if m not in ("forward", "grass"))
    assert by["grass"]["error"] is None and by["grass"]["bits"] is None  # dense weights
    assert by["hift"]["loss"] == pytest.approx(by["adamw"]["loss"], rel=1e-6)
    assert by["lomo"]["loss"] == pytest.approx(by["adalomo"]["loss"], rel=1e-6)
    assert by["lomo"]["loss"] == pytest.approx(by["adamw"]["loss"], rel=1e-6)
    assert all(by[m]["ratio_to_forward"] > 0 for m in ("lomo", "adalomo", "adamw"))


# ---- the accuracy benchmark's harness (benchmarks/accuracy.py: not in the library, imported from its path) -----------
def _harness():
    import importlib.util
    import sys
    from pathlib import Path

    name = "qzo2_benchmarks_accuracy"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" /
                                                      "accuracy.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_run_measured_reports_the_child_alone_and_accuracy_parses():
    import sys

    acc = _harness()
    # a forked child's ru_maxrss starts at its parent's RSS: make this process big, the command's figure must not care
    ballast = bytearray(900 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    big = acc.run_measured([sys.executable, "-c", "b = bytearray(700 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                                                  "print('runs/x: sentiment test: accuracy 0.6380 on 500 examples')"])
    small = acc.run_measured([sys.executable, "-c", "pass"])
    del ballast
    assert 0.68 < big["peak_rss_gib"] < 0.85 and small["peak_rss_gib"] < 0.1 and big["wall_s"] >= 0
    assert acc._accuracy(big["output"]) == 0.638
    with pytest.raises(RuntimeError, match="exit 3"):
        acc.run_measured([sys.executable, "-c", "raise SystemExit(3)"])


def test_accuracy_rows_resolve_to_the_recorded_configs(capsys):
    """Each trained row (benchmarks/accuracy-base.yaml + the row's overrides + model/seed/output_dir, as the harness
    runs it), through `python benchmarks/accuracy.py train ROW --print-config` (qzo2 train's own --print-config),
    resolves to the config recorded in tests/accuracy_rows.json: what `qzo2 train recipes/accuracy-ROW.yaml
    --print-config` printed before those recipes were folded into base + overrides. A key added to qzo2 since may
    appear, at its default; a recorded key that is gone or has another value fails."""
    from pathlib import Path

    import yaml

    from qzo2.config import TrainConfig, config_yaml

    acc = _harness()
    recorded = json.loads((Path(__file__).parent / "accuracy_rows.json").read_text())
    assert list(acc.ROWS) == list(recorded["rows"])
    for key, own in recorded["rows"].items():
        want = {**recorded["shared"], **own}
        assert acc.main(["train", key, "--print-config"]) == 0
        got = yaml.safe_load(capsys.readouterr().out)
        default = yaml.safe_load(config_yaml(TrainConfig(method=want["method"])))
        drift = {k: (want.get(k, "absent"), got.get(k, "absent")) for k in want.keys() | got.keys()
                 if got.get(k, "absent") != want.get(k, default.get(k, "absent"))}
        assert not drift, f"row {key}: key: (recorded, now) {drift}"
    # `python benchmarks/accuracy.py command ROW` prints that same qzo2 train line, the one bench_accuracy runs
    assert acc.main(["command", "qzo-track", "--seed", "2", "n_dev=200"]) == 0
    assert capsys.readouterr().out.split() == ["qzo2", "train", *acc.train_args("qzo-track", seed=2), "n_dev=200"]


def test_accuracy_harness_runs_a_row_as_base_overrides_then_the_callers(tmp_path, monkeypatch, capsys):
    """bench_accuracy's trained row: quantize (once), train with the row's arguments then overwrite/progress and the
    caller's overrides, export in the row's format, eval with the run's template; one results.jsonl record. The
    qzo2 processes are faked (run_measured), their argv recorded."""
    from pathlib import Path

    from qzo2.config import config_yaml, load_config

    acc = _harness()
    calls = []

    def fake(argv):
        argv = [str(a) for a in argv]
        calls.append(argv[3:])  # past `python -m qzo2.cli`
        if argv[3] == "train":
            recipe, *overrides = argv[4:]
            cfg = load_config(recipe, overrides)
            run = tmp_path / cfg.output_dir
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(config_yaml(cfg))
            (run / "metrics.jsonl").write_text(json.dumps({"step": 50, "dev_accuracy": 0.7}) + "\n" +
                                               json.dumps({"step": 100, "dev_accuracy": 0.75}) + "\n")
        return {"wall_s": 1.0, "peak_rss_gib": 0.5, "output": "x: sentiment test: accuracy 0.7320 on 500 examples"}

    monkeypatch.setattr(acc, "run_measured", fake)
    monkeypatch.chdir(tmp_path)
    base = acc.shown(acc.BASE)
    recs = acc.bench_accuracy(Path("out"), 1, ["qzo-track"], ["steps=100"], tag="-t")
    run = "out/qzo-track-t-seed1"
    assert calls[0][:4] == ["quantize", "-o", "out/int4-rtn", "--method"]
    assert calls[1] == ["train", base, *acc.ROWS["qzo-track"].args(), "model=out/int4-rtn", "seed=1",
                        f"output_dir={run}", "overwrite=true", "progress=false", "steps=100"]
    assert calls[2] == ["export", run, "-o", f"{run}-gptq", "--format", "gptq", "--overwrite"]
    assert calls[3] == ["eval", f"{run}-gptq", "--task", "sentiment", "--seed", "1", "--template", "review"]
    assert recs[-1]["row"] == "QZO int4 RTN, subspace, 8 one-sided probes, tracked gradient (t)"
    assert recs[-1]["test_accuracy"] == 0.732 and recs[-1]["steps"] == 100 and recs[-1]["recipe"] == base
    saved = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[-1])
    assert saved["recipe_overrides"] == acc.ROWS["qzo-track"].args()
    assert saved["dev_accuracy"] == {"50": 0.7, "100": 0.75}
    with pytest.raises(ValueError, match="unknown row 'nope'"):
        acc.bench_accuracy(Path("out"), 0, ["qzo", "nope"], [])
    assert len(calls) == 4  # nothing ran for the bad row list


def test_accuracy_table_means_the_latest_record_of_each_seed(tmp_path, capsys):
    acc = _harness()
    recs = [dict(row="AdaLomo", seed=0, steps=150, test_accuracy=0.5, train_wall_s=600, train_peak_rss_gib=3.0),
            dict(row="AdaLomo", seed=0, steps=150, test_accuracy=0.86, train_wall_s=540, train_peak_rss_gib=2.9),
            dict(row="AdaLomo", seed=1, steps=150, test_accuracy=0.84, train_wall_s=660, train_peak_rss_gib=3.1),
            dict(row="quantize rtn", seed=0, wall_s=18.6),
            dict(row="zero-shot", seed=0, steps=0, test_accuracy=0.602, eval_peak_rss_gib=0.88)]
    f = tmp_path / "results.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    lines = acc.accuracy_table(f).splitlines()
    assert lines[2] == "| AdaLomo | 0, 1 | 0.860 / 0.840 | **0.850** | 150 | 10.0 min | 3.10 GiB |"
    assert lines[3] == "| zero-shot | 0 | 0.602 | **0.602** | 0 | - | 0.88 GiB |" and len(lines) == 4
    for verb in ("accuracy-table", "table"):  # the CLI, under its old name and the short one
        assert acc.main([verb, "-o", str(tmp_path), "--rows", "zero-shot"]) == 0
        assert capsys.readouterr().out.splitlines()[2:] == [lines[3]]


def test_accuracy_harness_runs_a_peft_row_through_its_script(tmp_path, monkeypatch):
    """A peft row (lora/qlora) runs benchmarks/peft_rows.py KIND --seed S, its own overrides, then the caller's,
    and records the JSON line it prints with the process's peak RSS."""
    from pathlib import Path

    acc = _harness()
    calls = []
    line = {"kind": "lora", "steps": 150, "best_step": 100, "dev_accuracy": {"0": 0.6, "100": 0.8},
            "test_accuracy": 0.812, "train_wall_s": 500.0, "trained_values": 4884480}

    def fake(argv):
        calls.append([str(a) for a in argv])
        return {"wall_s": 600.0, "peak_rss_gib": 2.5, "output": "noise\n" + json.dumps(line)}

    monkeypatch.setattr(acc, "run_measured", fake)
    monkeypatch.chdir(tmp_path)
    recs = acc.bench_accuracy(Path("out"), 2, ["lora"], ["steps=150"])
    name, kind, args = acc.PEFT_ROWS["lora"]
    assert calls == [[sys.executable, str(Path(acc.__file__).with_name("peft_rows.py")), kind, "--seed", "2", *args,
                      "steps=150"]]
    assert recs[-1]["row"] == name and recs[-1]["test_accuracy"] == 0.812 and recs[-1]["train_peak_rss_gib"] == 2.5
    assert recs[-1]["best_step"] == 100 and recs[-1]["recipe_overrides"] == args
