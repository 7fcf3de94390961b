"""Where a run's metrics go: metrics.jsonl always (the run's own record: resume truncates it, the plot reads it), and
with report_to=tensorboard / wandb the same records through those libraries themselves (pip install 'qzo2[track]').

  report_to=jsonl,tensorboard   RUN/tensorboard/   torch.utils.tensorboard.SummaryWriter; a resumed run writes a
                                                   new event file with purge_step = the resumed step + 1, so the
                                                   steps a crashed run logged past its checkpoint are dropped
  report_to=jsonl,wandb         RUN/wandb/         wandb.init(mode=$WANDB_MODE or "offline", dir=RUN, resume=allow)
                                                   with an id kept in RUN/wandb/qzo2-run-id: a resume continues the
                                                   same wandb run (`wandb sync RUN/wandb/offline-run-*` uploads)

Every numeric value of a metrics.jsonl record (bools and strings left out) is logged at the record's step as
`<group>/<key>`, the key exactly as in metrics.jsonl: train/loss, train/tok_s, train/peak_mem_gb (the log-window
lines), dev/dev_loss, dev/dev_accuracy (dev evaluations), skipped/loss_scale (the line of a skipped step).

Also here: the memory and traffic figures of a training line (GiB, as `qzo2 bench`): peak_mem_gb (torch's peak on a
GPU, the process's peak RSS on the CPU), host_peak_gb (GPU runs: the host's peak RSS), and when blocks are streamed
the BlockStreamer's host->device / device->host bytes per step (h2d_gb_per_step, d2h_gb_per_step).
Only rank 0 opens a tracker (the trainer's rank-0-only writes).
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import string
import sys

from .config import REPORT_TO
from .run import RunDir, TrainingError
from .outputs import write_file

GB = 1 << 30  # every *_gb figure is in GiB (2^30 bytes), as torch.cuda.max_memory_allocated() / 1024**3 is
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to name -> the package it imports


# ---- memory and host<->device traffic (training log lines, `qzo2 bench`) --------------------------------------------
def host_rss_gb() -> float:
    """Current resident set size of this process (VmRSS), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GB
    return float("nan")


def host_peak_rss_gb() -> float:
    """Peak resident set size of this process since it started (getrusage ru_maxrss: KiB on Linux, bytes on
    macOS), GiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GB if sys.platform == "darwin" else peak * 1024 / GB


def memory_scalars(device) -> dict:
    """peak_mem_gb: on a GPU torch.cuda.max_memory_allocated (what torch allocated at most, since the process
    started), with the host's peak RSS beside it as host_peak_gb (streamed blocks live there); on the CPU the
    process's peak RSS."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / GB, "host_peak_gb": host_peak_rss_gb()}
    return {"peak_mem_gb": host_peak_rss_gb()}


def streamed_bytes(model) -> tuple[int, int] | None:
    """(host->device, device->host) bytes the model's BlockStreamer has moved so far; None when nothing streams."""
    streamer = getattr(model, "qzo2_streamer", None)
    if streamer is None:
        return None
    return streamer.stats["h2d_bytes"], streamer.stats["d2h_bytes"]


# ---- backends --------------------------------------------------------------------------------------------------------
def backends(report_to: str) -> list[str]:
    """The report_to names besides jsonl (always written), in order, each once."""
    names = [n.strip().lower() for n in report_to.split(",") if n.strip()]
    bad = [n for n in names if n not in REPORT_TO]
    if bad:  # TrainConfig refuses these already
        raise TrainingError(f"report_to: unknown {', '.join(map(repr, bad))}; a comma list of {', '.join(REPORT_TO)}")
    return list(dict.fromkeys(n for n in names if n != "jsonl"))


def require(report_to: str) -> None:
    """Fail in one line, before anything loads, when a report_to backend's package is not installed."""
    for name in backends(report_to):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise TrainingError(f"report_to={name} needs the {PACKAGES[name]} package: pip install 'qzo2[track]'")


def scalars(record: dict) -> dict:
    """A metrics.jsonl record -> {"<group>/<key>": float} of its numeric values (step is the x axis, not a value)."""
    if record.get("skipped") is True:
        group = "skipped"
    elif any(k.startswith("dev_") for k in record):
        group = "dev"
    else:
        group = "train"
    return {f"{group}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, run: RunDir, cfg, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run hides what the crashed one logged past the checkpoint (metrics.jsonl is truncated alike)
        self.writer = SummaryWriter(log_dir=str(run.path / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, values: dict, step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class Wandb:
    ID_FILE = "wandb/qzo2-run-id"  # under the run directory: the wandb run id a resume continues

    def __init__(self, run: RunDir, cfg, resume_step: int | None):
        import wandb

        id_file = run.path / self.ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = os.environ.get("WANDB_RUN_ID") or "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                             for _ in range(8))  # as wandb's own ids
            id_file.parent.mkdir(parents=True, exist_ok=True)
            write_file(id_file, run_id + "\n")
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(run.path),
                              project=os.environ.get("WANDB_PROJECT") or "qzo2", name=run.path.name, id=run_id,
                              resume="allow")
        self.run.config.update(cfg.to_dict(), allow_val_change=True)  # a resume may change steps, report_to, ...

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BACKENDS = {"tensorboard": TensorBoard, "wandb": Wandb}


class Tracker:
    """metrics.jsonl plus the report_to backends of a run (rank 0 only). `resume_step`: the checkpoint step a
    resumed run continues from, None for a new run."""

    def __init__(self, run: RunDir, cfg, resume_step: int | None = None):
        self.run, self.open = run, []
        try:
            for name in backends(cfg.report_to):
                self.open.append(BACKENDS[name](run, cfg, resume_step))
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, record: dict) -> None:
        self.run.log(record)
        values = scalars(record)
        if values:
            for backend in self.open:
                backend.log(values, int(record["step"]))

    def close(self, failed: bool = False) -> None:
        """Flush and close every backend; `failed`: the run ended by an exception (a wandb run is marked so)."""
        while self.open:
            self.open.pop().close(failed)
