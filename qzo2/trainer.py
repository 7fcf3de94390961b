"""The training loop: zeroth-order steps, lr schedule, dev evaluation, metrics, checkpoints, resume.

One step (QZO or MeZO, spsa.py): seed_t = mix(seed, t); the batch is stacked 2k times; one forward inside
`dual_forward` gives the 2k chunk losses; d = (L+ − L−)/2ε per pair, clipped to [−C, C]; θ ← θ − lr·mean(d'·z).
Everything that varies with the step (batch, z, lr) is a pure function of (config, step), so resuming from a
checkpoint continues bit for bit. With method=mezo and offload (ZO2 mode) the update of streamed weights is deferred
to their next upload (engine.BlockStreamer.defer) and flushed before every checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from quant.checkpoint import atomic_dir

from . import data as D
from . import engine, spsa
from .config import PATH_KEYS, SYMBOLIC, TrainConfig, resolve_paths
from .model import is_quantized_dir, load_model, resolve_device, resolve_source


class TrainingError(ValueError):
    """A run that cannot start or go on (bad run dir, mismatched checkpoint, diverged); one line for the user."""


# ---- schedule ---------------------------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then constant / linear decay to 0 / cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


# ---- data and losses ----------------------------------------------------------------------------------------------
@dataclass
class Task:
    """What a run trains on: items, how to batch them, the per-chunk loss and the dev metric."""

    kind: str  # "classification" | "lm"
    train: list
    dev: list
    test: list


def read_data(cfg: TrainConfig) -> dict:
    """Everything about the data that can be checked without a tokenizer, read before the model loads (minutes at
    7B), so a bad file fails first: classification examples for a task, validated rows for text data."""
    if cfg.task == "sentiment":
        return D.sentiment_splits(cfg.seed, cfg.n_train, cfg.n_dev, cfg.n_test,
                                  template=D.SENTIMENT_TEMPLATES[cfg.template])
    if cfg.task:
        task = D.load_task_yaml(cfg.task)
        if not cfg.train_file:
            raise D.DataError(f"task {cfg.task} needs train_file=PATH with its examples")
        dev = D.load_task_examples(task, cfg.dev_file) if cfg.dev_file else []
        return dict(train=D.load_task_examples(task, cfg.train_file), dev=dev, test=[])
    return dict(train=D.read_text_rows(cfg.train_file), dev=D.read_text_rows(cfg.dev_file) if cfg.dev_file else [])


def build_task(cfg: TrainConfig, tokenizer, data: dict | None = None) -> Task:
    """read_data's output (read now when not given) tokenized where the task needs it."""
    data = read_data(cfg) if data is None else data
    if cfg.task:
        train, dev, test = data["train"], data["dev"], data["test"]
        if cfg.objective == "lm":  # LM on the gold answer: prompt + correct candidate as a prompt/completion row
            def as_lm(examples):
                rows = [{"prompt": e.prompt, "completion": e.candidates[e.label]} for e in examples]
                return [r for r in (D.tokenize_row(r, tokenizer, cfg.max_length) for r in rows) if r is not None]

            return Task("lm", as_lm(train), dev, test)  # dev stays classification: accuracy is what we select on
        return Task("classification", train, dev, test)
    train = D.tokenize_rows(data["train"], tokenizer, cfg.max_length, cfg.train_on_prompt, source=cfg.train_file)
    dev = (D.tokenize_rows(data["dev"], tokenizer, cfg.max_length, cfg.train_on_prompt, source=cfg.dev_file)
           if data["dev"] else [])
    return Task("lm", train, dev, [])


