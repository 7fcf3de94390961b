"""qzo2 train end to end on tiny models: loss falls (QZO and MeZO), resume is bit-identical, NaN steps are skipped,
DDC clips, schedules, Ctrl-C saves, run-dir contents, eval of a run."""
import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEXT, nan_at, patch_losses, signal_at, train_config as config
from qzo2 import data as D, objective, trainer
from qzo2.config import ConfigError, TrainConfig, load_config, lr_at


def dev_losses(run):
    return [r["dev_loss"] for r in trainer.RunDir(run).read_metrics() if "dev_loss" in r]


def test_qzo_loss_falls_memorizing_tiny_data(tiny, tmp_path):
    q, _, data = tiny
    cfg = config(tmp_path, q, data, steps=150, lr=2e-4, eps=1e-3, n_pairs=4, eval_every=75, clip=0)
    result = trainer.train(cfg)
    losses = dev_losses(cfg.output_dir)
    assert len(losses) == 3 and result.step == 150
    assert losses[-1] < losses[0] - 0.05, losses
    run = trainer.RunDir(cfg.output_dir)
    assert (run.path / "metrics.png").stat().st_size > 1000 and (run.path / "config.yaml").exists()
    assert (run.path / "best" / "trained.safetensors").exists()
    tensors = load_file(str(run.checkpoint("last") / "trained.safetensors"))
    assert all(k.endswith(".scales") and v.dtype == torch.float32 for k, v in tensors.items())
    assert sum(v.numel() for v in tensors.values()) == result.trained


def test_mezo_loss_falls_memorizing_tiny_data(tiny, tmp_path):
    _, src, data = tiny
    cfg = config(tmp_path, src, data, method="mezo", steps=150, lr=2e-4, eps=1e-3, n_pairs=4, eval_every=75, clip=0)
    trainer.train(cfg)
    losses = dev_losses(cfg.output_dir)
    assert losses[-1] < losses[0] - 0.05, losses


