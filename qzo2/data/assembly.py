"""What a run trains on: a run's rows read from its config (files, splits, dev_fraction, rows in memory), checked
before the model loads, then tokenized into a Task."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..config import MEMORY
from .batching import shuffled
from .corpora import sentiment_splits
from .formats import check_text_rows, tokenize_row, tokenize_rows
from .sources import DataError, map_columns, parse_columns, read_rows
from .tasks import SENTIMENT_TEMPLATES, load_task_yaml, task_examples


@dataclass
class Task:
    """What a run trains on: items, how they are batched (`encode`), and how the dev set is scored."""

    kind: str  # "classification" | "lm": what the training batches are and which loss they take
    train: list
    dev: list
    test: list
    dev_kind: str = ""  # "classification" for tasks (selected by accuracy even when trained as LM), else "lm"


def memory_fingerprint(rows: list[tuple[str, object]]) -> str:
    """sha256 of rows handed over in memory (their JSON, keys sorted): what the run directory records in place of
    a file path, so a resume with other rows is refused like one with another file."""
    h = hashlib.sha256()
    for _, row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def carve_dev(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, dev): round(fraction·n) rows (at least 1) drawn with random.Random(seed) as dev, the rest, in their
    order, as train."""
    n = len(rows)
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"dev_fraction {fraction} of {n} rows leaves no training rows")
    held = set(shuffled(range(n), seed)[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def source_rows(cfg, memory: dict | None = None) -> tuple[list, list, str]:
    """(train rows, dev rows, where dev came from) of a run (cfg: a TrainConfig), as (location, row) pairs, before
    any format check: train_file (its train_split) and dev_file (its dev_split, or "validation" when it has splits);
    with no dev_file, dev_split of train_file's source, or dev_fraction of the train rows carved out with the seed.
    A `memory:<sha256>` source takes memory["train"] / memory["dev"] and checks their fingerprint."""
    mapping = parse_columns(cfg.columns)

    def get(which: str, source: str, split: str | None, default: str = "train") -> list:
        if source.startswith(MEMORY):
            rows = (memory or {}).get(which)
            if rows is None:
                raise DataError(f"{which}_file={source} stands for rows handed over in memory (the Python API), "
                                f"and none were given")
            if memory_fingerprint(rows) != source[len(MEMORY):]:
                raise DataError(f"the {which} rows given differ from the ones {which}_file={source[:23]}... names "
                                f"(a run resumes only on the rows it started with)")
            return map_columns(rows, mapping)
        return read_rows(source, split, mapping, default)

    train = get("train", cfg.train_file, cfg.train_split)
    if cfg.dev_file:
        return train, get("dev", cfg.dev_file, cfg.dev_split or None, "validation"), cfg.dev_file
    if cfg.dev_split:
        if cfg.train_file.startswith(MEMORY):
            raise DataError("dev_split names a split of train_file's dataset; rows in memory have none (pass dev "
                            "rows, or set dev_fraction)")
        return train, get("dev", cfg.train_file, cfg.dev_split), f"{cfg.train_file}[{cfg.dev_split}]"
    if cfg.dev_fraction:
        train, dev = carve_dev(train, cfg.dev_fraction, cfg.seed)
        return train, dev, f"{cfg.train_file} (dev_fraction {cfg.dev_fraction})"
    return train, [], ""


def read_data(cfg, memory: dict | None = None) -> dict:
    """Everything about a run's data that can be checked without a tokenizer (cfg: a TrainConfig), read before
    the model loads (minutes at 7B), so a bad file fails first: classification examples for a task, validated
    rows for text data. `memory`: {"train": rows, "dev": rows} as (location, row) pairs, for `memory:` sources."""
    if cfg.task == "sentiment":
        return sentiment_splits(cfg.seed, cfg.n_train, cfg.n_dev, cfg.n_test, template=SENTIMENT_TEMPLATES[cfg.template])
    if cfg.task and not cfg.train_file:
        raise DataError(f"task {cfg.task} needs train_file=PATH with its examples")
    train, dev, dev_source = source_rows(cfg, memory)
    if cfg.task:
        task = load_task_yaml(cfg.task)
        return dict(train=task_examples(task, train, cfg.train_file),
                    dev=task_examples(task, dev, dev_source) if dev else [], test=[])
    return dict(train=check_text_rows(train, cfg.train_file), dev=check_text_rows(dev, dev_source) if dev else [])


def build_task(cfg, tokenizer, data: dict | None = None) -> Task:
    """read_data's output (read now when not given) tokenized where the task needs it."""
    data = read_data(cfg) if data is None else data
    if cfg.task:
        train, dev, test = data["train"], data["dev"], data["test"]
        if cfg.objective == "lm":  # LM on the gold answer: prompt + correct candidate as a prompt/completion row
            rows = [{"prompt": e.prompt, "completion": e.candidates[e.label]} for e in train]
            lm = [r for r in (tokenize_row(r, tokenizer, cfg.max_length) for r in rows) if r is not None]
            return Task("lm", lm, dev, test, dev_kind="classification")
        return Task("classification", train, dev, test, dev_kind="classification")
    train = tokenize_rows(data["train"], tokenizer, cfg.max_length, cfg.train_on_prompt, source=cfg.train_file)
    dev = (tokenize_rows(data["dev"], tokenizer, cfg.max_length, cfg.train_on_prompt, source=cfg.dev_file or "dev")
           if data["dev"] else [])
    return Task("lm", train, dev, [], dev_kind="lm")
