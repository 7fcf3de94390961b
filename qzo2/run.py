"""The run directory: config, checkpoints (trained tensors + method state), resume, best, metrics, plot.

  run/config.yaml                 the config (paths resolved; as typed in a comment)
  run/metrics.jsonl, metrics.png  one JSON line per log step / dev evaluation
  run/checkpoints/step-NNNNNN/    trained.safetensors (the trained tensors), method.safetensors (optimizer state,
                                  when the method has any), state.json (step, counters, the config trained with)
  run/best/                       the best checkpoint by dev metric (written before the step checkpoint that
                                  points at it, so best/ is never behind the pointer)
  run/tensorboard/, run/wandb/    with report_to=tensorboard / wandb: the same scalars (qzo2/tracking.py)
Every write is atomic and exclusive (a temporary file or directory made by mkstemp/mkdtemp, then a rename), and one
process writes a run at a time (qzo2/outputs.py: the lock). Each checkpoint's state.json records fingerprints of the
inputs (base model, data files, task); resume and export refuse inputs that changed under the same path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from quant.checkpoint import TOKENIZER_FILES, atomic_dir

from .config import (FIELDS, MEMORY, PATH_KEYS, ConfigError, TrainConfig, _coerce, is_symbolic, key_field, read_yaml,
                     renamed)
from .outputs import append_line, guard_output, remove_stale, write_file

CONFIG_HEAD = "# qzo2 train config"


class TrainingError(ValueError):
    """A run that cannot start or go on (bad run dir, mismatched checkpoint, diverged); one line for the user."""


_RUN_ENTRY = re.compile(
    r"(?:config\.yaml|metrics\.jsonl|metrics\.png"
    r"|(?:checkpoints/step-\d{6,}|best)/(?:trained\.safetensors|method\.safetensors|state\.json)"
    r"|(?:tensorboard|wandb)/.+"  # the trackers' own directories (report_to)
    r"|(?:checkpoints/)?\.(?:best|config\.yaml|metrics\.jsonl|metrics\.png|step-\d{6,})\.(?:tmp|old)-[a-z0-9_]{8}"
    r"(?:/.*)?)\Z")


def is_own_run_entry(name: str) -> bool:
    """Whether `name` (a path relative to a run directory, from outputs._tree) is one qzo2 train writes there."""
    return bool(_RUN_ENTRY.match(name))


def is_run_dir(path) -> bool:
    """A `qzo2 train` output directory (its config.yaml, with checkpoints/ or qzo2's header line: a run that died
    before its first checkpoint is one too), as opposed to a model directory."""
    config = Path(path) / "config.yaml"
    if not config.is_file():
        return False
    if (Path(path) / "checkpoints").is_dir():
        return True
    try:
        with open(config, encoding="utf-8") as f:
            return f.readline().startswith(CONFIG_HEAD)
    except (OSError, UnicodeDecodeError):
        return False


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpts = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"

    def steps(self) -> list[int]:
        if not self.ckpts.is_dir():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.ckpts.glob("step-*") if p.name.split("-")[1].isdigit())

    def checkpoint(self, which: str = "last") -> Path:
        """'last', 'best', 'auto' (best when the run evaluated, else last) or a step number -> the checkpoint
        directory."""
        if which == "auto":
            which = "best" if (self.path / "best").is_dir() else "last"
        if which == "best":
            if not (self.path / "best").is_dir():
                raise TrainingError(f"{self.path} has no best checkpoint (no dev evaluation ran); use --checkpoint "
                                    f"last or a step")
            return self.path / "best"
        which = str(which)
        if which != "last" and not which.isdigit():
            raise TrainingError(f"checkpoint must be best, last or a step number (got {which!r})")
        steps = self.steps()
        if not steps:
            raise TrainingError(f"{self.path} has no checkpoints")
        step = steps[-1] if which == "last" else int(which)
        if step not in steps:
            raise TrainingError(f"{self.path} has no checkpoint at step {step} (have {steps})")
        return self.ckpts / f"step-{step:06d}"

    def log(self, record: dict) -> None:
        append_line(self.metrics, json.dumps(record))

    def read_metrics(self) -> list[dict]:
        if self.metrics.is_symlink():
            raise TrainingError(f"{self.metrics} is a symbolic link; qzo2 never writes through one: remove it")
        if not self.metrics.exists():
            return []
        records = []
        for n, line in enumerate(self.metrics.read_text(encoding="utf-8").splitlines(), 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except ValueError as e:
                raise TrainingError(f"{self.metrics} line {n} is corrupt ({e}); remove that line") from None
        return records

    def truncate_metrics(self, step: int) -> None:
        """After resuming from `step`, drop records a crashed run wrote past it (they will be written again);
        step -1 drops every record (a run restarted from scratch)."""
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        write_file(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def remove_stale(self) -> None:
        """Temporaries a killed writer of this run left (the run's lock is held): half-written checkpoints,
        best/, config.yaml, metrics."""
        remove_stale(self.ckpts, r"step-\d{6,}")
        remove_stale(self.path, r"(?:best|config\.yaml|metrics\.jsonl|metrics\.png)")
        remove_stale(self.path.parent, re.escape(self.path.name))  # a replaced run's remains (replace_run)


def write_checkpoint(dst: Path, targets, method_state: dict, state: dict) -> Path:
    """dst/ (a step checkpoint or best/), replaced atomically: the trained tensors, the method's state tensors
    and state.json."""
    with atomic_dir(dst, overwrite=True) as tmp:
        save_file({t.path: t.tensor.detach().contiguous().cpu() for t in targets}, str(tmp / "trained.safetensors"),
                  metadata={"format": "pt"})
        if method_state:
            save_file({k: v.detach().contiguous().cpu() for k, v in method_state.items()},
                      str(tmp / "method.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    return dst


def _write_run_checkpoint(run: RunDir, dst: Path, targets, method_state: dict, state: dict) -> None:
    """write_checkpoint; a failed write (disk full, read-only) is one TrainingError line that names the checkpoint
    left intact."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(dst, targets, method_state, state)
    except OSError as e:
        last = run.checkpoint("last") if run.steps() else None
        raise TrainingError(f"writing {dst} failed ({e.strerror or e}); "
                            + (f"the last complete checkpoint {last} is intact" if last else "no checkpoint exists yet")
                            ) from e


def save_checkpoint(run: RunDir, targets, method_state: dict, state: dict, keep_last: int) -> Path:
    """checkpoints/step-N/; older checkpoints beyond keep_last are deleted."""
    dst = run.ckpts / f"step-{state['step']:06d}"
    _write_run_checkpoint(run, dst, targets, method_state, state)
    for old in run.steps()[:-keep_last or None] if keep_last else []:  # renamed first: never half a checkpoint
        trash = Path(tempfile.mkdtemp(prefix=f".step-{old:06d}.old-", dir=run.ckpts))
        os.replace(run.ckpts / f"step-{old:06d}", trash / "x")
        shutil.rmtree(trash, ignore_errors=True)
    return dst


def save_best(run: RunDir, targets, method_state: dict, state: dict) -> Path:
    """best/: the checkpoint of the best dev metric so far."""
    _write_run_checkpoint(run, run.path / "best", targets, method_state, state)
    return run.path / "best"


def read_state(path: Path) -> dict:
    """A checkpoint's state.json; a missing or corrupt one is one TrainingError line naming it."""
    f = Path(path) / "state.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {path} has no state.json (an incomplete checkpoint: use another "
                            f"--checkpoint or step)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise TrainingError(f"{f} is corrupt ({str(e).splitlines()[0]}); use another checkpoint (--checkpoint "
                            f"STEP) or restore the file") from None


def read_tensors(f: Path, what: str = "checkpoint file") -> dict:
    """A safetensors file of a run; a truncated or corrupt one is one TrainingError line naming it."""
    if not f.is_file():
        raise TrainingError(f"{what} {f} is missing; use another checkpoint (--checkpoint STEP)")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise TrainingError(f"{what} {f} cannot be read ({str(e).splitlines()[0]}): truncated or corrupt? Use "
                            f"another checkpoint (--checkpoint STEP)") from None


def read_trained(path: Path) -> dict:
    """A checkpoint's trained tensors, checked finite (NaN/inf in what is trained is refused, naming the file)."""
    f = Path(path) / "trained.safetensors"
    tensors = read_tensors(f)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TrainingError(f"{f}: trained tensor {name} holds NaN/inf; use a checkpoint from before the "
                                f"divergence (--checkpoint STEP)")
    return tensors


def load_trained(path: Path, targets) -> dict:
    """Copy a checkpoint's trained tensors into the targets (names and shapes must match); return its state."""
    tensors = read_trained(path)
    names = {t.path for t in targets}
    if set(tensors) != names:
        missing = sorted(names - set(tensors))[:1] or sorted(set(tensors) - names)[:1]
        raise TrainingError(f"checkpoint {path} does not match this model/method (first mismatch: {missing[0]})")
    for t in targets:
        if tuple(tensors[t.path].shape) != tuple(t.tensor.shape):
            raise TrainingError(f"{path / 'trained.safetensors'}: {t.path} has shape {tuple(tensors[t.path].shape)}, "
                                f"the model's is {tuple(t.tensor.shape)} (was the base model re-quantized?)")
    state = read_state(path)
    with torch.no_grad():
        for t in targets:
            t.tensor.copy_(tensors[t.path].to(t.tensor.dtype))
    return state


def load_method_state(path: Path) -> dict:
    """A checkpoint's method state tensors ({} when the method keeps none)."""
    f = path / "method.safetensors"
    return read_tensors(f, "method state") if f.exists() else {}


def check_finite(targets, source: str) -> None:
    """Refuse a model whose trained tensors hold NaN/inf (an edited or diverged base): every step would be
    skipped."""
    for t in targets:
        if t.tensor.is_floating_point() and not torch.isfinite(t.tensor).all():
            raise TrainingError(f"model {source}: {t.path} holds NaN/inf values; it cannot be trained or "
                                f"evaluated (re-quantize or restore it)")


# ---- fingerprints of the inputs ------------------------------------------------------------------------------------
MODEL_FILES = ("config.json", "quantize_config.json", "model.safetensors.index.json") + TOKENIZER_FILES


def fingerprint(path) -> str | None:
    """sha256 over what defines an input: a file's bytes; for a directory its model files (config, weights,
    tokenizer) or, for a data directory, every file, with their relative names. None for a path that is not there
    (a dataset name, built-in data)."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        model = [f for f in files if f.parent == p and (f.name in MODEL_FILES or f.suffix == ".safetensors")]
        files = model or files
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p) if f != p else f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def input_fingerprints(cfg: TrainConfig) -> dict:
    """{key: fingerprint} of the run's inputs on disk: model, train_file, dev_file, task (a task .yaml)."""
    from .model import resolve_source

    out = {}
    for key in ("model", "train_file", "dev_file", "task"):
        value = getattr(cfg, key)
        if key == "model":
            value = resolve_source(value)
        elif not value or value.startswith(MEMORY) or is_symbolic(key, value):
            continue
        fp = fingerprint(value)
        if fp:
            out[key] = fp
    return out


def check_inputs(recorded: dict | None, current: dict, where: Path, keys=("model", "train_file", "dev_file", "task"),
                 cfg: TrainConfig | None = None) -> None:
    """Refuse to go on from a checkpoint whose recorded input fingerprints differ from the inputs now (a base
    re-quantized in place, a rewritten data file). Checkpoints written before fingerprints were kept pass."""
    for key in keys:
        old, new = (recorded or {}).get(key), current.get(key)
        if old and old != new:
            path = getattr(cfg, key) if cfg is not None else key
            raise TrainingError(f"{key} {path} changed since {where} was trained from it (its content fingerprint "
                                f"differs): restore the original, or train a new run (another output_dir or "
                                f"overwrite=true)")


# ---- starting, resuming, replacing a run ---------------------------------------------------------------------------
# keys a resume may change: how long, how often, what is printed, where the model is placed (placement is tested
# bit-identical: offload on/off, any gpu_memory and prefetch_depth give the same trained tensors). Everything else
# changes what the run computes (data, dev set, schedule, z), so a run resumed with it would be two runs in one.
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "log_every", "keep_last", "progress", "report_to",
                     "overwrite", "output_dir", "offload", "gpu_memory", "prefetch_depth")


