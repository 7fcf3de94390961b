"""qzo2 export: GPTQ checkpoints whose only change is the trained scales, merged HF checkpoints, checked against the
trained qzo2 model and against stock loaders (transformers + optimum + gptqmodel; plain transformers with every
quantization package blocked)."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TEXT, build_model, input_ids
from quant.checkpoint import atomic_dir, checkpoint_tensors, open_source, quantize, read_tensor
from quant.format import QuantConfig, unpack_zeros
from quant.linear import QuantLinear
from qzo2 import trainer
from qzo2.cli import main
from qzo2.config import TrainConfig
from qzo2.evaluation import load_for_eval
from qzo2.exporter import checkpoint_scales, export
from stock import gptqmodel_available, load_gptq_with_transformers


def _train(tmp, model_dir, method, **kw):
    tmp.mkdir(parents=True, exist_ok=True)
    words = TEXT.split()
    rows = [{"prompt": " ".join(words[i:i + 4]), "completion": " " + " ".join(words[i + 4:i + 8])}
            for i in range(0, 32, 8)]
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dict(model=str(model_dir), method=method, task="", train_file=str(data), dev_file=str(data), steps=6,
               batch_size=4, lr=2e-3 if method == "qzo" else 1e-3, eps=1e-3, max_length=32, eval_every=3,
               save_every=3, log_every=3, output_dir=str(tmp / f"run-{method}"), progress=False, clip=0)
    cfg.update(kw)
    trainer.train(TrainConfig(**cfg))
    return tmp / f"run-{method}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """A tiny Llama: its HF dir, GPTQ v1 sym and v2 asym quantizations, a QZO run on each, and a MeZO run."""
    tmp = tmp_path_factory.mktemp("export")
    model = build_model("llama", vocab_size=len(tokenizer) + 20)
    src = tmp / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = {"src": src}
    for name, cfg in {"v1": QuantConfig(bits=4, group_size=32),
                      "v2asym": QuantConfig(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")}.items():
        with atomic_dir(tmp / name) as d:
            quantize(open_source(src), d, cfg, progress=False)
        out[name] = tmp / name
        out[f"run-{name}"] = _train(tmp / f"t-{name}", tmp / name, "qzo")
    with atomic_dir(tmp / "nf4") as d:
        quantize(open_source(src), d, QuantConfig(bits=4, group_size=32), fmt="nf4", progress=False)
    out["nf4"] = tmp / "nf4"
    out["run-nf4"] = _train(tmp / "t-nf4", tmp / "nf4", "qzo")
    out["run-mezo"] = _train(tmp / "t-mezo", src, "mezo")
    return out


def logits_of(model, ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids(2, 12) if ids is None else ids).logits.float()


def trained_model(run, fp16_scales=False):
    model, _, _ = load_for_eval(str(run), "last")
    if fp16_scales:  # what a GPTQ checkpoint can hold: the trained fp32 scales rounded to fp16
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.scales.data = m.scales.data.half().float()
    return model


def tensors_of(path):
    names, where = checkpoint_tensors(path)
    return {n: read_tensor(where, n) for n in names}


@pytest.mark.parametrize("base,fmt", [("v1", "gptq"), ("v1", "gptq_v2"), ("v2asym", "gptq_v2"), ("v2asym", "gptq")])
def test_gptq_export_replaces_only_the_scales(runs, tmp_path, base, fmt):
    out = tmp_path / "out"
    report = export(str(runs[f"run-{base}"]), str(out), fmt, checkpoint="last")
    src, dst = tensors_of(runs[base]), tensors_of(out)
    assert set(src) == set(dst)
    trained = load_file(str(trainer.RunDir(runs[f"run-{base}"]).checkpoint("last") / "trained.safetensors"))
    assert set(trained) == {n for n in src if n.endswith(".scales")} and report.replaced == len(trained)
    src_fmt = json.loads((runs[base] / "config.json").read_text())["quantization_config"]["checkpoint_format"]
    for name, t in src.items():
        if name in trained:
            assert dst[name].dtype == torch.float16 and torch.equal(dst[name], trained[name].half())
            assert not torch.equal(dst[name], t)  # training moved them
        elif name.endswith(".qzeros") and src_fmt != fmt:  # re-encoded, same zero points
            assert torch.equal(unpack_zeros(dst[name], 4, fmt), unpack_zeros(t, 4, src_fmt))
        else:  # qweight, g_idx, embeddings, norms, lm_head: byte-identical
            assert dst[name].dtype == t.dtype and torch.equal(dst[name].view(torch.uint8), t.view(torch.uint8))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["checkpoint_format"] == fmt
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == fmt
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    card = (out / "README.md").read_text()
    assert "Method: qzo" in card and "Steps: 6 of 6 (last checkpoint)" in card and "trained values" in card
    # qzo2 reads it back as the trained model with fp16 scales
    from qzo2.model import load_model

    exported, _ = load_model(str(out))
    torch.testing.assert_close(logits_of(exported), logits_of(trained_model(runs[f"run-{base}"], True)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not gptqmodel_available(), reason="needs the 'gptq' extra (optimum + gptqmodel)")
@pytest.mark.parametrize("base,fmt", [("v1", "gptq"), ("v2asym", "gptq")])
def test_gptq_export_loads_in_stock_transformers(runs, tmp_path, base, fmt):
    out = tmp_path / "out"
    export(str(runs[f"run-{base}"]), str(out), fmt, checkpoint="last")
    stock = load_gptq_with_transformers(str(out), fp32_scales=True)
    ours = trained_model(runs[f"run-{base}"], fp16_scales=True)
    expect = logits_of(ours)
    # tolerance: the same fp32 math in a different order (the interop tests measure ~1e-6 relative)
    torch.testing.assert_close(logits_of(stock), expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max()))
    # and fp16 rounding of the scales moves the fp32-scale model's logits by well under 1%
    full = logits_of(trained_model(runs[f"run-{base}"]))
    assert float((full - expect).abs().max()) < 1e-2 * float(full.abs().max())


BLOCKED_LOADER = textwrap.dedent("""
    import sys
    for name in ("optimum", "gptqmodel", "bitsandbytes", "auto_gptq", "quant", "qzo2"):
        sys.modules[name] = None  # any import of these now raises ImportError
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    assert getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([[int(x) for x in row.split(",")] for row in sys.argv[3].split(";")])
    with torch.no_grad():
        save_file({"logits": model(input_ids=ids).logits.float().contiguous()}, sys.argv[2])
