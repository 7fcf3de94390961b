"""`qzo2 quantize` / `qzo2 eval` as a user runs them: success output, and bad input -> one error line, exit != 0,
nothing written."""
import json
import subprocess
import sys

import pytest

from qzo2.cli import main


def error_lines(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if line.startswith("qzo2")]


def run_bad(capsys, argv, match):
    code = main(argv)
    lines = error_lines(capsys)
    assert code != 0
    assert len(lines) == 1 and "error" in lines[0] and match in lines[0], lines


def test_quantize_success_and_summary(make_model_dir, tmp_path, capsys):
    src, _ = make_model_dir("llama")
    dst = tmp_path / "out"
    assert main(["quantize", str(src), "-o", str(dst), "--group-size", "64", "-q"]) == 0
    out = capsys.readouterr().out
    for text in ("parameters", "GiB ->", "q_proj", "down_proj", "time"):
        assert text in out
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs left behind


def test_auto_group_size_falls_back_to_a_divisor(tmp_path, tokenizer, capsys):
    from conftest import build_model

    model = build_model("llama", vocab_size=len(tokenizer) + 20, hidden_size=192, intermediate_size=320)
    src = tmp_path / "src"
    model.save_pretrained(src)
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "-q"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["group_size"] == 64


def test_nf4_cli_and_load(make_model_dir, tmp_path, capsys):
    import torch

    from conftest import input_ids
    from quant.checkpoint import load_quantized
    from quant.nf4 import dequant_nf4, quantize_nf4

    src, model = make_model_dir("llama")
    dst = tmp_path / "nf4"
    assert main(["quantize", str(src), "-o", str(dst), "--format", "nf4", "--group-size", "64", "-q"]) == 0
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4"
    qmodel = load_quantized(dst, backend="torch")
    with torch.no_grad():  # reference: the original model with dequant_nf4(quantize_nf4(W)) as weights
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.copy_(dequant_nf4(*quantize_nf4(m.weight, 64)))
            elif not isinstance(m, torch.nn.Linear):
                for p in m.parameters(recurse=False):
                    p.copy_(p.to(torch.bfloat16).float())  # the checkpoint stores them in bf16
        for p in model.lm_head.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        ids = input_ids(vocab=model.config.vocab_size)
        assert torch.equal(qmodel(ids).logits, model(ids).logits)