def saved_config(run: RunDir) -> dict:
    """The config the run's last checkpoint was trained with (older runs, or a run with no checkpoint yet:
    config.yaml), missing keys defaulted."""
    state = read_state(run.checkpoint("last")) if run.steps() else {}
    old = renamed(state.get("config") or _config_yaml(run) or {})
    try:  # the defaults of its method's keys too (older runs store every method's keys: those are left out)
        defaults = TrainConfig(method=old.get("method", FIELDS["method"].default)).to_dict()
    except ConfigError:
        defaults = {k: f.default for k, f in FIELDS.items()}
    own = set(defaults)
    return {**defaults, **{k: v for k, v in old.items() if k in own}}


def _config_yaml(run: RunDir) -> dict:
    """run/config.yaml as written, each value typed by its key (keys this version no longer has are left out)."""
    try:
        data = read_yaml(run.path / "config.yaml", "run config") or {}
        return {k: _coerce(k, v) for k, v in renamed({str(k): v for k, v in data.items()}).items()
                if key_field(k) is not None}
    except ConfigError as e:
        raise TrainingError(str(e)) from None


def check_resume(run: RunDir, cfg: TrainConfig) -> None:
    """Refuse to resume (or restart a run that has no checkpoint yet) with a config that differs from the one it
    was started with outside RESUMABLE_CHANGES."""
    old = saved_config(run)
    new = cfg.to_dict()
    for key in PATH_KEYS:  # runs written before paths were stored resolved
        if old.get(key) and not is_symbolic(key, old[key]):
            old[key] = os.path.abspath(os.path.expanduser(str(old[key])))
    changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if changed:
        diff = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise TrainingError(f"cannot resume {run.path}: the config differs from its checkpoint in {diff} (a resume "
                            f"may change only {', '.join(RESUMABLE_CHANGES[:7])} and the placement: "
                            f"{', '.join(RESUMABLE_CHANGES[9:])}); use another output_dir or overwrite=true")


