"""The Python API: `from qzo2 import quantize, train, export, evaluate, TrainConfig`.

The same functions the `qzo2` command calls, for notebooks and scripts: inputs may live in memory (rows as a list of
dicts or a `datasets.Dataset`), results come back as objects (the trained model and tokenizer, the metrics), errors
are the exceptions the CLI turns into one line (all ValueErrors: ConfigError, DataError, TrainingError,
CheckpointError). Nothing here installs a signal handler, so every function runs off the main thread too (the
training loop installs its Ctrl-C / SIGTERM handlers only on the main thread, and removes them on exit).

    from qzo2 import quantize, train, export, evaluate
    quantize(None, "runs/int4")                                      # the embedded SmolLM2-135M, RTN int4
    result = train("recipes/sentiment-adalomo.yaml", model="runs/int4", steps=80, output_dir="runs/demo")
    print(result.best_metric, evaluate(result, task="sentiment")["accuracy"])
    export(result, "runs/demo-gptq")
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

from quant.gguf import GRID

from .config import MEMORY, ConfigError, TrainConfig, _check_key, _coerce, load_config, renamed

if TYPE_CHECKING:  # heavy imports only for type checkers
    import datasets
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from quant.checkpoint import QuantizeReport

    from .exporter import ExportReport

Rows = Union[Iterable[Mapping[str, Any]], "datasets.Dataset"]

__all__ = ["quantize", "train", "export", "evaluate", "TrainConfig", "TrainResult", "make_config"]


# ---- quantize ------------------------------------------------------------------------------------------------------
GGUF_GRIDS = {f"gguf-{t}": grid for t, grid in GRID.items()}  # format -> bits, symmetric


def quantize(model: str | os.PathLike | None, output: str | os.PathLike, *, bits: int | None = None,
             group_size: int | None = None, sym: bool | None = None, method: str = "rtn", format: str = "gptq", skip: str | Iterable[str] = (),
             calib: str | os.PathLike | None = None, nsamples: int = 128, seqlen: int = 512, desc_act: bool = False,
             max_shard_size: int | str = "4GB", overwrite: bool = False, trust_remote_code: bool = False,
             progress: bool = False, echo=None) -> "QuantizeReport":
    """Quantize a Hugging Face causal LM (a local directory or .gguf file; None = the embedded SmolLM2-135M) into a
    GPTQ checkpoint at `output` (int `bits` codes, per-group scales; format nf4: bitsandbytes NF4), written
    atomically; bits None = 4, sym None = symmetric. Formats gguf-q4_0 / gguf-q4_1 / gguf-q8_0 pick the grid a GGUF
    block type holds exactly (4-bit symmetric / asymmetric, 8-bit symmetric; group size 32), written as GPTQ, so
    the trained model exports to that GGUF type bit for bit; from a .gguf stored in that type (Q4_0 / Q8_0) the
    codes and scales are kept as they are. group_size None picks 128, or the largest of 64/32 that divides every
    layer (-1: per channel);
    method gptq calibrates on `calib` (a text file; default the shipped Hamlet). Returns the report
    (`.summary(output)` is what `qzo2 quantize` prints); `echo(line)` gets the chosen group size."""
    from quant.checkpoint import atomic_dir, auto_group_size, open_source
    from quant.checkpoint import quantize as quantize_source
    from quant.format import QuantConfig

    from .config import parse_size
    from .model import default_text_path, resolve_source
    from .data import read_utf8
    from .outputs import clear_stale_lock, guard_output, locked, remove_stale, write_marker

    out, src_name = Path(output), None if model is None else str(model)
    out = guard_output(out, [resolve_source(src_name), calib], replace=overwrite)
    if out.exists() and not overwrite:
        clear_stale_lock(out)
        raise ValueError(f"output {out} already exists (pass --overwrite / overwrite=True to replace it)")
    if format not in ("gptq", "gptq_v2", "nf4", *GGUF_GRIDS) or method not in ("rtn", "gptq"):
        raise ValueError(f"format must be gptq, gptq_v2, nf4 or one of {', '.join(GGUF_GRIDS)} and method rtn or gptq "
                         f"(got {format!r}, {method!r})")
    if format in GGUF_GRIDS:
        grid = GGUF_GRIDS[format]
        if (bits is not None and bits != grid[0]) or (sym is not None and sym != grid[1]):
            raise ValueError(f"--format {format} is {grid[0]}-bit {'symmetric' if grid[1] else 'asymmetric'}: drop "
                             f"--bits/--sym/--asym")
        if group_size is not None and (group_size == -1 or group_size % 32) or desc_act:
            raise ValueError(f"--format {format} needs groups of 32 input channels (or a multiple of 32) without "
                             f"--desc-act: GGUF blocks are 32 consecutive weights")
        bits, sym, group_size = grid[0], grid[1], group_size or 32
    bits = 4 if bits is None else bits
    sym = True if sym is None else sym
    skip = [skip] if isinstance(skip, str) else list(skip)
    for pattern in skip:  # before anything loads: re.error is no ValueError, it would be a traceback
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--skip {pattern!r}: not a valid regular expression ({e})") from None
    source = open_source(resolve_source(src_name), trust_remote_code=trust_remote_code)
    if group_size is None:
        group_size = auto_group_size(source.config, skip, (64,) if format == "nf4" else (128, 64, 32))
        if echo:
            echo(f"group size {group_size}")
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                      checkpoint_format=format if format in ("gptq", "gptq_v2") else "gptq", method=method)
    calib = Path(calib) if calib else (default_text_path() if method == "gptq" else None)
    if calib is not None:
        if not read_utf8(calib, "calibration file").strip():  # missing, non-UTF-8 or empty: one line, before GPTQ
            raise ValueError(f"calibration file {calib} is empty; give --calib a text file with a few pages of text")
    shard = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    with locked(out, "quantize"):  # one writer per output; what a killed quantize left goes first
        remove_stale(out.parent, re.escape(out.name))
        with atomic_dir(out, overwrite=overwrite) as tmp:
            report = quantize_source(source, tmp, cfg, fmt="nf4" if format == "nf4" else cfg.checkpoint_format, skip=skip, calib=calib, nsamples=nsamples,
                                     seqlen=seqlen, max_shard_bytes=shard, progress=progress,
                                     trust_remote_code=trust_remote_code)
            write_marker(tmp, "quantize", source=str(Path(resolve_source(src_name)).resolve()), format=format)
            guard_output(out, [resolve_source(src_name), calib], replace=overwrite)  # again, under the lock, just
            # before the swap: a file put into the old output while GPTQ ran is not lost either
        return report


# ---- train ---------------------------------------------------------------------------------------------------------
def make_config(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                **overrides: Any) -> TrainConfig:
    """A validated TrainConfig from a TrainConfig, a mapping of keys, a recipe YAML path or None (the defaults),
    with keyword overrides on top; values are coerced and checked as in a recipe (unknown keys say so)."""
    if isinstance(config, TrainConfig):
        values = config.to_dict()
    elif isinstance(config, (str, os.PathLike)):
        values = load_config(str(config)).to_dict()
    elif config is None:
        values = {}
    else:
        values = {}
        for k, v in renamed({str(k): v for k, v in dict(config).items()}).items():
            _check_key(k, "the config")
            values[k] = _coerce(k, v)
    for k, v in renamed(overrides).items():
        _check_key(k, "the keyword arguments")
        values[k] = _coerce(k, v)
    return TrainConfig(**values)


def _located(rows: Rows, which: str) -> list[tuple[str, Any]]:
    """In-memory rows as (location, row) pairs: "train_data[i]" (0-based), a Dataset's rows as data.dataset_rows."""
    from . import data as D

    if hasattr(rows, "features") and hasattr(rows, "column_names"):  # a datasets.Dataset
        return D.dataset_rows(rows, f"{which}_data")
    if isinstance(rows, (str, bytes, os.PathLike, Mapping)):
        raise TypeError(f"{which}_data must be rows (a list of dicts or a datasets.Dataset); for a file use "
                        f"{which}_file=PATH")
    return [(f"{which}_data[{i}]", row) for i, row in enumerate(rows)]


