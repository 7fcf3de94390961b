"""Where rows come from: a user's files (.jsonl/.json, parquet/csv/tsv/arrow, save_to_disk directories) and datasets
in the local HF cache, read offline as (location, row) pairs, with a `columns` mapping onto our field names."""
from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

from ..config import is_symbolic


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
