"""The training loop, the same for every method: batch -> method.step -> log / dev eval / best / checkpoint.

Everything that varies with the step (the batch, the method's randomness, the lr) is a pure function of (config,
step), and a checkpoint holds the trained tensors plus the method's state tensors, so resuming continues bit for
bit. What a step does is the method's business (qzo2/methods/); nothing here knows which one runs.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import data as D
from . import distributed
from . import tracking
from .config import TrainConfig, lr_at, resolve_paths
from .methods import load_for_training
from .objective import dev_metric, evaluate
from .engine import placement
from .outputs import locked
from .run import (RunDir, TrainingError, check_finite, check_inputs, guard_run, input_fingerprints,
                  load_method_state, load_trained, open_run, plot_metrics, read_state, replace_run, save_best,
                  save_checkpoint, write_config)

__all__ = ["train", "TrainOutcome", "TrainingError", "RunDir", "lr_at", "load_for_training", "StopSignals"]


@dataclass
class TrainOutcome:
    """What `train` returns. `run`: the run directory; `step`: the last step done; `signal`: the signal that stopped
    the run early (SIGINT, SIGTERM; None when it finished), `interrupted` whether one did; `best_step` /
    `best_metric`: the best dev evaluation (None without one); `skipped`: steps that updated nothing; `trained`: the
    values training can change. With keep_model: `model` and `tokenizer` (a plain model, the method's hooks removed,
    as after the last step) and `targets`, the trained tensors in it; else None."""

    run: str
    step: int
    interrupted: bool
    signal: int | None
    best_step: int | None
    best_metric: float | None
    skipped: int
    trained: int
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    targets: list | None = field(default=None, repr=False)


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


def step_batch(task: D.Task, tokenizer, cfg: TrainConfig, step: int, world: distributed.World | None = None):
    """The encoded batch of a step; with gradient_accumulation_steps > 1 a list of that many micro-batches. With a
    `world` of several ranks: this rank's contiguous slice of each (global) micro-batch, padded as the whole one is,
    so the ranks' rows compute what they compute in a single process."""
    items = D.batch_at(task.train, cfg.batch_size, cfg.seed, step)
    ga = cfg.gradient_accumulation_steps
    per = len(items) // ga
    micro = [D.encode(task.kind, items[i * per:(i + 1) * per], tokenizer, cfg.max_length) for i in range(ga)]
    if world is not None and world.enabled:
        mine = per // world.size
        micro = [D.batch_rows(b, world.rank * mine, (world.rank + 1) * mine) for b in micro]
    return micro[0] if ga == 1 else micro


def batch_tokens(batch) -> int:
    return sum(int(b["attention_mask"].sum()) for b in (batch if isinstance(batch, list) else [batch]))