@dataclass
class TrainResult:
    """What `train` returns. `model` / `tokenizer`: the trained model (a plain HF model: the method's hooks are
    removed; the best checkpoint's tensors when `load_best` and a dev evaluation ran, else the last step's);
    `metrics`: the run's metrics.jsonl records; `run`: the run directory (export / evaluate / resume take it)."""

    run: Path
    step: int
    best_step: int | None
    best_metric: float | None
    interrupted: bool
    skipped: int
    trained: int
    config: TrainConfig
    model: "nn.Module" = field(repr=False)
    tokenizer: "PreTrainedTokenizerBase" = field(repr=False)
    metrics: list[dict] = field(default_factory=list, repr=False)
    checkpoint: str = "last"  # which checkpoint's tensors `model` holds: best (also when best is the last) or last


def train(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, *,
          train_data: Rows | None = None, dev_data: Rows | None = None, load_best: bool = True,
          **overrides: Any) -> TrainResult:
    """Train as `qzo2 train` does (the same loop, run directory, checkpoints and resume), from a config (a
    TrainConfig, a mapping, a recipe path or None) plus keyword overrides (any TrainConfig key).

    train_data / dev_data: rows in memory (a list of dicts or a datasets.Dataset) in any format train_file takes:
    text rows, or task rows with task=TASK.yaml. With train_data and no task given, task is '' (text rows). The run
    directory records them as `memory:<sha256>`, so resuming needs the same rows again (other rows are refused).
    The default progress bar is off here. Returns a TrainResult."""
    from .data import memory_fingerprint
    from .run import RunDir, load_trained

    given = _given_keys(config) | set(overrides)
    extra = {} if "progress" in given else {"progress": False}
    memory = {}
    if train_data is not None:
        memory["train"] = _located(train_data, "train")
        extra["train_file"] = MEMORY + memory_fingerprint(memory["train"])
        if "task" not in given:
            extra["task"] = ""
    if dev_data is not None:
        memory["dev"] = _located(dev_data, "dev")
        extra["dev_file"] = MEMORY + memory_fingerprint(memory["dev"])
    cfg = make_config(config, **{**extra, **overrides})
    if memory and cfg.task == "sentiment":
        raise ConfigError("task=sentiment is the built-in dataset and takes no rows: set task='' for text rows or "
                          "task=TASK.yaml for task rows")
    from .trainer import train as run_training

    out = run_training(cfg, memory or None, keep_model=True)
    checkpoint = "best" if out.best_step is not None and out.best_step == out.step else "last"
    if load_best and out.best_step is not None and out.best_step != out.step:
        load_trained(RunDir(out.run).checkpoint("best"), out.targets)
        checkpoint = "best"
    return TrainResult(run=Path(out.run), step=out.step, best_step=out.best_step, best_metric=out.best_metric,
                       interrupted=out.interrupted, skipped=out.skipped, trained=out.trained, config=cfg,
                       model=out.model, tokenizer=out.tokenizer, metrics=RunDir(out.run).read_metrics(),
                       checkpoint=checkpoint)


