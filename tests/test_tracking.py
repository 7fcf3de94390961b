"""report_to: the tensorboard event file read back with tensorboard's own reader holds every numeric metrics.jsonl
scalar at its step; a resume after a crash leaves no duplicate steps (purge_step); wandb writes an offline run under
the run directory and a resume continues the same run id; the memory and streamed-traffic scalars of the training
lines; one-line errors for an unknown backend and a missing package."""
import math
import struct
import sys

import pytest
import torch

from conftest import make_tiny, train_config
from quant.checkpoint import decoder_blocks
from quant.linear import QuantLinear
from qzo2 import cli, trainer, tracking
from qzo2.config import ConfigError, TrainConfig, load_config
from qzo2.model import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """(quantized dir, unquantized dir, train jsonl) for a tiny 2-block Llama, built once for the module."""
    return make_tiny(tmp_path_factory.mktemp("tracking"), tokenizer)


def expected(record: dict) -> dict:
    """The documented mapping (qzo2/tracking.py, README): each numeric value of a metrics.jsonl record under
    <group>/<key>, group = skipped (a skipped step's line), dev (a dev evaluation) or train."""
    group = "skipped" if record.get("skipped") is True else "dev" if any(k.startswith("dev_") for k in record) \
        else "train"
    return {f"{group}/{k}": v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]  # tensorboard stores a scalar as float32


def event_scalars(logdir) -> dict:
    """{(tag, step): [values]} as tensorboard's EventAccumulator reads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            out.setdefault((tag, e.step), []).append(e.value)
    return out


def assert_same_scalars(run_dir) -> list[dict]:
    """Every numeric scalar of metrics.jsonl is in the event files once, at its step, with its value (float32)."""
    records = trainer.RunDir(run_dir).read_metrics()
    want = {(tag, r["step"]): v for r in records for tag, v in expected(r).items()}
    got = event_scalars(run_dir / "tensorboard")
    assert set(got) == set(want), (set(want) ^ set(got))
    for key, v in want.items():
        assert len(got[key]) == 1, (key, got[key])  # no duplicate step
        assert got[key][0] == f32(v) or (math.isnan(v) and math.isnan(got[key][0])), (key, got[key], v)
    return records


def training_lines(records):
    return [r for r in records if "tok_s" in r]


def test_tensorboard_event_file_holds_every_metrics_scalar(tiny, tmp_path):
    q, _, data = tiny
    cfg = train_config(tmp_path, q, data, steps=6, log_every=2, eval_every=3, save_every=6,
                       report_to="jsonl,tensorboard")
    trainer.train(cfg)
    run = tmp_path / "run"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = assert_same_scalars(run)
    lines = training_lines(records)
    assert [r["step"] for r in lines] == [2, 4, 6] and [r["step"] for r in records if "dev_loss" in r] == [0, 3, 6]
    # CPU: peak_mem_gb is the process's peak RSS (ru_maxrss), which only grows
    assert all(0 < r["peak_mem_gb"] <= tracking.host_peak_rss_gb() for r in lines)
    assert all("h2d_gb_per_step" not in r and "host_peak_gb" not in r for r in lines)  # nothing streamed, no GPU
    assert {"train/loss", "train/peak_mem_gb", "train/tok_s", "dev/dev_loss"} <= {t for t, _ in event_scalars(
        run / "tensorboard")}


def test_resume_after_a_crash_leaves_no_duplicate_steps(tiny, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    q, _, data = tiny
    cfg = train_config(tmp_path, q, data, steps=10, log_every=1, eval_every=0, save_every=5,
                       report_to="tensorboard")
    real = trainer.step_batch

    def crash_at_8(task, tokenizer, cfg, step, world=None):
        if step == 7:  # steps 1..7 are logged, the last checkpoint is step 5
            raise RuntimeError("crash")
        return real(task, tokenizer, cfg, step, world)

    monkeypatch.setattr(trainer, "step_batch", crash_at_8)
    with pytest.raises(RuntimeError, match="crash"):
        trainer.train(cfg)
    run = tmp_path / "run"
    assert max(r["step"] for r in trainer.RunDir(run).read_metrics()) == 7
    monkeypatch.setattr(trainer, "step_batch", real)
    trainer.train(cfg)  # resumes from step 5: metrics.jsonl drops 6 and 7, tensorboard hides them (purge_step)
    records = assert_same_scalars(run)  # the resumed run's values at 6 and 7 (tok_s differs from the crashed run's)
    assert [r["step"] for r in training_lines(records)] == list(range(1, 11))
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    starts = [e.step for f in files for e in EventFileLoader(str(f)).Load()
              if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    assert len(files) == 2 and starts == [6]  # the resumed run's file hides steps >= 6 of the files before it


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb as a user gets it: no WANDB_MODE set; its config and cache kept out of the home directory."""
    for var in ("WANDB_MODE", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def test_wandb_offline_run_under_the_run_dir_and_resume_continues_it(tiny, tmp_path, monkeypatch, wandb_env):
    import wandb
    from wandb.sdk.wandb_run import Run

    # wandb 0.31 has no public reader of an offline run's .wandb file (its Go core writes it, `wandb sync` reads
    # it), so the logged history is checked at wandb's own Run.log, wrapped to collect each call and pass it on to
    # the real library, which writes the offline run
    logged, real_log = [], Run.log

    def log(self, data, step=None, commit=None):
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, commit=commit)

    monkeypatch.setattr(Run, "log", log)
    q, _, data = tiny
    kw = dict(log_every=2, eval_every=0, save_every=2, report_to="jsonl,wandb")
    trainer.train(train_config(tmp_path, q, data, steps=2, **kw))
    run = tmp_path / "run"
    run_id = (run / "wandb" / "qzo2-run-id").read_text().strip()
    trainer.train(train_config(tmp_path, q, data, steps=4, **kw))  # a resume: the same wandb run id
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(f"-{run_id}") for d in offline)  # offline mode by default
    assert all((d / f"run-{run_id}.wandb").stat().st_size > 0 for d in offline)
    records = trainer.RunDir(run).read_metrics()
    assert logged == [(r["step"], expected(r)) for r in records if expected(r)]
    assert [s for s, v in logged if "train/peak_mem_gb" in v] == [2, 4]
    assert wandb.run is None  # finished