def test_resume_is_bit_identical(tiny, tmp_path):
    q, _, data = tiny
    full = config(tmp_path / "a", q, data, steps=12, save_every=5, eval_every=0, n_pairs=2)
    trainer.train(full)
    part = config(tmp_path / "b", q, data, steps=7, save_every=5, eval_every=0, n_pairs=2)
    trainer.train(part)  # stops after step 7 (checkpoints at 5 and 7)
    resumed = config(tmp_path / "b", q, data, steps=12, save_every=5, eval_every=0, n_pairs=2)
    trainer.train(resumed)
    a = load_file(str(trainer.RunDir(full.output_dir).checkpoint("last") / "trained.safetensors"))
    b = load_file(str(trainer.RunDir(resumed.output_dir).checkpoint("last") / "trained.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps_logged = [r["step"] for r in trainer.RunDir(resumed.output_dir).read_metrics() if "loss" in r]
    assert steps_logged == sorted(set(steps_logged))  # no duplicated records after the resume
    assert trainer.RunDir(resumed.output_dir).steps() == [10, 12]  # keep_last=2


def test_resume_refuses_a_different_run(tiny, tmp_path):
    q, _, data = tiny
    trainer.train(config(tmp_path, q, data, steps=2, eval_every=0))
    with pytest.raises(trainer.TrainingError, match="differs from its checkpoint in seed 0 -> 5"):
        trainer.train(config(tmp_path, q, data, steps=4, eval_every=0, seed=5))
    trainer.train(config(tmp_path, q, data, steps=3, eval_every=0, seed=5, overwrite=True))


def test_nan_steps_are_skipped_then_training_stops(tiny, tmp_path, monkeypatch):
    q, _, data = tiny
    patch_losses(monkeypatch, nan_at(2, 3, from_call=6))
    cfg = config(tmp_path, q, data, steps=20, eval_every=0, save_every=1, max_skips=3, log_every=1)
    with pytest.raises(trainer.TrainingError, match="3 consecutive non-finite"):
        trainer.train(cfg)
    run = trainer.RunDir(cfg.output_dir)
    records = run.read_metrics()
    assert [r["step"] for r in records if r.get("skipped") is True] == [2, 3, 6, 7, 8]
    # skipped steps still save (save_every=1): steps 6 and 7 hold step 5's tensors, untouched by the NaN steps;
    # the run stopped inside step 8, before its save
    assert run.steps() == [6, 7]
    state = json.loads((run.checkpoint("last") / "state.json").read_text())
    assert state["step"] == 7 and state["skipped"] == 4 and state["consecutive_skips"] == 2
    six, seven = (load_file(str(run.checkpoint(str(s)) / "trained.safetensors")) for s in (6, 7))
    assert all(torch.isfinite(v).all() and torch.equal(v, seven[k]) for k, v in six.items())


def test_ddc_clips_the_update(tiny, tmp_path):
    """With C tiny every step is clipped: each scale moves by exactly -lr*C*sign(d)*z, where d's sign comes from an
    independent estimate (two plain forwards with the scales perturbed in place)."""
    from qzo2.methods import base, zo

    q, _, data = tiny
    cfg = config(tmp_path, q, data, steps=1, eval_every=0, clip=1e-6, lr=1.0, scale_floor=0.0)
    model, tok, method = trainer.load_for_training(cfg)
    targets = method.targets
    before = {t.path: t.tensor.clone() for t in targets}
    seed = base.step_seed(cfg.seed, 0)
    task = D.build_task(cfg, tok)
    batch = D.encode(task.kind, D.batch_at(task.train, cfg.batch_size, cfg.seed, 0), tok, cfg.max_length)
    losses = []
    with torch.no_grad():
        for sign in (1, -1):
            for t in targets:
                t.tensor.copy_(before[t.path] + sign * cfg.eps * zo.z_for(t.tensor.shape, seed, t.index, 0))
            losses.append(float(objective.lm_chunk_losses(model, batch, 1)[0]))
        for t in targets:
            t.tensor.copy_(before[t.path])
    d = (losses[0] - losses[1]) / (2 * cfg.eps)
    assert abs(d) > 1e-3  # a clear sign
    trainer.train(cfg)
    after = load_file(str(trainer.RunDir(cfg.output_dir).checkpoint("last") / "trained.safetensors"))
    rec = [r for r in trainer.RunDir(cfg.output_dir).read_metrics() if "clip_rate" in r][0]
    assert rec["clip_rate"] == 1.0 and rec["d"] == pytest.approx(abs(d), rel=1e-3)
    for t in targets:
        z = zo.z_for(t.tensor.shape, seed, t.index, 0)
        expect = before[t.path] - cfg.lr * cfg.clip * math.copysign(1.0, d) * z
        torch.testing.assert_close(after[t.path], expect, rtol=0, atol=1e-9)


@pytest.mark.parametrize("schedule,expect", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),  # warmup (t+1)/W, then (T - t)/(T - W) as HF's linear schedule
    ("cosine", [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
])
def test_lr_schedules(schedule, expect):
    cfg = TrainConfig(lr=1.0, steps=6, warmup_steps=2, lr_schedule=schedule, task="sentiment")
    assert [lr_at(cfg, s) for s in range(6)] == pytest.approx(expect)


def test_ctrl_c_saves_and_exits_cleanly(tiny, tmp_path, monkeypatch):
    q, _, data = tiny
    patch_losses(monkeypatch, signal_at(4, signal.SIGINT))  # what Ctrl-C sends; the handler lets the step finish
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `nohup ... &`
    cfg = config(tmp_path, q, data, steps=50, eval_every=0, save_every=100)
    result = trainer.train(cfg)
    assert result.interrupted and result.step == 4
    assert trainer.RunDir(cfg.output_dir).steps() == [0, 4]  # step 0: the dev baseline (best so far)
    assert signal.getsignal(signal.SIGINT) is before  # the trainer put the previous handler back


def test_qzo_refuses_unquantized_and_mezo_refuses_quantized(tiny, tmp_path):
    q, src, data = tiny
    with pytest.raises(trainer.TrainingError, match="qzo2 quantize"):
        trainer.train(config(tmp_path, src, data))
    with pytest.raises(trainer.TrainingError, match="method=mezo trains full weights; .* is quantized \\(train its "
                                                    "scales with one of: qzo, lomo, adalomo, adamw, hift\\)"):
        trainer.train(config(tmp_path, q, data, method="mezo"))


def test_classification_task_and_eval_of_a_run(tiny, tmp_path, capsys):
    q, _, _ = tiny
    task = tmp_path / "task.yaml"
    task.write_text('name: fox\ntemplate: "{sentence} It was"\ncandidates: [" bad", " good"]\nlabel_field: label\n')
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"sentence": w, "label": i % 2}) + "\n" for i, w in enumerate(TEXT.split()[:24])))
    cfg = config(tmp_path, q, rows, task=str(task), steps=6, eval_every=3, objective="classification")
    result = trainer.train(cfg)
    records = trainer.RunDir(cfg.output_dir).read_metrics()
    dev = [(r["step"], r["dev_accuracy"]) for r in records if "dev_accuracy" in r]
    assert [step for step, _ in dev] == [0, 3, 6]
    best = max(dev, key=lambda sa: sa[1])  # the first step with the highest dev accuracy (later ties do not win)
    assert (result.best_step, result.best_metric) == best
    best_state = json.loads((trainer.RunDir(cfg.output_dir).path / "best" / "state.json").read_text())
    assert best_state["step"] == best[0]
    from qzo2.cli import main

    assert main(["eval", cfg.output_dir, "--task", str(task), "--data", str(rows), "--checkpoint", "last"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    acc = float(line.split("accuracy")[1].split()[0])
    last = [r for r in records if "dev_accuracy" in r][-1]["dev_accuracy"]
    assert acc == pytest.approx(last, abs=5e-5)  # printed with 4 decimals


def test_config_overrides_and_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 5\nlr: 1.0e-5\ntask: sentiment\n")
    cfg = load_config(str(recipe), ["lr=2e-6", "n_pairs=3", "progress=false", "output_dir=runs/x"])
    assert (cfg.steps, cfg.lr, cfg.n_pairs, cfg.progress, cfg.output_dir) == (5, 2e-6, 3, False, "runs/x")
    # YAML 1.1 reads bare on/off as booleans: for on/off choices they mean "on"/"off", in a recipe or an override
    recipe.write_text("steps: 5\nlr: 1.0e-5\ntask: sentiment\noffload: off\n")
    assert load_config(str(recipe)).offload == "off"
    cfg = load_config(str(recipe), ["offload=on", "cache_base=off"])
    assert (cfg.offload, cfg.cache_base) == ("on", "off")
    with pytest.raises(ConfigError, match="did you mean steps"):
        load_config(str(recipe), ["step=3"])
    with pytest.raises(ConfigError, match="expects int"):
        load_config(str(recipe), ["steps=many"])
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(str(recipe), ["lr_schedule=exp"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    recipe.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(recipe))


def test_trainable_regex_limits_what_changes(tiny, tmp_path):
    q, _, data = tiny
    cfg = config(tmp_path, q, data, steps=2, eval_every=0, trainable=r"layers\.1\.mlp")
    model, _, method = trainer.load_for_training(cfg)
    targets = method.targets
    assert sorted(t.path for t in targets) == [f"model.layers.1.mlp.{p}.scales" for p in ("down_proj", "gate_proj",
                                                                                         "up_proj")]
    trainer.train(cfg)
    saved = load_file(str(trainer.RunDir(cfg.output_dir).checkpoint("last") / "trained.safetensors"))
    assert set(saved) == {t.path for t in targets}
    with pytest.raises(trainer.TrainingError, match="matches no"):
        trainer.load_for_training(config(tmp_path, q, data, trainable="nothing-like-this"))


def test_train_help_lists_every_key(capsys):
    from qzo2.cli import main
    from qzo2.config import FIELDS

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {k} " in out for k in FIELDS)


def test_eval_generate_and_ppl_of_a_run(tiny, tmp_path, capsys):
    q, _, data = tiny
    cfg = config(tmp_path, q, data, steps=2, eval_every=0)
    trainer.train(cfg)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    from qzo2.cli import main

    assert main(["eval", cfg.output_dir, "--checkpoint", "last", "--generate", "the quick brown",
                 "--max-new-tokens", "5", "--ppl", str(text), "--seqlen", "16", "--nseq", "2"]) == 0
    out = capsys.readouterr().out
    assert "> the quick brown" in out and "perplexity" in out
    assert main(["eval", cfg.output_dir, "--checkpoint", "7"]) == 2  # no such checkpoint: one error line
    assert "no checkpoint at step 7" in capsys.readouterr().err