def _given_keys(config) -> set[str]:
    """The keys a config sets explicitly: every key of a TrainConfig, those of a mapping or a recipe file."""
    if isinstance(config, TrainConfig):
        return set(config.to_dict())
    if isinstance(config, (str, os.PathLike)):
        from .config import read_yaml

        try:
            data = read_yaml(Path(config)) or {}
        except (OSError, ConfigError):
            return set()  # make_config reports it
        return set(renamed({str(k): v for k, v in data.items()})) if isinstance(data, dict) else set()
    return set(renamed({str(k): v for k, v in dict(config or {}).items()}))


# ---- export --------------------------------------------------------------------------------------------------------
def export(run: TrainResult | str | os.PathLike, output: str | os.PathLike, *, format: str = "gptq",
           dtype: str | None = None, checkpoint: str = "auto", overwrite: bool = False,
           max_shard_size: int | str = "4GB") -> "ExportReport":
    """Write a run (a TrainResult or a run directory; for format hf also a quantized model directory) as a
    servable checkpoint at `output`, atomically: gptq / gptq_v2 = the base GPTQ checkpoint with only the trained
    scales changed; hf = a merged, dequantized plain checkpoint in `dtype` (bf16, fp16, fp32; default the run's).
    checkpoint: best, last or a step (auto: best if the run evaluated). Returns the report (`.summary()`)."""
    from .config import parse_size
    from .exporter import export as export_run

    shard = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    path = run.run if isinstance(run, TrainResult) else run
    return export_run(str(path), str(output), format, dtype, checkpoint, overwrite, shard)


# ---- evaluate ------------------------------------------------------------------------------------------------------
def evaluate(model: TrainResult | str | os.PathLike | "nn.Module" | None = None,
             tokenizer: "PreTrainedTokenizerBase | None" = None, *, task: str | None = "sentiment",
             data: Rows | str | os.PathLike | None = None, split: str = "test", seed: int | None = None,
             template: str | None = None, max_length: int | None = None, batch_size: int | None = None,
             checkpoint: str = "auto", text: str | None = None, seqlen: int = 256, nseq: int = 8) -> dict:
    """Score a model as `qzo2 eval` does. `model`: a TrainResult (its in-memory model), an nn.Module with its
    `tokenizer`, a run directory (its `checkpoint`: best, last, a step; auto = best if it evaluated, else last),
    any model path qzo2 loads, or None (the embedded SmolLM2). seed, template, max_length, batch_size (and the
    sentiment split sizes) default to the run's settings for a TrainResult or run directory, else 0, review, 256,
    16.

    task="sentiment": accuracy on the built-in split (`split` dev/test of the seeded Rotten Tomatoes splits);
    task=TASK.yaml: accuracy on `data` (rows in memory or any data source path); returns {"accuracy", "loss",
    "predicted" (per-class prediction rates), "n"}. task=None: perplexity on `text` (default: the shipped Hamlet),
    `batch_size` windows per forward (default 4) -> {"perplexity", "tokens"}. One implementation with the CLI:
    evaluation.evaluate_model."""
    from .evaluation import evaluate_model

    cfg = None
    if isinstance(model, TrainResult):
        model, tokenizer, cfg = model.model, model.tokenizer, model.config
    if task not in (None, "sentiment") and data is not None and not isinstance(data, (str, os.PathLike)):
        data = _located(data, "eval")
    r = evaluate_model(model, tokenizer, cfg=cfg, checkpoint=checkpoint, task=task, data=data, split=split, seed=seed,
                       template=template, max_length=max_length, batch_size=batch_size, ppl=task is None, text=text,
                       seqlen=seqlen, nseq=nseq)
    return r.metrics if task is not None else {"perplexity": r.perplexity, "tokens": seqlen * r.windows}