def test_missing_source(tmp_path, capsys):
    run_bad(capsys, ["quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], "does not exist")
    assert not (tmp_path / "o").exists()


def test_non_model_sources(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    run_bad(capsys, ["quantize", str(tmp_path / "empty"), "-o", str(tmp_path / "o")], "no config.json")
    (tmp_path / "notes.txt").write_text("hello")
    run_bad(capsys, ["quantize", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "o")], "not a .gguf")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    run_bad(capsys, ["quantize", str(tmp_path / "fake.gguf"), "-o", str(tmp_path / "o")], "cannot load")
    assert not (tmp_path / "o").exists()


def test_pickle_only_model_is_refused(make_model_dir, tmp_path, capsys):
    src, _ = make_model_dir("llama")
    for f in src.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    run_bad(capsys, ["quantize", str(src), "-o", str(tmp_path / "o")], "safetensors only")


def test_unsupported_bits_and_group_size(make_model_dir, tmp_path, capsys):
    src, _ = make_model_dir("llama")
    run_bad(capsys, ["quantize", str(src), "-o", str(tmp_path / "o"), "--bits", "3"], "--bits")
    run_bad(capsys, ["quantize", str(src), "-o", str(tmp_path / "o"), "--group-size", "48"], "--group-size")
    run_bad(capsys, ["quantize", str(src), "-o", str(tmp_path / "o"), "--format", "nf4", "--bits", "8"], "nf4")
    assert not (tmp_path / "o").exists()


def test_in_features_not_divisible_by_group(tmp_path, tokenizer, capsys):
    from conftest import build_model

    model = build_model("llama", vocab_size=len(tokenizer) + 20, hidden_size=96, intermediate_size=192)
    src = tmp_path / "src"
    model.save_pretrained(src)
    run_bad(capsys, ["quantize", str(src), "-o", str(tmp_path / "o"), "--group-size", "64"], "not divisible")
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_truncated_safetensors(make_model_dir, tmp_path, capsys):
    src, _ = make_model_dir("llama")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    run_bad(capsys, ["quantize", str(src), "-o", str(tmp_path / "o")], "cannot read")
    assert not (tmp_path / "o").exists()


def test_existing_output_is_kept_unless_overwrite(make_model_dir, tmp_path, capsys):
    src, _ = make_model_dir("llama")
    dst = tmp_path / "o"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    run_bad(capsys, ["quantize", str(src), "-o", str(dst)], "already exists")
    assert (dst / "precious.txt").read_text() == "keep me"
    run_bad(capsys, ["quantize", str(src), "-o", str(dst), "--overwrite", "-q"], "not a checkpoint written by qzo2")
    assert (dst / "precious.txt").read_text() == "keep me"  # --overwrite replaces only qzo2's own outputs
    q = tmp_path / "q"
    assert main(["quantize", str(src), "-o", str(q), "-q"]) == 0
    first = (q / "model.safetensors").read_bytes()
    assert main(["quantize", str(src), "-o", str(q), "--overwrite", "-q", "--bits", "8"]) == 0
    assert (q / "model.safetensors").read_bytes() != first and json.loads((q / "qzo2.json").read_text())["command"] \
        == "quantize"


def test_failure_midway_leaves_nothing(make_model_dir, tmp_path, capsys, monkeypatch):
    """An error after some shards were written removes the temporary directory; DST never appears."""
    import quant.checkpoint as ckpt

    src, _ = make_model_dir("llama")
    calls = {"n": 0}
    real = ckpt.quantize_rtn

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise ValueError("simulated failure")
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "quantize_rtn", failing)
    run_bad(capsys, ["quantize", str(src), "-o", str(tmp_path / "o"), "--max-shard-size", "20kb"], "simulated")
    assert list(tmp_path.iterdir()) == [src]


def test_cli_subprocess_exit_code_and_help(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qzo2.cli", "quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("qzo2 quantize: error: model source")
    h = subprocess.run([sys.executable, "-m", "qzo2.cli", "quantize", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--group-size" in h.stdout and "examples:" in h.stdout


def test_eval_perplexity(make_model_dir, tmp_path, capsys):
    src, _ = make_model_dir("llama")
    dst = tmp_path / "q"
    assert main(["quantize", str(src), "-o", str(dst), "--group-size", "32", "-q"]) == 0
    text = tmp_path / "t.txt"
    from conftest import TEXT

    text.write_text(TEXT)
    assert main(["eval", str(dst), "--ppl", str(text), "--seqlen", "16", "--nseq", "4"]) == 0
    out = capsys.readouterr().out
    ppl = float([line for line in out.splitlines() if line.startswith("perplexity ")][0].split()[1])
    # independent: HF's own shifted LM loss (labels=input_ids) on the same 4 windows of 16 tokens
    import math

    import torch
    from transformers import AutoTokenizer

    from quant.checkpoint import load_quantized

    model = load_quantized(dst)
    ids = AutoTokenizer.from_pretrained(dst)(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in ids[:64].view(4, 16)]
    assert ppl == pytest.approx(math.exp(sum(losses) / 4), rel=1e-3)  # printed with 2 decimals
    assert "(4x16 tokens of t.txt)" in out
    n = len(ids) // 16  # asked for more windows than the text holds: the line says how many were scored
    assert main(["eval", str(dst), "--ppl", str(text), "--seqlen", "16", "--nseq", "100000"]) == 0
    assert f"({n}x16 tokens of t.txt)" in capsys.readouterr().out and n < 100000
    run_bad(capsys, ["eval", str(dst), "--ppl", str(tmp_path / "missing.txt")], "does not exist")


def test_gptq_without_the_extra_names_it(make_model_dir, tmp_path, capsys, monkeypatch):
    import sys

    src, _ = make_model_dir("llama")
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # as if the 'gptq' extra were not installed
    calib = tmp_path / "c.txt"
    calib.write_text("some calibration text " * 50)
    run_bad(capsys, ["quantize", str(src), "-o", str(tmp_path / "o"), "--method", "gptq", "--calib", str(calib)],
            "pip install 'qzo2[gptq]'")
    assert not (tmp_path / "o").exists()


def test_version_print_config_and_debug_tracebacks(tmp_path, monkeypatch, capsys):
    import yaml

    from qzo2 import __version__
    from qzo2.cli import main
    from qzo2.config import TrainConfig

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"qzo2 {__version__}"
    out_dir = tmp_path / "never"
    assert main(["train", "recipes/sentiment.yaml", "steps=7", f"output_dir={out_dir}", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["steps"] == 7 and printed["method"] == "qzo" and set(printed) == set(TrainConfig().to_dict())
    assert TrainConfig(**printed).steps == 7  # what it prints is a recipe that loads
    assert not out_dir.exists()  # validated and printed, nothing run or written
    assert main(["train", "recipes/sentiment.yaml", "steps=0", "--print-config"]) == 2  # still validated
    assert "steps must be >= 1" in capsys.readouterr().err
    monkeypatch.setenv("QZO2_DEBUG", "1")
    with pytest.raises(ValueError, match="steps must be >= 1"):  # the traceback behind the one line
        main(["train", "recipes/sentiment.yaml", "steps=0"])
