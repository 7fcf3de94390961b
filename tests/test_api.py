"""The Python API end to end on a tiny model: quantize -> train (rows in memory) -> export -> evaluate, off the main
thread, everything inside a temporary directory; its results are the ones the run directory and the CLI give."""
from __future__ import annotations

import signal
import threading

import pytest

from conftest import TEXT

WORDS = TEXT.split()


def task_rows(n=16):
    """A learnable two-way task over the tokenizer's words: label 1 when the text holds 'fox'."""
    rows = []
    for i in range(n):
        words = WORDS[i:i + 5]
        label = i % 2
        words = (["fox"] if label else ["dog"]) + [w for w in words if w not in ("fox", "dog")]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def run_off_main_thread(fn):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_api_end_to_end(make_model_dir, tmp_path, monkeypatch):
    import qzo2
    from qzo2 import TrainConfig, evaluate, export, quantize, train
    from qzo2.run import RunDir

    assert callable(qzo2.export) and callable(qzo2.evaluate)  # the functions, not the modules behind them
    src, _ = make_model_dir("llama")
    task = tmp_path / "task.yaml"
    task.write_text("template: 'Text: {text}\\nAnswer:'\ncandidates: [' dog', ' fox']\n")
    rows = task_rows()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # every output goes where it is told: the working directory stays empty
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    import qzo2.trainer

    picks, given = iter([0.0, 1.0, 0.5, 0.5]), {}  # dev evaluations at steps 0, 4, 8, 12: step 4 is the best

    def metric(m):  # one value per evaluation (the trainer may ask more than once)
        if m["loss"] not in given:
            given[m["loss"]] = next(picks, None)
            assert given[m["loss"]] is not None, given
        return given[m["loss"]]

    monkeypatch.setattr(qzo2.trainer, "dev_metric", metric)

    def work():
        report = quantize(src, tmp_path / "q", group_size=32)
        zero = evaluate(tmp_path / "q", task=str(task), data=rows, max_length=32)
        result = train(model=str(tmp_path / "q"), method="adalomo", task=str(task), train_data=rows,
                       dev_data=rows, steps=12, batch_size=4, lr=3e-2, max_length=32, eval_every=4, save_every=4,
                       output_dir=str(tmp_path / "run"))
        trained = evaluate(result, task=str(task), data=rows)  # max_length: the run's
        from_best = evaluate(tmp_path / "run", task=str(task), data=rows)  # auto: the best checkpoint
        from_last = evaluate(tmp_path / "run", task=str(task), data=rows, checkpoint="last")
        exported = export(result, tmp_path / "gptq")
        served = evaluate(tmp_path / "gptq", task=str(task), data=rows, max_length=32)
        return report, zero, result, trained, from_best, from_last, exported, served

    report, zero, result, trained, from_best, from_last, exported, served = run_off_main_thread(work)
    assert report.summary(tmp_path / "q")
    assert isinstance(result.config, TrainConfig) and result.config.train_file.startswith("memory:")
    assert result.step == 12 and result.best_step == 4 and result.checkpoint == "best"
    assert result.metrics == RunDir(tmp_path / "run").read_metrics()
    dev = [r for r in result.metrics if "dev_accuracy" in r]
    assert dev[0]["step"] == 0 and dev[0]["dev_loss"] == pytest.approx(zero["loss"], rel=1e-5)
    # the returned model is the best checkpoint's: the same scores as loading that checkpoint from the run dir
    assert trained["loss"] == pytest.approx(from_best["loss"], rel=1e-6)
    assert trained["loss"] == pytest.approx(dev[1]["dev_loss"], rel=1e-5) and dev[1]["step"] == 4
    assert from_last["loss"] == pytest.approx(dev[-1]["dev_loss"], rel=1e-5) != trained["loss"]
    assert dev[-1]["dev_loss"] < zero["loss"]  # it trained
    assert not any(p.requires_grad for p in result.model.parameters())
    assert served["loss"] == pytest.approx(trained["loss"], rel=1e-2)  # scales stored in fp16
    assert exported.fmt == "gptq"
    assert list(cwd.iterdir()) == []
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert qzo2.export is export and qzo2.evaluate is evaluate  # still the functions, after every module loaded


def test_api_resumes_only_on_the_same_rows(make_model_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    from qzo2 import quantize, train
    from qzo2.run import TrainingError

    src, _ = make_model_dir("llama")
    quantize(src, tmp_path / "q", group_size=32)
    rows = [{"prompt": " ".join(WORDS[i:i + 4]), "completion": " " + WORDS[i + 4]} for i in range(8)]
    kw = dict(model=str(tmp_path / "q"), method="qzo", steps=4, batch_size=4, lr=1e-3, max_length=32,
              save_every=2, eval_every=0, output_dir=str(tmp_path / "run"))
    first = train(train_data=rows, **kw)
    assert first.step == 4 and first.config.task == ""  # rows and no task: text rows
    # the same rows as a datasets.Dataset have the same fingerprint: the run resumes
    again = train(train_data=datasets.Dataset.from_list(rows), **{**kw, "steps": 6})
    assert again.step == 6 and again.config.train_file == first.config.train_file
    with pytest.raises(TrainingError, match="train_file"):
        train(train_data=rows[::-1], **{**kw, "steps": 8})
    # a recipe's own task is kept (rows with no task given anywhere are text rows)
    task = tmp_path / "t.yaml"
    task.write_text("template: '{text} is'\ncandidates: [' dog', ' fox']\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: {task}\nmethod: qzo\nsteps: 2\neval_every: 0\n")
    kw.pop("steps"), kw.pop("eval_every"), kw.pop("method")
    run = train(str(recipe), train_data=[{"text": "the dog", "label": 0}, {"text": "a fox", "label": 1}],
                **{**kw, "output_dir": str(tmp_path / "run2"), "batch_size": 2})
    assert run.config.task == str(task) and run.step == 2


def test_api_config_errors_are_clear(tmp_path):
    from qzo2 import TrainConfig, make_config, train
    from qzo2.config import ConfigError

    cfg = make_config({"method": "lomo", "lr": "1e-3"}, steps=5, output_dir=str(tmp_path / "r"))
    assert (cfg.method, cfg.lr, cfg.steps) == ("lomo", 1e-3, 5)
    assert make_config(cfg, steps=7).steps == 7 and isinstance(cfg, TrainConfig)
    with pytest.raises(ConfigError, match="unknown key 'setps'.*did you mean steps"):
        make_config(setps=3)
    with pytest.raises(ConfigError, match="task=sentiment is the built-in dataset"):
        train(task="sentiment", train_data=[{"text": "x"}], output_dir=str(tmp_path / "r"))
    with pytest.raises(TypeError, match="train_file=PATH"):
        train(train_data="rows.jsonl", output_dir=str(tmp_path / "r"))