def _model_inputs(model, batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    device = model.get_input_embeddings().weight.device
    inputs = {k: batch[k].to(device) for k in keys if k in batch}
    inputs["use_cache"] = False  # no KV cache: a training forward never decodes
    return inputs


def classification_scores(model, batch: dict) -> torch.Tensor:
    """[rows/C, C] mean candidate log-probs; only the last n_last positions' logits are computed."""
    out = model(**_model_inputs(model, batch), logits_to_keep=batch["n_last"])
    return D.candidate_logprobs(out.logits.float(), batch)


def lm_chunk_losses(model, batch: dict, chunks: int, rows_per_head: int = 2) -> torch.Tensor:
    """Mean next-token cross-entropy of each of `chunks` equal row chunks. The decoder runs once; the LM head and the
    loss run on a few rows of every chunk at a time (so a perturbed head still sees all its chunks), and logits for
    the whole batch x vocab never exist at once."""
    hidden = model.get_decoder()(**_model_inputs(model, batch)).last_hidden_state
    head = model.get_output_embeddings()
    labels = batch["labels"][:, 1:].to(hidden.device)
    per = hidden.shape[0] // chunks
    hs = hidden.view(chunks, per, *hidden.shape[1:])  # [chunks, rows per chunk, T, H]: slices, no index tensors
    ls = labels.view(chunks, per, -1)
    sums = torch.zeros(chunks, per, dtype=torch.float64, device=hidden.device)
    for r in range(0, per, rows_per_head):
        e = min(r + rows_per_head, per)
        logits = head(hs[:, r:e, :-1].reshape(-1, hs.shape[2] - 1, hs.shape[3])).float()
        nll = F.cross_entropy(logits.transpose(1, 2), ls[:, r:e].reshape(-1, ls.shape[2]), ignore_index=D.IGNORE,
                              reduction="none")
        sums[:, r:e] = nll.sum(dim=1).double().view(chunks, e - r)
    counts = (ls != D.IGNORE).sum(dim=2).double()
    return sums.sum(1) / counts.sum(1).clamp(min=1)


def chunk_losses(model, task: Task, batch: dict, chunks: int) -> torch.Tensor:
    if task.kind == "lm":
        return lm_chunk_losses(model, batch, chunks)
    scores = classification_scores(model, batch)
    labels = batch["labels"]
    return torch.stack([D.classification_loss(s, labels[: s.shape[0]]).double() for s in scores.chunk(chunks)])


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode(task: Task, items: list, tokenizer, cfg: TrainConfig) -> dict:
    if task.kind == "lm":
        return D.collate_lm(items, pad_id(tokenizer))
    return D.encode_candidates(items, tokenizer, cfg.max_length)


@torch.no_grad()
def evaluate(model, task_kind: str, items: list, tokenizer, cfg: TrainConfig) -> dict:
    """Dev metrics: accuracy and mean candidate loss for classification; token loss and perplexity for text."""
    if not items:
        return {}
    if task_kind == "classification":
        correct, loss = 0, 0.0
        for i in range(0, len(items), cfg.eval_batch_size):
            batch = D.encode_candidates(items[i:i + cfg.eval_batch_size], tokenizer, cfg.max_length)
            scores = classification_scores(model, batch)
            correct += int((scores.argmax(-1).cpu() == batch["labels"]).sum())
            loss += float(D.classification_loss(scores, batch["labels"])) * len(batch["labels"])
        return {"accuracy": correct / len(items), "loss": loss / len(items)}
    total, count = 0.0, 0
    for i in range(0, len(items), cfg.eval_batch_size):
        batch = D.collate_lm(items[i:i + cfg.eval_batch_size], pad_id(tokenizer))
        n = int((batch["labels"][:, 1:] != D.IGNORE).sum())
        total += float(lm_chunk_losses(model, batch, 1)[0]) * n
        count += n
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50))}


def dev_metric(metrics: dict) -> float:
    """Higher is better: accuracy where there is one, else minus the loss."""
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]


# ---- run directory --------------------------------------------------------------------------------------------------
def is_run_dir(path) -> bool:
    """A `qzo2 train` output directory (config.yaml + checkpoints/), as opposed to a model directory."""
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "checkpoints").is_dir()