""")


def stock_logits_without_quant_packages(path, ids, tmp_path):
    out = tmp_path / "logits.safetensors"
    arg = ";".join(",".join(str(int(x)) for x in row) for row in ids)
    subprocess.run([sys.executable, "-c", BLOCKED_LOADER, str(path), str(out), arg], check=True,
                   env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return load_file(str(out))["logits"]


@pytest.mark.parametrize("run,dtype,rtol", [("run-v1", "fp32", 1e-5), ("run-v2asym", "fp32", 1e-5),
                                            ("run-v1", "bf16", 3e-2), ("run-mezo", "fp32", 1e-5),
                                            ("run-nf4", "fp32", 1e-5)])
def test_hf_export_loads_with_no_quantization_package(runs, tmp_path, run, dtype, rtol):
    out = tmp_path / "hf"
    report = export(str(runs[run]), str(out), "hf", dtype=dtype, checkpoint="last")
    assert report.replaced > 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert not any(k.endswith((".qweight", ".scales", ".qzeros", ".g_idx")) for k in h.keys())
        assert {h.get_tensor(k).dtype for k in h.keys()} == {{"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]}
    ids = input_ids(2, 12)
    got = stock_logits_without_quant_packages(out, ids, tmp_path)
    expect = logits_of(trained_model(runs[run]), ids)  # the trained model in qzo2, fp32 scales
    # fp32: the merged weight is exactly the dequantized one; bf16: weights rounded to 8 bits of mantissa
    torch.testing.assert_close(got, expect, rtol=rtol, atol=rtol * float(expect.abs().max()))


def test_mezo_export_writes_the_trained_weights(runs, tmp_path):
    out = tmp_path / "hf"
    export(str(runs["run-mezo"]), str(out), "hf", dtype="fp32", checkpoint="last")
    trained = load_file(str(trainer.RunDir(runs["run-mezo"]).checkpoint("last") / "trained.safetensors"))
    written, base = load_file(str(out / "model.safetensors")), tensors_of(runs["src"])
    changed = [n for n in trained if not torch.equal(trained[n], base[n])]
    assert changed and all(torch.equal(written[n], trained[n]) for n in trained)
    assert all(torch.equal(written[n], base[n]) for n in base if n not in trained)


def test_export_shards_and_eval_reads_exports(runs, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert main(["export", str(runs["run-v1"]), "-o", str(out), "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    hf = tmp_path / "hf"
    assert main(["export", str(runs["run-v1"]), "-o", str(hf), "--format", "hf", "--dtype", "fp32"]) == 0
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ppl = {}
    for name, path in {"run": runs["run-v1"], "gptq": out, "hf": hf}.items():
        assert main(["eval", str(path), "--ppl", str(text), "--seqlen", "16", "--nseq", "4"]) == 0
        ppl[name] = float(capsys.readouterr().out.split("perplexity")[1].split()[0])
    assert ppl["hf"] == pytest.approx(ppl["run"], rel=1e-4)
    assert ppl["gptq"] == pytest.approx(ppl["run"], rel=1e-2)  # fp16-rounded scales


def test_export_of_a_quantized_dir_dequantizes_it(runs, tmp_path):
    out = tmp_path / "hf"
    report = export(str(runs["v1"]), str(out), "hf", dtype="fp32")
    assert report.replaced == 0 and report.dequantized == 14  # 2 layers x 7 Linears
    from qzo2.model import load_model

    q, _ = load_model(str(runs["v1"]))
    plain, _ = load_model(str(out))
    torch.testing.assert_close(logits_of(plain), logits_of(q), rtol=1e-5, atol=1e-5)


def test_export_errors_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cases = [
        ["export", str(runs["run-v1"]), "-o", str(out)],  # exists, no --overwrite
        ["export", str(runs["run-mezo"]), "-o", str(tmp_path / "a")],  # gptq from an unquantized base
        ["export", str(runs["run-nf4"]), "-o", str(tmp_path / "d")],  # gptq from an NF4 base
        ["export", str(runs["run-v1"]), "-o", str(tmp_path / "b"), "--checkpoint", "7"],  # no such step
        ["export", str(tmp_path / "missing"), "-o", str(tmp_path / "c")],
        ["export", str(runs["run-v1"]), "-o", str(runs["run-v1"]), "--overwrite"],  # onto its own input
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0], err
    assert (out / "keep.txt").read_text() == "mine" and not any((tmp_path / n).exists() for n in "abcd")
    assert (runs["run-v1"] / "config.yaml").exists()


def test_checkpoint_scales_clamps_and_refuses_nan():
    t = torch.tensor([1e-3, 1e6, 1e-12, 0.0, 5.0])
    out, n = checkpoint_scales(t, torch.float16)
    assert n == 3 and out.dtype == torch.float16
    assert float(out[1]) == 65504.0 and float(out[2]) > 0 and float(out[3]) > 0
    assert torch.equal(out[[0, 4]], t[[0, 4]].half())
    with pytest.raises(ValueError, match="NaN"):
        checkpoint_scales(torch.tensor([1.0, float("nan")]), torch.float16)


def test_clamped_scales_warn(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["run-v1"], run)
    ckpt = trainer.RunDir(run).checkpoint("last") / "trained.safetensors"
    tensors = load_file(str(ckpt))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = 1e6
    save_file(tensors, str(ckpt))
    assert main(["export", str(run), "-o", str(tmp_path / "out"), "--checkpoint", "last"]) == 0
    captured = capsys.readouterr()
    assert "1 scales clamped" in captured.out and "warning: 1 trained scales" in captured.err