def guard_run(run: RunDir, cfg: TrainConfig) -> None:
    """outputs.guard_output for a run directory: never the cwd / home / root, and (to be replaced) only a run that
    holds none of this run's inputs and nothing but a run's own files. open_run calls it first, and the trainer
    again just before it replaces the old run (minutes later, with the run's lock held)."""
    inputs = [cfg.model, cfg.train_file, cfg.dev_file, cfg.task]
    inputs = [v for k, v in zip(("model", "train_file", "dev_file", "task"), inputs)
              if v and not v.startswith(MEMORY) and not is_symbolic(k, v)]
    try:
        guard_output(run.path, inputs, kind="run", replace=cfg.overwrite)
    except ValueError as e:
        raise TrainingError(str(e).replace("output ", "output_dir ", 1)) from None


def open_run(cfg: TrainConfig) -> tuple[RunDir, bool]:
    """Decide, before anything is loaded, what output_dir means: (run, replace) where replace says an old run is
    to be replaced once the new one can start. Resuming is run.steps() non-empty and replace False; a run that
    died before its first checkpoint starts again from step 0 with the same config."""
    run = RunDir(cfg.output_dir)
    guard_run(run, cfg)
    if not run.path.exists() or not any(run.path.iterdir()):
        return run, False
    if cfg.overwrite:
        return run, True
    if run.metrics.is_symlink():  # refused before config.yaml is rewritten: nothing of the run changes
        raise TrainingError(f"{run.metrics} is a symbolic link; qzo2 never writes through one: remove it")
    if not is_run_dir(run.path):
        raise TrainingError(f"output_dir {run.path} exists and is not a qzo2 run directory; choose another "
                            f"output_dir")
    check_resume(run, cfg)
    return run, False