class RunDir:
    """run/config.yaml, run/metrics.jsonl, run/checkpoints/step-NNNNNN/{trained.safetensors,state.json}, run/best/."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpts = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"

    def steps(self) -> list[int]:
        if not self.ckpts.is_dir():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.ckpts.glob("step-*") if p.name.split("-")[1].isdigit())

    def checkpoint(self, which: str = "last") -> Path:
        """'last', 'best' or a step number -> the checkpoint directory."""
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


def save_checkpoint(run: RunDir, targets, state: dict, keep_last: int) -> Path:
    step = state["step"]
    dst = run.ckpts / f"step-{step:06d}"
    run.ckpts.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dst, overwrite=True) as tmp:
        save_file({t.path: t.tensor.detach().contiguous().cpu() for t in targets}, str(tmp / "trained.safetensors"),
                  metadata={"format": "pt"})
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


# ---- model ----------------------------------------------------------------------------------------------------------
def load_for_training(cfg: TrainConfig):
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    source = resolve_source(cfg.model)
    if cfg.model not in ("", "default") and not Path(source).exists():
        raise TrainingError(f"model {cfg.model} does not exist")
    quantized = is_quantized_dir(Path(source))
    if cfg.method == "qzo" and not quantized:
        raise TrainingError(f"method=qzo trains the scales of a quantized model; {source} is not one "
                            f"(run `qzo2 quantize {cfg.model if cfg.model != 'default' else ''} -o DIR` first)")
    if cfg.method == "mezo" and quantized:
        raise TrainingError(f"method=mezo trains full weights; {source} is quantized (use method=qzo)")
    model, tokenizer = load_model(source, dtype=dtype)
    model.eval()  # dropout off: every ZO forward is deterministic
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "qzo":
        targets = spsa.qzo_targets(model)
        set_cache_base(cfg.cache_base, [t.module for t in targets], resolve_device(cfg.device))
    else:
        targets = spsa.mezo_targets(model, tuple(k.strip() for k in cfg.mezo_params.split(",") if k.strip()))
    if cfg.trainable:  # indices stay those of the full list, so z does not depend on the filter
        targets = [t for t in targets if re.search(cfg.trainable, t.path)]
        if not targets:
            raise TrainingError(f"trainable={cfg.trainable!r} matches no trainable tensor")
    place_model(cfg, model, targets)
    return model, tokenizer, targets


def place_model(cfg: TrainConfig, model, targets=()) -> engine.BlockStreamer | None:
    """Move the model to its device, streaming the decoder blocks that offload/gpu_memory say do not fit
    (engine.py): their codes for qzo; for mezo their Linear weights, `targets` among them trained with deferred
    updates (ZO2 mode) -> the streamer, also kept as `model.qzo2_streamer`, or None when everything is resident."""
    device = resolve_device(cfg.device)
    kind = "codes" if cfg.method == "qzo" else "weights"
    streamed = engine.plan_for_model(model, engine.device_budget(cfg.gpu_memory, device), cfg.prefetch_depth,
                                     cfg.offload, kind)
    streamer = (engine.BlockStreamer(model, device, streamed, cfg.prefetch_depth, kind=kind, trained=targets)
                if streamed else None)
    if streamer is None:
        model.to(device)
        model.qzo2_streamer = None
    return streamer


def placement(model) -> dict:
    """Where the model runs, for the first metrics line: device and decoder blocks streamed."""
    streamer = getattr(model, "qzo2_streamer", None)
    out = {"device": str(model.get_input_embeddings().weight.device)}
    if streamer is not None:
        out.update(streamed_blocks=streamer.stats["streamed_blocks"], blocks=streamer.stats["blocks"],
                   prefetch_depth=streamer.depth)
    else:
        out.update(streamed_blocks=0)
    return out


def set_cache_base(mode: str, layers, device) -> None:
    """cache_base on/off/auto for QuantLinears computing on `device`: keep codes-minus-zeros unpacked (4 B/weight)
    so the CPU torch backend skips unpacking every forward; auto = when that takes less than a quarter of host RAM.
    Always off on a GPU, where the Triton kernel dequantizes on the fly."""
    import os

    need = sum(m.in_features * m.out_features * 4 for m in layers)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    on = torch.device(device).type == "cpu" and (mode == "on" or (mode == "auto" and need < ram / 4))
    for m in layers:
        m.cache_base = on


def apply_step_update(model, targets, seed: int, coeffs: list[float], weight_decay: float, lr: float,
                      floor: float | None) -> None:
    """spsa.apply_update, now for resident targets; for the tensors a streamer streams (ZO2 mode), deferred until
    their block is next on the device (engine.BlockStreamer.defer), so the step needs no second upload."""
    update = functools.partial(spsa.apply_update, seed=seed, coeffs=coeffs, weight_decay=weight_decay, lr=lr,
                               floor=floor)
    streamer = getattr(model, "qzo2_streamer", None)
    if streamer is None:
        return update(targets)
    update([t for t in targets if (id(t.module), t.name) not in streamer.streamed_keys])
    streamer.defer(update)


def flush(model) -> None:
    """Apply deferred updates, so every trained tensor (streamed ones: their host copies) is current."""
    streamer = getattr(model, "qzo2_streamer", None)
    if streamer is not None:
        streamer.flush()


def trained_count(targets) -> int:
    return sum(t.tensor.numel() for t in targets)


# ---- starting, resuming, replacing a run ---------------------------------------------------------------------------
# keys a resume may change: how long, how often, what is printed, where the model is placed (placement is tested
# bit-identical: offload on/off, any gpu_memory and prefetch_depth give the same trained tensors). Everything else
# changes what the run computes (data, dev set, schedule, z), so a run resumed with it would be two runs in one.
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "log_every", "keep_last", "progress", "overwrite",
                     "output_dir", "offload", "gpu_memory", "prefetch_depth")


def saved_config(run: RunDir) -> dict:
    """The config the run's last checkpoint was trained with (older runs: config.yaml), missing keys defaulted."""
    state = json.loads((run.checkpoint("last") / "state.json").read_text())
    old = state.get("config") or yaml.safe_load((run.path / "config.yaml").read_text()) or {}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {**defaults, **old}