class Window:
    """Metrics averaged over the steps since the last log line (skipped steps excluded). Given the `model` and the
    `step` it starts after, a record also holds the memory peaks and, when blocks stream, the host<->device bytes
    per step (every step since `step`; the uploads of dev evaluations, between pause() and resume(), left out as
    their time is from tok_s; the copy-backs are the training updates', whichever forward applies them)."""

    def __init__(self, model=None, step: int = 0):
        self.sums, self.n, self.tokens, self.t0 = {}, 0, 0, time.perf_counter()
        self.model, self.step0, self.paused = model, step, None
        self.moved = tracking.streamed_bytes(model)

    def pause(self) -> None:
        self.paused = (time.perf_counter(), tracking.streamed_bytes(self.model))

    def resume(self) -> None:
        t, moved = self.paused
        self.t0 += time.perf_counter() - t
        if moved is not None:  # what was uploaded while paused is not the window's
            self.moved = (self.moved[0] + tracking.streamed_bytes(self.model)[0] - moved[0], self.moved[1])

    def add(self, metrics: dict, tokens: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.tokens += tokens

    def record(self, world: distributed.World, sharded: bool = True, step: int | None = None) -> dict:
        """The window's means; tok_s counts every rank's tokens over this rank's time (a collective: every rank
        calls it at the same step), tok_s_rank this rank's alone. Unsharded (ZO pair-parallel: every rank runs the
        whole batch) tok_s is the batch's tokens once."""
        dt = time.perf_counter() - self.t0
        out = {**{k: v / self.n for k, v in self.sums.items()}, "tok_s": self.tokens / dt, "s_per_step": dt / self.n}
        if world.enabled:
            import torch

            total = (float(distributed.all_sum(torch.tensor([float(self.tokens)], dtype=torch.float64))[0])
                     if sharded else self.tokens)
            out.update(tok_s=total / dt, tok_s_rank=self.tokens / dt, ranks=world.size)
        if self.model is not None:
            out.update(tracking.memory_scalars(self.model.get_input_embeddings().weight.device))
            moved = tracking.streamed_bytes(self.model)
            if moved is not None and step is not None and step > self.step0:
                h2d, d2h = ((now - before) / (step - self.step0) / tracking.GB
                            for now, before in zip(moved, self.moved))
                out.update(h2d_gb_per_step=h2d, d2h_gb_per_step=d2h)
        return out


def train(cfg: TrainConfig, memory: dict | None = None, keep_model: bool = False) -> TrainOutcome:
    """Train per `cfg` into cfg.output_dir (new, resumed, or replacing an old run with overwrite=true); returns a
    TrainOutcome, with `keep_model` holding the model and tokenizer: the trained model as it is after the last step,
    a plain model (the method's hooks removed).
    `memory`: rows handed over in memory for `memory:` data sources (data.read_data).

    Under torchrun / accelerate launch (RANK, WORLD_SIZE in the environment) every rank runs this same function:
    rank 0 alone writes (run directory, checkpoints, metrics, plot, progress bar), every rank computes the same update
    (qzo2/distributed.py says what crosses ranks), and a signal on any rank stops all of them after the same step."""
    owns_group = not distributed.initialized()
    world = distributed.init(cfg.device)
    try:  # rank 0 writes the run directory, and holds its lock: a second `qzo2 train` into it is refused
        with locked(resolve_paths(cfg).output_dir, "train") if world.main else contextlib.nullcontext():
            return _train(cfg, world, memory, keep_model)
    finally:
        if owns_group:
            distributed.shutdown()


def _train(cfg: TrainConfig, world: distributed.World, memory: dict | None = None,
           keep_model: bool = False) -> TrainOutcome:
    from tqdm.auto import tqdm

    given, cfg = cfg, resolve_paths(cfg)
    if world.enabled and not cfg.spec.multi_rank:
        raise TrainingError(f"method={cfg.method} does not run on several ranks; start it as one process")
    sharded = cfg.spec.cls.shards(cfg)  # does each rank take a slice of the batch (the method says)
    if world.enabled and sharded and cfg.batch_size % (world.size * cfg.gradient_accumulation_steps):
        raise TrainingError(f"batch_size {cfg.batch_size} (the global batch) must be a multiple of the {world.size} "
                            f"ranks x gradient_accumulation_steps {cfg.gradient_accumulation_steps}")
    run, replace = open_run(cfg)  # output_dir checked and the resume validated before anything loads
    tracking.require(cfg.report_to)  # so is a missing tensorboard / wandb package
    resuming = bool(run.steps()) and not replace
    if world.main:
        run.remove_stale()  # what a killed writer of this run left (we hold the lock)
    inputs = input_fingerprints(cfg)
    if resuming:  # the same config on changed inputs is not the same run
        check_inputs(read_state(run.checkpoint("last")).get("inputs"), inputs, run.path, cfg=cfg)
    # every rank must see the same run directory (multi-node: output_dir on shared storage) and decide alike
    distributed.check_same(run.steps()[-1] if resuming else -1, "the step to resume from (is output_dir on storage "
                           "every node shares?)")
    distributed.barrier()  # every rank has looked at output_dir before rank 0 changes it
    data = D.read_data(cfg, memory)  # data errors before the model (minutes at 7B)
    model, tokenizer, method = load_for_training(cfg)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and cfg.max_length > positions:  # learned positions fail; rotary ones run past what was trained
        raise TrainingError(f"max_length {cfg.max_length} is longer than the model's {positions} positions; give "
                            f"max_length={positions} or less")
    check_finite(method.targets, cfg.model)  # an edited or diverged base: every step would be skipped
    where = placement(model)
    task = D.build_task(cfg, tokenizer, data)
    if not task.train:
        raise TrainingError("no training examples")
    if cfg.dev_file and not task.dev:
        raise TrainingError(f"dev_file {cfg.dev_file} holds no dev examples; give a dev set with rows, or no "
                            f"dev_file")
    if world.main:
        if replace:  # the new run can start: only now does the old one go, if it still holds only a run's files
            guard_run(run, cfg)
            replace_run(run)
        run.path.mkdir(parents=True, exist_ok=True)
        write_config(run, cfg, given)
        if not resuming:  # a run restarted from step 0 (no checkpoint yet) logs from scratch
            run.truncate_metrics(-1)
    tracker = tracking.Tracker(run, cfg, run.steps()[-1] if resuming else None) if world.main else None
    log = tracker.log if world.main else (lambda record: None)  # metrics.jsonl + report_to
    shard = world if method.shards_batch else None

    targets = method.targets
    state = {"step": 0, "skipped": 0, "consecutive_skips": 0, "best_step": None, "best_metric": None,
             "trained": method.trained_count(), "method": cfg.method, "inputs": inputs}

    def save(state: dict) -> None:
        method.flush()
        if world.enabled:  # the ranks hold the same trained tensors, or rank 0's checkpoint is not the run's
            distributed.check_same(float(sum(t.tensor.detach().double().sum() for t in targets)),
                                   f"the trained tensors at step {state['step']} (their float64 sum)")
        if world.main:
            save_checkpoint(run, targets, method.state_tensors(), dict(state, config=cfg.to_dict()), cfg.keep_last)
        distributed.barrier()  # no rank runs ahead of a checkpoint being written
        state["saved_step"] = state["step"]

    def evaluate_dev(step: int) -> None:
        m = evaluate(model, task.dev_kind, task.dev, tokenizer, cfg.max_length, cfg.eval_batch_size)
        log({"step": step, **{f"dev_{k}": v for k, v in m.items()}})
        if step:
            say(f"step {step}: " + ", ".join(f"dev {k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
        if state["best_metric"] is None or dev_metric(m) > state["best_metric"]:
            state.update(best_step=step, best_metric=dev_metric(m))
            if world.main:  # best/ first: a kill between the two leaves best/ ahead of the last checkpoint (the
                # resumed run redoes the step and writes the same best/), never behind the pointer
                method.flush()
                save_best(run, targets, method.state_tensors(), dict(state, config=cfg.to_dict()))
            save(state)

    completed = False  # the loop ended without an exception (a wandb run is marked failed otherwise)
    stop = StopSignals()
    stopped = 0  # the signal that stops the run (on any rank), 0 while none has come
    bar = tqdm(total=cfg.steps, initial=0, desc=f"{cfg.method} train", disable=not (cfg.progress and world.main))
    say = bar.write if world.main else (lambda text: None)
    try:
        with stop:
            if resuming:
                ckpt = run.checkpoint("last")
                state = load_trained(ckpt, targets)
                method.load_state_tensors(load_method_state(ckpt))
                state.pop("config", None)
                state["inputs"] = inputs
                if world.main:
                    run.truncate_metrics(state["step"])
                bar.update(state["step"])
            else:
                method.prepare(lambda i, size: D.encode(task.kind, D.batch_at(task.train, size, cfg.seed + 1, i),
                                                        tokenizer, cfg.max_length))
                state["trained"] = method.trained_count()  # a ZO mask chosen by prepare() narrows it
                if task.dev:
                    evaluate_dev(0)
            window = Window(model, state["step"])
            if where["streamed_blocks"]:
                say(f"{where['device']}: streaming {where['streamed_blocks']} of {where['blocks']} decoder "
                          f"blocks (prefetch depth {where['prefetch_depth']})")
            stopped = distributed.max_over_ranks(stop.signum or 0)  # one during prepare / eval / resume counts
            while state["step"] < cfg.steps and not stopped:
                step = state["step"]
                batch = step_batch(task, tokenizer, cfg, step, shard)
                metrics = method.step(batch, step)
                state["step"] = step + 1
                if metrics.get("skipped"):  # nothing was updated; the step's tail (log, eval, save) still runs
                    state["skipped"] += 1
                    log({"step": step + 1, **metrics, "skipped": True, "reason": metrics["skipped"]})
                    if metrics["skipped"] == "nonfinite":
                        state["consecutive_skips"] += 1
                        say(f"step {step + 1}: non-finite loss, step skipped "
                                  f"({state['consecutive_skips']} in a row)")
                        if state["consecutive_skips"] >= cfg.max_skips:
                            raise TrainingError(f"{cfg.max_skips} consecutive non-finite losses at step {step + 1}; "
                                                f"last good checkpoint: "
                                                f"{run.checkpoint('last') if run.steps() else 'none'}")
                else:
                    state["consecutive_skips"] = 0
                    window.add(metrics, batch_tokens(batch))
                bar.update()
                last = step + 1 == cfg.steps
                if window.n and ((step + 1) % cfg.log_every == 0 or last):
                    rec = {"step": step + 1, **window.record(world, method.shards_batch, step + 1),
                           "lr": method.lr_at(step), "skipped": state["skipped"]}
                    if where:  # the first training line of this process says where the model ran
                        rec.update(where)
                        where = None
                    log(rec)
                    bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss", "d", "grad_norm", "lr") if k in rec})
                    window = Window(model, step + 1)
                if task.dev and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
                    window.pause()
                    evaluate_dev(step + 1)
                    window.resume()  # tokens/s and the streamed bytes per step count training only
                if ((step + 1) % cfg.save_every == 0 or last) and state.get("saved_step") != step + 1:
                    save(state)
                stopped = distributed.max_over_ranks(stop.signum or 0)  # one rank's signal stops them all here
            if stopped and state.get("saved_step") != state["step"]:
                save(state)
        completed = True
    finally:
        bar.close()
        if tracker is not None:
            tracker.close(failed=not completed)
    if world.main:
        plot_metrics(run)
    signum = stopped or None
    out = TrainOutcome(run=str(run.path), step=state["step"], interrupted=signum is not None, signal=signum,
                       best_step=state["best_step"], best_metric=state["best_metric"], skipped=state["skipped"],
                       trained=state["trained"])
    if keep_model:
        method.flush()
        method.close()
        out.model, out.tokenizer, out.targets = model, tokenizer, targets
    return out