def write_config(run: RunDir, cfg: TrainConfig, given: TrainConfig) -> None:
    """run/config.yaml: the config with resolved paths; a comment keeps the paths as they were typed."""
    typed = {k: getattr(given, k) for k in PATH_KEYS if getattr(given, k) != getattr(cfg, k)}
    head = f"{CONFIG_HEAD} (paths resolved)"
    if typed:
        head += f"; as given in {os.getcwd()}: " + ", ".join(f"{k}={v!r}" for k, v in typed.items())
    write_file(run.path / "config.yaml", head.replace("\n", " ") + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def replace_run(run: RunDir) -> None:
    """Move the old run aside in one rename and delete it; the new one starts in its place."""
    trash = Path(tempfile.mkdtemp(prefix=f".{run.path.name}.old-", dir=run.path.parent))
    os.replace(run.path, trash / "run")
    shutil.rmtree(trash, ignore_errors=True)


def plot_metrics(run: RunDir) -> Path | None:
    """run/metrics.png: training loss and the dev metric against the step."""
    records = run.read_metrics()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "dev_loss" not in r and not r.get("skipped")]
    dev_key = "dev_accuracy" if any("dev_accuracy" in r for r in records) else "dev_loss"
    dev = [(r["step"], r[dev_key]) for r in records if dev_key in r]
    if not train and not dev:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    if dev:
        ax2 = ax.twinx()
        ax2.plot(*zip(*dev), "o-", label=dev_key.replace("_", " "), color="tab:orange")
        ax2.set_ylabel(dev_key.replace("_", " "))
    ax.set_title(run.path.name)
    fig.tight_layout()
    out = run.path / "metrics.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_file(out, buf.getvalue())
    return out