def check_resume(run: RunDir, cfg: TrainConfig) -> None:
    """Refuse to resume with a config that differs from the checkpoint's outside RESUMABLE_CHANGES."""
    old = saved_config(run)
    new = cfg.to_dict()
    for key in PATH_KEYS:  # runs written before paths were stored resolved
        if old.get(key) and old[key] not in SYMBOLIC.get(key, ()):
            old[key] = os.path.abspath(os.path.expanduser(str(old[key])))
    changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if changed:
        diff = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise TrainingError(f"cannot resume {run.path}: the config differs from its checkpoint in {diff} (a resume "
                            f"may change only {', '.join(RESUMABLE_CHANGES[:6])} and the placement: "
                            f"{', '.join(RESUMABLE_CHANGES[8:])}); use another output_dir or overwrite=true")


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


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (SLURM, Kubernetes, torchrun) inside the loop: note the signal, let the step
    finish, then the trainer saves and returns; handlers are put back on exit. Off the main thread, nothing is
    installed (Python allows signal handlers only there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---- the loop -------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Train per `cfg` into cfg.output_dir (new, resumed, or replacing an old run with overwrite=true); returns
    {run, step, interrupted, signal, best_step, best_metric, skipped, trained}."""
    from tqdm.auto import tqdm

    given, cfg = cfg, resolve_paths(cfg)
    run, replace = open_run(cfg)  # output_dir checked and the resume validated before anything loads
    resuming = bool(run.steps()) and not replace
    data = read_data(cfg)  # data errors before the model (minutes at 7B)
    model, tokenizer, targets = load_for_training(cfg)
    where = placement(model)
    task = build_task(cfg, tokenizer, data)
    if not task.train:
        raise TrainingError("no training examples")
    if replace:  # the new run can start: only now does the old one go
        replace_run(run)
    run.path.mkdir(parents=True, exist_ok=True)
    write_config(run, cfg, given)

    state = {"step": 0, "skipped": 0, "consecutive_skips": 0, "clipped": 0, "best_step": None, "best_metric": None,
             "trained": trained_count(targets), "method": cfg.method}

    def save(state: dict) -> None:
        flush(model)
        save_checkpoint(run, targets, dict(state, config=cfg.to_dict()), cfg.keep_last)
        state["saved_step"] = state["step"]

    dev_kind = "classification" if cfg.task else "lm"  # tasks are selected by accuracy even when trained as LM

    def evaluate_dev(step: int) -> None:
        m = evaluate(model, dev_kind, task.dev, tokenizer, cfg)
        run.log({"step": step, **{f"dev_{k_}": v for k_, v in m.items()}})
        if step:
            bar.write(f"step {step}: " + ", ".join(f"dev {k_} {v:.4f}" for k_, v in m.items()))
        if state["best_metric"] is None or dev_metric(m) > state["best_metric"]:
            state.update(best_step=step, best_metric=dev_metric(m))
            save(state)
            _copy_best(run)

    k = cfg.n_pairs
    stop = StopSignals()
    bar = tqdm(total=cfg.steps, initial=0, desc=f"{cfg.method} train", disable=not cfg.progress)
    try:
        with stop:
            if resuming:
                state = load_trained(run.checkpoint("last"), targets)
                state.pop("config", None)
                run.truncate_metrics(state["step"])
                bar.update(state["step"])
            elif task.dev:
                evaluate_dev(0)
            window = {"loss": 0.0, "d": 0.0, "n": 0, "clipped": 0, "tokens": 0, "t0": time.perf_counter()}
            if where["streamed_blocks"]:
                bar.write(f"{where['device']}: streaming {where['streamed_blocks']} of {where['blocks']} decoder "
                          f"blocks (prefetch depth {where['prefetch_depth']})")
            while state["step"] < cfg.steps and stop.signum is None:
                step = state["step"]
                seed = spsa.step_seed(cfg.seed, step)
                batch = encode(task, D.batch_at(task.train, cfg.batch_size, cfg.seed, step), tokenizer, cfg)
                stacked = spsa.repeat_batch(batch, 2 * k)
                with torch.no_grad(), spsa.dual_forward(targets, seed, cfg.eps, k):
                    losses = chunk_losses(model, task, stacked, 2 * k)
                state["step"] = step + 1
                if torch.isfinite(losses).all():
                    state["consecutive_skips"] = 0
                    d = spsa.projected_gradients(losses, cfg.eps)
                    dc = d.clamp(-cfg.clip, cfg.clip) if cfg.clip else d
                    clipped = int((dc != d).sum())
                    state["clipped"] += clipped
                    lr = lr_at(cfg, step)
                    apply_step_update(model, targets, seed, [lr * float(x) / k for x in dc], cfg.weight_decay, lr,
                                      cfg.scale_floor if cfg.method == "qzo" else None)
                    window["loss"] += float(losses.mean())
                    window["d"] += float(d.abs().mean())
                    window["clipped"] += clipped
                    window["n"] += 1
                    window["tokens"] += int(batch["attention_mask"].sum())
                else:  # a non-finite loss never reaches the scales; the step's tail (log, eval, save) still runs
                    state["skipped"] += 1
                    state["consecutive_skips"] += 1
                    run.log({"step": step + 1, "skipped": True, "losses": [float(x) for x in losses]})
                    bar.write(f"step {step + 1}: non-finite loss, step skipped ({state['consecutive_skips']} in a row)")
                    if state["consecutive_skips"] >= cfg.max_skips:
                        raise TrainingError(f"{cfg.max_skips} consecutive non-finite losses at step {step + 1}; last "
                                            f"good checkpoint: {run.checkpoint('last') if run.steps() else 'none'}")
                bar.update()
                last = step + 1 == cfg.steps
                if window["n"] and ((step + 1) % cfg.log_every == 0 or last):
                    dt = time.perf_counter() - window["t0"]
                    rec = {"step": step + 1, "loss": window["loss"] / window["n"], "d": window["d"] / window["n"],
                           "clip_rate": window["clipped"] / (window["n"] * k), "lr": lr_at(cfg, step),
                           "tok_s": window["tokens"] / dt, "s_per_step": dt / window["n"], "skipped": state["skipped"]}
                    if where:  # the first training line of this process says where the model ran
                        rec.update(where)
                        where = None
                    run.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", d=f"{rec['d']:.3g}", clip=f"{rec['clip_rate']:.2f}",
                                    lr=f"{rec['lr']:.2g}", tok_s=f"{rec['tok_s']:.0f}")
                    window = {"loss": 0.0, "d": 0.0, "n": 0, "clipped": 0, "tokens": 0, "t0": time.perf_counter()}
                if task.dev and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
                    t_eval = time.perf_counter()
                    evaluate_dev(step + 1)
                    window["t0"] += time.perf_counter() - t_eval  # tokens/s counts training time only
                if ((step + 1) % cfg.save_every == 0 or last) and state.get("saved_step") != step + 1:
                    save(state)
            if stop.signum is not None and state.get("saved_step") != state["step"]:
                save(state)
    finally:
        bar.close()
    plot_metrics(run)
    return {"run": str(run.path), "step": state["step"], "interrupted": stop.signum is not None,
            "signal": stop.signum, "best_step": state["best_step"], "best_metric": state["best_metric"],
            "skipped": state["skipped"], "trained": state["trained"]}


def _copy_best(run: RunDir) -> None:
    src = run.checkpoint("last")
    with atomic_dir(run.path / "best", overwrite=True) as tmp:
        for f in src.iterdir():
            shutil.copy2(f, tmp / f.name)


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
