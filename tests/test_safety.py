"""What a careful user hit in train, resume, export and eval (issue #10): nothing is deleted or overwritten that
should not be, a resume continues the same run or is refused, signals save, and each bad input gets one line."""
import json
import os
from pathlib import Path
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import nan_at, patch_losses, signal_at, train_config as config
from qzo2 import data as D, objective, trainer
from qzo2.methods import base, zo
from qzo2.cli import main
from qzo2.config import ConfigError, TrainConfig, load_config


def one_error(capsys, argv, match, code=2):
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("qzo2")]
    assert rc == code and len(err) == 1 and "error" in err[0] and match in err[0], (rc, err)


def overrides(cfg: TrainConfig, **kw) -> list[str]:
    """cfg as `key=value` arguments for `qzo2 train`."""
    d = dict(cfg.to_dict(), **kw)
    return [f"{k}={v}" for k, v in d.items()]


def steps_of(run) -> list[int]:
    return trainer.RunDir(run).steps()


# ---- 1. overwrite deletes only a run, and only once the new one can start -------------------------------------------
@pytest.mark.parametrize("value", ["", ".", "~", "/", "  "])
def test_output_dir_that_would_empty_cwd_home_or_root_is_refused(value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="output_dir"):
        load_config(None, [f"output_dir={value}", "task=sentiment"])
    one_error(capsys, ["train", f"output_dir={value}", "overwrite=true"], "output_dir")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_output_dir_equal_to_cwd_by_another_name_is_refused(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    with pytest.raises(ConfigError, match="current directory"):
        TrainConfig(output_dir="../sub")


def test_overwrite_refuses_a_directory_that_is_not_a_run(tiny, tmp_path):
    q, _, data = tiny
    out = tmp_path / "notarun"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(trainer.TrainingError, match="not a qzo2 run directory"):
        trainer.train(config(tmp_path, q, data, output_dir=str(out), overwrite=True, steps=2))
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_with_a_bad_model_or_bad_data_keeps_the_old_run(tiny, tmp_path):
    q, _, data = tiny
    cfg = config(tmp_path, q, data, steps=2, eval_every=0, save_every=1)
    trainer.train(cfg)
    with pytest.raises(trainer.TrainingError, match="does not exist"):
        trainer.train(config(tmp_path, tmp_path / "typo", data, steps=2, overwrite=True))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txet": "typo"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        trainer.train(config(tmp_path, q, bad, dev_file="", steps=2, overwrite=True))
    assert steps_of(cfg.output_dir) == [1, 2]  # the old run is untouched


def test_overwrite_replaces_a_run_once_the_new_one_starts(tiny, tmp_path):
    q, _, data = tiny
    trainer.train(config(tmp_path, q, data, steps=4, eval_every=0, save_every=1))
    result = trainer.train(config(tmp_path, q, data, steps=2, eval_every=0, save_every=1, lr=5e-4, overwrite=True))
    run = trainer.RunDir(result.run)
    assert run.steps() == [1, 2] and yaml.safe_load((run.path / "config.yaml").read_text())["lr"] == 5e-4
    assert not [p for p in run.path.parent.iterdir() if p.name.startswith(".run.old-")]  # the old run is gone


# ---- 3. resume: the checkpoint keeps its config; a different one is refused -------------------------------------
def test_resume_refuses_changed_settings_and_names_them(tiny, tmp_path, capsys):
    q, _, data = tiny
    cfg = config(tmp_path, q, data, steps=2, eval_every=0, dev_file="")
    trainer.train(cfg)
    saved = (trainer.RunDir(cfg.output_dir).path / "config.yaml").read_text()
    one_error(capsys, ["train"] + overrides(cfg, steps=4, lr=0.5, clip=0, max_length=16),
              "max_length 32 -> 16, lr 0.001 -> 0.5, clip 100.0 -> 0.0")
    assert (trainer.RunDir(cfg.output_dir).path / "config.yaml").read_text() == saved  # not rewritten
    assert steps_of(cfg.output_dir) == [2]


def test_resume_may_change_steps_and_cadence_and_records_them(tiny, tmp_path):
    q, _, data = tiny
    cfg = config(tmp_path, q, data, steps=2, eval_every=0)
    trainer.train(cfg)
    trainer.train(config(tmp_path, q, data, steps=4, eval_every=0, save_every=3, log_every=1, progress=True))
    run = trainer.RunDir(cfg.output_dir)
    assert run.steps() == [3, 4]
    assert yaml.safe_load((run.path / "config.yaml").read_text())["steps"] == 4
    state = json.loads((run.checkpoint("last") / "state.json").read_text())
    assert state["config"]["lr"] == cfg.lr and state["config"]["steps"] == 4  # each checkpoint keeps its config


def test_resume_across_dev_evals_and_best_saves_is_bit_identical(tiny, tmp_path):
    q, _, data = tiny
    kw = dict(eval_every=3, save_every=2, n_pairs=2, lr=2e-3)
    straight = trainer.train(config(tmp_path / "a", q, data, steps=10, **kw))
    with pytest.MonkeyPatch.context() as mp:  # Ctrl-C in step 5: dev evals at 0 and 3, checkpoints 4 and 5
        patch_losses(mp, signal_at(5, signal.SIGINT))
        assert trainer.train(config(tmp_path / "b", q, data, steps=10, **kw)).step == 5
    resumed = trainer.train(config(tmp_path / "b", q, data, steps=10, **kw))
    a, b = trainer.RunDir(straight.run), trainer.RunDir(resumed.run)
    for which in ("last", "best"):
        ta = load_file(str(a.checkpoint(which) / "trained.safetensors"))
        tb = load_file(str(b.checkpoint(which) / "trained.safetensors"))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (straight.best_step, straight.best_metric) == (resumed.best_step, resumed.best_metric)
    dev = [[(r["step"], r["dev_loss"]) for r in run.read_metrics() if "dev_loss" in r] for run in (a, b)]
    assert dev[0] == dev[1] and [s for s, _ in dev[0]] == [0, 3, 6, 9, 10]


# ---- 4. SIGTERM finishes the step, saves and exits 143 ---------------------------------------------------------------
def test_sigterm_saves_and_exits_143(tiny, tmp_path, monkeypatch, capsys):
    q, _, data = tiny
    patch_losses(monkeypatch, signal_at(3, signal.SIGTERM))  # what SLURM / Kubernetes / torchrun send
    before = signal.getsignal(signal.SIGTERM)
    cfg = config(tmp_path, q, data, steps=50, eval_every=0, save_every=100, dev_file="")
    assert main(["train"] + overrides(cfg)) == 143
    out, err = capsys.readouterr()
    assert "terminated, saved at step 3" in out and "nothing was written" not in err
    assert steps_of(cfg.output_dir) == [3]
    assert json.loads((trainer.RunDir(cfg.output_dir).checkpoint("last") / "state.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == before


# ---- 5. a skipped (non-finite) step still runs its tail: save, eval, best -------------------------------------------
def test_non_finite_final_save_and_eval_steps_still_save_and_evaluate(tiny, tmp_path, monkeypatch):
    q, _, data = tiny
    patch_losses(monkeypatch, nan_at(2, 4))
    cfg = config(tmp_path, q, data, steps=4, eval_every=2, save_every=2, keep_last=5)
    result = trainer.train(cfg)
    run = trainer.RunDir(cfg.output_dir)
    assert result.step == 4 and result.skipped == 2
    assert run.steps()[-2:] == [2, 4]  # the save steps, skipped or not
    assert [r["step"] for r in run.read_metrics() if "dev_loss" in r] == [0, 2, 4]


# ---- 6. export hf keeps the run's dtype; a lossy cast says how much it erased ----------------------------------------
def test_export_hf_defaults_to_the_run_dtype_and_warns_on_a_lossy_cast(tiny, tmp_path, capsys):
    _, src, data = tiny
    cfg = config(tmp_path, src, data, method="mezo", steps=3, lr=1e-6, eval_every=0)
    trainer.train(cfg)
    out = tmp_path / "hf"
    assert main(["export", cfg.output_dir, "-o", str(out), "--format", "hf"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    trained = load_file(str(trainer.RunDir(cfg.output_dir).checkpoint("last") / "trained.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(written[k], v) for k, v in trained.items())  # every fp32 update is kept
    assert main(["export", cfg.output_dir, "-o", str(tmp_path / "bf16"), "--format", "hf", "--dtype", "bf16"]) == 0
    warn = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warn) == 1 and "bf16 cast erases the trained change of" in warn[0] and "--dtype fp32" in warn[0]
    base = load_file(str(src / "model.safetensors"))
    changed = sum(int((trained[k] != base[k]).sum()) for k in trained)
    lost = sum(int(((trained[k] != base[k]) & (trained[k].bfloat16() == base[k].bfloat16())).sum()) for k in trained)
    assert f"{lost:,} of {changed:,}" in warn[0] and lost > changed / 2


# ---- 8. eval: device, batch size, max length; a run's dtype by default -------------------------------------------------
def test_eval_takes_the_run_dtype_and_its_options(tiny, tmp_path, capsys):
    from qzo2.evaluation import load_for_eval

    q, _, _ = tiny
    task = tmp_path / "task.yaml"
    task.write_text('template: "{sentence} It was"\ncandidates: [" bad", " good"]\n')
    rows = tmp_path / "rows.jsonl"
    words = "the quick brown fox jumps over the lazy dog while a model reads".split()
    rows.write_text("".join(json.dumps({"sentence": " ".join(words[i:]), "label": i % 2}) + "\n" for i in range(8)))
    cfg = config(tmp_path, q, rows, task=str(task), dev_file=str(rows), dtype="bf16", steps=2, eval_every=2)
    trainer.train(cfg)
    capsys.readouterr()
    model, _, _ = load_for_eval(cfg.output_dir, "last")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16  # not --dtype's old fp32 default
    dev = [r for r in trainer.RunDir(cfg.output_dir).read_metrics() if "dev_accuracy" in r][-1]
    argv = ["eval", cfg.output_dir, "--task", str(task), "--data", str(rows), "--checkpoint", "last"]
    assert main(argv + ["--device", "cpu", "--batch-size", "3"]) == 0
    acc = float(capsys.readouterr().out.split("accuracy")[1].split()[0])
    assert acc == pytest.approx(dev["dev_accuracy"], abs=5e-5)
    # --max-length cuts the prompts from the left: the same numbers as objective.evaluate at that max_length
    assert main(argv + ["--max-length", "6"]) == 0
    loss4 = float(capsys.readouterr().out.split("candidate loss")[1].split(";")[0])
    model, tok, run_cfg = load_for_eval(cfg.output_dir, "last")
    from qzo2 import data as D

    items = D.load_task_examples(D.load_task_yaml(task), rows)
    short = objective.evaluate(model, "classification", items, tok, max_length=6, batch_size=16)
    assert loss4 == pytest.approx(short["loss"], abs=5e-5)
    one_error(capsys, argv + ["--max-length", "2"], "max_length 2 leaves no prompt")  # it reaches the encoder
    if not torch.cuda.is_available():
        one_error(capsys, argv + ["--device", "cuda"], "no CUDA GPU is available")
        one_error(capsys, ["eval", str(q), "--device", "cuda"], "no CUDA GPU is available")  # a plain model too
    one_error(capsys, ["eval", str(q), "--device", "tpu"], "unknown device 'tpu'; use auto, cpu or cuda")


# ---- 9. run dirs hold resolved paths: export/eval work from anywhere ---------------------------------------------------
def test_run_dir_with_relative_paths_works_from_another_directory(tiny, tmp_path, monkeypatch, capsys):
    q, _, data = tiny
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, os.path.relpath(q), os.path.relpath(data), output_dir="runs/rel", steps=2, eval_every=0)
    trainer.train(cfg)
    text = (tmp_path / "runs/rel/config.yaml").read_text()
    stored = yaml.safe_load(text)
    assert stored["model"] == str(q) and stored["train_file"] == str(data)
    assert text.startswith("# qzo2 train config") and "model='q'" in text  # what was typed, for the record
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["export", str(tmp_path / "runs/rel"), "-o", "gptq"]) == 0
    assert main(["eval", str(tmp_path / "runs/rel"), "--checkpoint", "last", "--ppl", str(data), "--seqlen", "8",
                 "--nseq", "1"]) == 0
    # and resuming from there, with the paths typed relative to the new directory, is the same run
    trainer.train(config(tmp_path, os.path.relpath(q), os.path.relpath(data), output_dir="../runs/rel", steps=3,
                         eval_every=0))
    assert steps_of(tmp_path / "runs/rel") == [2, 3]


# ---- 10, 13, 14, 15: one clear line ---------------------------------------------------------------------------------
def test_missing_model_says_it_does_not_exist(tiny, tmp_path, capsys):
    _, _, data = tiny
    cfg = config(tmp_path, tmp_path / "no-such-model", data)
    one_error(capsys, ["train"] + overrides(cfg), f"model {tmp_path / 'no-such-model'} does not exist")
    assert not (tmp_path / "run").exists()


def test_quantize_refuses_to_overwrite_its_source(make_model_dir, tmp_path, capsys):
    src, _ = make_model_dir("llama")
    before = sorted(p.name for p in src.iterdir())
    one_error(capsys, ["quantize", str(src), "-o", str(src), "--overwrite", "-q"], "is the input")
    one_error(capsys, ["quantize", str(src), "-o", str(src.parent), "--overwrite", "-q"], "contains the input")
    assert sorted(p.name for p in src.iterdir()) == before


def test_train_with_overrides_and_no_recipe(tiny, tmp_path, capsys):
    q, _, data = tiny
    cfg = config(tmp_path, q, data, steps=2, eval_every=0)
    assert main(["train"] + overrides(cfg)) == 0
    assert "finished at step 2" in capsys.readouterr().out
    one_error(capsys, ["train", "nosuchkey=3"], "unknown key 'nosuchkey'")


def test_raw_messages_are_now_one_clear_line(tiny, tmp_path, capsys):
    q, _, data = tiny
    cfg = config(tmp_path, q, data, steps=2, eval_every=0)
    trainer.train(cfg)
    one_error(capsys, ["eval", cfg.output_dir, "--checkpoint", "latest"], "best, last or a step number")
    one_error(capsys, ["export", cfg.output_dir, "-o", str(tmp_path / "x"), "--checkpoint", "latest"],
              "best, last or a step number")
    one_error(capsys, ["train", str(tmp_path)], "is a directory")


def test_data_errors_come_before_the_model_loads(tiny, tmp_path, monkeypatch):
    q, _, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "no completion"}\n')

    def loading(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    import qzo2.methods

    monkeypatch.setattr(qzo2.methods, "load_model", loading)
    with pytest.raises(ValueError, match="bad.jsonl line 2: prompt_completion row is missing"):
        trainer.train(config(tmp_path, q, bad, dev_file=""))
    task = tmp_path / "t.yaml"
    task.write_text('template: "{sentence} It was"\ncandidates: [" bad", " good"]\n')
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"sentence": "fine", "label": 0}\n{"sentence": "x", "label": 7}\n')
    with pytest.raises(ValueError, match="rows.jsonl line 2: label 7"):
        trainer.train(config(tmp_path, q, rows, task=str(task), dev_file=""))


# ---- 11. the template is a setting, and the Llama-2 recipe says what it trains -----------------------------------------
def test_template_key_selects_the_sentiment_prompt():
    cfg = load_config("recipes/qzo-llama2-7b.yaml")
    assert cfg.template == "sst2" and cfg.task == "sentiment"
    ex = D.read_data(TrainConfig(template="sst2", n_train=3, n_dev=3, n_test=3))["dev"][0]
    assert ex.prompt.endswith(" It was") and ex.candidates == [" terrible", " great"]
    ex = D.read_data(TrainConfig(n_train=3, n_dev=3, n_test=3))["dev"][0]
    assert ex.prompt.startswith("Review: ") and ex.candidates == [" negative", " positive"]
    with pytest.raises(ConfigError, match="template"):
        TrainConfig(template="imdb")


def test_every_shipped_recipe_loads_with_the_settings_it_names():
    """A recipe with an unknown key, a bad value or a stale name fails here, not in a user's 10-minute run."""
    recipes = sorted(Path("recipes").glob("*.yaml"))  # the demos (benchmark rows: tests/test_bench.py)
    assert len(recipes) >= 5
    for path in recipes:
        cfg = load_config(str(path))
        raw = yaml.safe_load(path.read_text())
        assert cfg.method == raw["method"] and cfg.steps == raw["steps"], path
        assert cfg.lr == pytest.approx(float(raw["lr"])), path


# ---- 12. weight decay does what its help says ---------------------------------------------------------------------
def test_weight_decay_is_mezo_only_and_skips_biases_and_norms():
    from conftest import build_model

    with pytest.raises(ConfigError, match="weight_decay is not for method=qzo"):
        TrainConfig(method="qzo", weight_decay=0.1)
    model = build_model("opt")
    targets = base.weight_targets(model, ("linear", "norm", "embedding"))
    before = {t.path: t.tensor.clone() for t in targets}
    zo.apply_update(targets, seed=0, coeffs=[0.0], weight_decay=0.1, lr=0.5)
    kinds = {"bias": 0, "norm": 0, "decayed": 0}
    for t in targets:
        if t.name == "bias" or isinstance(t.module, torch.nn.LayerNorm):
            assert torch.equal(t.tensor, before[t.path]), t.path  # MeZO's reference never decays these
            kinds["bias" if t.name == "bias" else "norm"] += 1
        else:
            torch.testing.assert_close(t.tensor, before[t.path] * (1 - 0.05), rtol=0, atol=1e-7)
            kinds["decayed"] += 1
    assert all(kinds.values()), kinds  # each kind occurs


def test_tied_lm_head_is_an_alias_of_the_trained_embedding():
    from conftest import build_model

    model = build_model("llama", tie_word_embeddings=True)
    (emb,) = [t for t in base.weight_targets(model, ("linear", "embedding")) if t.path == "model.embed_tokens.weight"]
    assert emb.aliases == [(model.lm_head, "weight")]
