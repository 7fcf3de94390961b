"""The run directory: config, checkpoints (trained tensors + method state), resume, best, metrics, plot.

  run/config.yaml                 the config (paths resolved; as typed in a comment)
  run/metrics.jsonl, metrics.png  one JSON line per log step / dev evaluation
  run/checkpoints/step-NNNNNN/    trained.safetensors (the trained tensors), method.safetensors (optimizer state,
                                  when the method has any), state.json (step, counters, the config trained with)
  run/best/                       a copy of the best checkpoint by dev metric
  run/tensorboard/, run/wandb/    with report_to=tensorboard / wandb: the same scalars (qzo2/tracking.py)
Every write is atomic (temporary file or directory, then a rename).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from quant.checkpoint import atomic_dir

from .config import PATH_KEYS, TrainConfig, is_symbolic, renamed


class TrainingError(ValueError):
    """A run that cannot start or go on (bad run dir, mismatched checkpoint, diverged); one line for the user."""


def is_run_dir(path) -> bool:
    """A `qzo2 train` output directory (config.yaml + checkpoints/), as opposed to a model directory."""
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "checkpoints").is_dir()


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
                raise TrainingError(f"{self.path} has no best checkpoint (no dev evaluation ran)")
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
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        """After resuming from `step`, drop records a crashed run wrote past it (they will be written again)."""
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        tmp = self.metrics.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.metrics)

    def copy_best(self) -> None:
        """best/ <- the last checkpoint."""
        src = self.checkpoint("last")
        with atomic_dir(self.path / "best", overwrite=True) as tmp:
            for f in src.iterdir():
                shutil.copy2(f, tmp / f.name)


def save_checkpoint(run: RunDir, targets, method_state: dict, state: dict, keep_last: int) -> Path:
    """checkpoints/step-N/ with the trained tensors, the method's state tensors and state.json; older checkpoints
    beyond keep_last are deleted."""
    step = state["step"]
    dst = run.ckpts / f"step-{step:06d}"
    run.ckpts.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dst, overwrite=True) as tmp:
        save_file({t.path: t.tensor.detach().contiguous().cpu() for t in targets}, str(tmp / "trained.safetensors"),
                  metadata={"format": "pt"})
        if method_state:
            save_file({k: v.detach().contiguous().cpu() for k, v in method_state.items()},
                      str(tmp / "method.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for old in run.steps()[:-keep_last or None] if keep_last else []:
        shutil.rmtree(run.ckpts / f"step-{old:06d}", ignore_errors=True)
    return dst


def load_trained(path: Path, targets) -> dict:
    """Copy a checkpoint's trained tensors into the targets (names must match); return its state."""
    tensors = load_file(str(path / "trained.safetensors"))
    names = {t.path for t in targets}
    if set(tensors) != names:
        missing = sorted(names - set(tensors))[:1] or sorted(set(tensors) - names)[:1]
        raise TrainingError(f"checkpoint {path} does not match this model/method (first mismatch: {missing[0]})")
    with torch.no_grad():
        for t in targets:
            t.tensor.copy_(tensors[t.path].to(t.tensor.dtype))
    return json.loads((path / "state.json").read_text())


def load_method_state(path: Path) -> dict:
    """A checkpoint's method state tensors ({} when the method keeps none)."""
    f = path / "method.safetensors"
    return load_file(str(f)) if f.exists() else {}


# ---- starting, resuming, replacing a run ---------------------------------------------------------------------------
# keys a resume may change: how long, how often, what is printed, where the model is placed (placement is tested
# bit-identical: offload on/off, any gpu_memory and prefetch_depth give the same trained tensors). Everything else
# changes what the run computes (data, dev set, schedule, z), so a run resumed with it would be two runs in one.
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "log_every", "keep_last", "progress", "report_to",
                     "overwrite", "output_dir", "offload", "gpu_memory", "prefetch_depth")


def saved_config(run: RunDir) -> dict:
    """The config the run's last checkpoint was trained with (older runs: config.yaml), missing keys defaulted."""
    state = json.loads((run.checkpoint("last") / "state.json").read_text())
    old = state.get("config") or yaml.safe_load((run.path / "config.yaml").read_text()) or {}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {**defaults, **renamed(old)}


def check_resume(run: RunDir, cfg: TrainConfig) -> None:
    """Refuse to resume with a config that differs from the checkpoint's outside RESUMABLE_CHANGES."""
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


def open_run(cfg: TrainConfig) -> tuple[RunDir, bool]:
    """Decide, before anything is loaded, what output_dir means: (run, replace) where replace says an old run is
    to be replaced once the new one can start. Resuming is run.steps() non-empty and replace False."""
    run = RunDir(cfg.output_dir)
    if run.path.exists() and not run.path.is_dir():
        raise TrainingError(f"output_dir {run.path} is a file, not a directory")
    if not run.path.exists() or not any(run.path.iterdir()):
        return run, False
    if cfg.overwrite:
        if not is_run_dir(run.path):
            raise TrainingError(f"output_dir {run.path} is not a qzo2 run directory (no config.yaml and checkpoints/)"
                                f"; overwrite=true replaces only a run, so choose another output_dir")
        return run, True
    if not run.steps():
        raise TrainingError(f"{run.path} exists and holds no checkpoint to resume (set overwrite=true)")
    check_resume(run, cfg)
    return run, False


def write_config(run: RunDir, cfg: TrainConfig, given: TrainConfig) -> None:
    """run/config.yaml: the config with resolved paths; a comment keeps the paths as they were typed."""
    typed = {k: getattr(given, k) for k in PATH_KEYS if getattr(given, k) != getattr(cfg, k)}
    head = "# qzo2 train config (paths resolved)"
    if typed:
        head += f"; as given in {os.getcwd()}: " + ", ".join(f"{k}={v!r}" for k, v in typed.items())
    text = head.replace("\n", " ") + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    tmp = run.path / ".config.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(run.path / "config.yaml")


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
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