def test_unknown_backend_and_missing_package_are_one_line_errors(tiny, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"report_to: unknown 'tensorbord', 'none'; a comma list of jsonl, "
                                          r"tensorboard, wandb \(metrics.jsonl is always written\)"):
        TrainConfig(report_to="jsonl,tensorbord,none")
    assert load_config(None, ["report_to=TensorBoard, wandb"]).report_to == "TensorBoard, wandb"
    assert tracking.backends("jsonl, TensorBoard,wandb,tensorboard") == ["tensorboard", "wandb"]

    q, _, data = tiny
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` sees when it is not installed
    monkeypatch.setattr(trainer, "load_for_training", lambda cfg: pytest.fail("the model loaded"))
    cfg = train_config(tmp_path, q, data, steps=2, report_to="jsonl,tensorboard")
    message = "report_to=tensorboard needs the tensorboard package: pip install 'qzo2[track]'"
    with pytest.raises(trainer.TrainingError) as e:
        trainer.train(cfg)
    assert str(e.value) == message and not (tmp_path / "run").exists()
    assert cli.main(["train", f"model={q}", "task=", f"train_file={data}", f"output_dir={tmp_path / 'run'}",
                     "report_to=tensorboard"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(message), err


# ---- streamed blocks: host<->device bytes per step --------------------------------------------------------------------
def block_bytes(model, want) -> int:
    """Bytes of the tensors a streamer moves, computed from a freshly loaded model: `want(module)` -> the tensors
    of each decoder-block module (the tiny model's tensors are multiples of the engine's 128-byte alignment)."""
    _, blocks = decoder_blocks(model)
    return sum(t.nbytes for b in blocks for m in b.modules() for t in want(m))


def test_streamed_codes_bytes_per_step(tiny, tmp_path):
    q, _, data = tiny
    codes = block_bytes(load_model(str(q))[0],
                        lambda m: [m.qweight, m.zeros] if isinstance(m, QuantLinear) else [])
    # log windows 1-2 and 3-4; the dev evaluation at step 3 (mid-window) uploads too, and is left out
    cfg = train_config(tmp_path, q, data, steps=4, log_every=2, eval_every=3, save_every=4, offload="on",
                       prefetch_depth=2)
    trainer.train(cfg)
    lines = training_lines(trainer.RunDir(cfg.output_dir).read_metrics())
    assert [r["step"] for r in lines] == [2, 4] and lines[0]["streamed_blocks"] == 2
    for r in lines:  # QZO streams each block's codes once per step (one dual forward) and copies nothing back
        assert r["h2d_gb_per_step"] * tracking.GB == codes and r["d2h_gb_per_step"] == 0
        assert r["peak_mem_gb"] > 0


def test_streamed_weights_bytes_per_step(tiny, tmp_path):
    _, src, data = tiny
    linear = block_bytes(load_model(str(src), dtype=torch.bfloat16)[0],
                         lambda m: list(m.parameters(recurse=False)) if isinstance(m, torch.nn.Linear) else [])
    cfg = train_config(tmp_path, src, data, method="mezo", dtype="bf16", steps=4, log_every=2, eval_every=3,
                       save_every=4, offload="on")
    trainer.train(cfg)
    lines = training_lines(trainer.RunDir(cfg.output_dir).read_metrics())
    # ZO2 mode: every step uploads each block's Linear weights; step t's update rides on the next forward that
    # reaches the block and is copied back then: steps 1-2 copy back step 1's update only; in steps 3-4 the dev
    # evaluation at step 3 carries step 3's (its uploads left out, the copy-back is the training update's)
    assert [r["h2d_gb_per_step"] * tracking.GB for r in lines] == [linear, linear]
    assert [r["d2h_gb_per_step"] * tracking.GB for r in lines] == [linear / 2, linear]
