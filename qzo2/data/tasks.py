"""Classification tasks: a prompt template and candidate answers (built in, or from a task YAML), and rows turned
into ClassificationExamples."""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

from .sources import DataError, read_rows, read_utf8


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
