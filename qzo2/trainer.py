"""The training loop: zeroth-order steps, lr schedule, dev evaluation, metrics, checkpoints, resume.

One step (QZO or MeZO, spsa.py): seed_t = mix(seed, t); the batch is stacked 2k times; one forward inside
`dual_forward` gives the 2k chunk losses; d = (L+ − L−)/2ε per pair, clipped to [−C, C]; θ ← θ − lr·mean(d'·z).
Everything that varies with the step (batch, z, lr) is a pure function of (config, step), so resuming from a
checkpoint continues bit for bit. With method=mezo and offload (ZO2 mode) the update of streamed weights is deferred
to their next upload (engine.BlockStreamer.defer) and flushed before every checkpoint.
"""
from __future__ import annotations

import functools
import json
import math
import re
import shutil
import signal
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
from .config import TrainConfig
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


def build_task(cfg: TrainConfig, tokenizer) -> Task:
    if cfg.task:
        if cfg.task == "sentiment":
            splits = D.sentiment_splits(cfg.seed, cfg.n_train, cfg.n_dev, cfg.n_test)
            train, dev, test = splits["train"], splits["dev"], splits["test"]
        else:
            task = D.load_task_yaml(cfg.task)
            if not cfg.train_file:
                raise D.DataError(f"task {cfg.task} needs train_file=PATH with its examples")
            train = D.load_task_examples(task, cfg.train_file)
            dev = D.load_task_examples(task, cfg.dev_file) if cfg.dev_file else []
            test = []
        if cfg.objective == "lm":  # LM on the gold answer: prompt + correct candidate as a prompt/completion row
            def as_lm(examples):
                rows = [{"prompt": e.prompt, "completion": e.candidates[e.label]} for e in examples]
                return [r for r in (D.tokenize_row(r, tokenizer, cfg.max_length) for r in rows) if r is not None]

            return Task("lm", as_lm(train), dev, test)  # dev stays classification: accuracy is what we select on
        return Task("classification", train, dev, test)
    train = D.load_text_dataset(cfg.train_file, tokenizer, cfg.max_length, cfg.train_on_prompt)
    dev = D.load_text_dataset(cfg.dev_file, tokenizer, cfg.max_length, cfg.train_on_prompt) if cfg.dev_file else []
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


# ---- the loop -------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    from tqdm.auto import tqdm

    run = RunDir(cfg.output_dir)
    if cfg.overwrite and run.path.exists():
        shutil.rmtree(run.path)
    resumed_from = run.steps()[-1] if run.steps() else None
    if resumed_from is None and run.path.exists() and any(run.path.iterdir()):
        raise TrainingError(f"{run.path} exists and holds no checkpoint to resume (set overwrite=true)")
    if resumed_from is not None:
        old = yaml.safe_load((run.path / "config.yaml").read_text())
        changed = [k for k in ("method", "model", "task", "train_file", "seed", "batch_size", "n_pairs", "eps")
                   if old.get(k) != getattr(cfg, k)]
        if changed:
            raise TrainingError(f"{run.path} was trained with a different {changed[0]}; "
                                f"use another output_dir or overwrite=true")
    model, tokenizer, targets = load_for_training(cfg)
    where = placement(model)
    task = build_task(cfg, tokenizer)
    if not task.train:
        raise TrainingError("no training examples")
    run.path.mkdir(parents=True, exist_ok=True)
    (run.path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    state = {"step": 0, "skipped": 0, "consecutive_skips": 0, "clipped": 0, "best_step": None, "best_metric": None,
             "trained": trained_count(targets), "method": cfg.method}

    def save(state: dict) -> None:
        flush(model)
        save_checkpoint(run, targets, state, cfg.keep_last)

    dev_kind = "classification" if cfg.task else "lm"  # tasks are selected by accuracy even when trained as LM
    if resumed_from is not None:
        state = load_trained(run.checkpoint("last"), targets)
        run.truncate_metrics(state["step"])
    elif task.dev:
        first = evaluate(model, dev_kind, task.dev, tokenizer, cfg)
        run.log({"step": 0, **{f"dev_{k}": v for k, v in first.items()}})
        state.update(best_step=0, best_metric=dev_metric(first))
        save(state)
        _copy_best(run)
    k = cfg.n_pairs
    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"{cfg.method} train", disable=not cfg.progress)
    window = {"loss": 0.0, "d": 0.0, "n": 0, "clipped": 0, "tokens": 0, "t0": time.perf_counter()}
    if where["streamed_blocks"]:
        bar.write(f"{where['device']}: streaming {where['streamed_blocks']} of {where['blocks']} decoder blocks "
                  f"(prefetch depth {where['prefetch_depth']})")
    try:
        while state["step"] < cfg.steps and not interrupted:
            step = state["step"]
            seed = spsa.step_seed(cfg.seed, step)
            batch = encode(task, D.batch_at(task.train, cfg.batch_size, cfg.seed, step), tokenizer, cfg)
            stacked = spsa.repeat_batch(batch, 2 * k)
            with torch.no_grad(), spsa.dual_forward(targets, seed, cfg.eps, k):
                losses = chunk_losses(model, task, stacked, 2 * k)
            state["step"] = step + 1
            if not torch.isfinite(losses).all():
                state["skipped"] += 1
                state["consecutive_skips"] += 1
                run.log({"step": step + 1, "skipped": True, "losses": [float(x) for x in losses]})
                bar.write(f"step {step + 1}: non-finite loss, step skipped ({state['consecutive_skips']} in a row)")
                if state["consecutive_skips"] >= cfg.max_skips:
                    raise TrainingError(f"{cfg.max_skips} consecutive non-finite losses at step {step + 1}; "
                                        f"last good checkpoint: {run.checkpoint('last') if run.steps() else 'none'}")
                bar.update()
                continue
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
            bar.update()
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                dt = time.perf_counter() - window["t0"]
                rec = {"step": step + 1, "loss": window["loss"] / window["n"], "d": window["d"] / window["n"],
                       "clip_rate": window["clipped"] / (window["n"] * k), "lr": lr,
                       "tok_s": window["tokens"] / dt, "s_per_step": dt / window["n"], "skipped": state["skipped"]}
                if where:  # the first training line of this process says where the model ran
                    rec.update(where)
                    where = None
                run.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", d=f"{rec['d']:.3g}", clip=f"{rec['clip_rate']:.2f}",
                                lr=f"{lr:.2g}", tok_s=f"{rec['tok_s']:.0f}")
                window = {"loss": 0.0, "d": 0.0, "n": 0, "clipped": 0, "tokens": 0, "t0": time.perf_counter()}
            evaluate_now = task.dev and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps)
            if evaluate_now:
                t_eval = time.perf_counter()
                m = evaluate(model, dev_kind, task.dev, tokenizer, cfg)
                window["t0"] += time.perf_counter() - t_eval  # tokens/s counts training time only
                run.log({"step": step + 1, **{f"dev_{k_}": v for k_, v in m.items()}})
                bar.write(f"step {step + 1}: " + ", ".join(f"dev {k_} {v:.4f}" for k_, v in m.items()))
                if state["best_metric"] is None or dev_metric(m) > state["best_metric"]:
                    state.update(best_step=step + 1, best_metric=dev_metric(m))
                    save(state)
                    _copy_best(run)
                    continue
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save(state)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        save(state)
    plot_metrics(run)
    return {"run": str(run.path), "step": state["step"], "interrupted": interrupted, "best_step": state["best_step"],
            "best_metric": state["best_metric"], "skipped": state["skipped"], "trained": state["trained"]}


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
