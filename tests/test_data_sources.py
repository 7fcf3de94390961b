"""Every offline source `datasets` reads gives the same rows as the jsonl reader on the same data; columns, splits,
the carved dev set; bad rows still name their source and row."""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

datasets = pytest.importorskip("datasets")

from qzo2 import data as D
from qzo2.config import TrainConfig, resolve_paths
from qzo2.data import DataError

# one of each text format, with the awkward bits: commas, quotes, a newline, unicode, an alpaca row without input
ROWS = [
    {"text": 'the dog, "quoted"\nsecond line'},
    {"prompt": "Q: 2+2?", "completion": " 4"},
    {"instruction": "Say hi", "output": "hi"},
    {"instruction": "Translate", "input": "chien", "output": "dog"},
    {"text": "caf\u00e9 \u2014 na\u00efve"},
]
MESSAGES = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
TEXTS = [{"text": t} for t in ("one, two", 'a "quoted" word', "multi\nline", "tab\there", "plain")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def table(rows):
    """A Dataset of rows of several formats: one Arrow schema, so every row gets every column (nulls elsewhere)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})


def rows_of(source, **kw):
    return [r for _, r in D.read_rows(source, **kw)]


def test_parquet_and_arrow_match_jsonl(tmp_path):
    want = rows_of(write_jsonl(tmp_path / "d.jsonl", ROWS + MESSAGES))
    ds = table(ROWS + MESSAGES)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert rows_of(tmp_path / "d.parquet") == want
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = glob.glob(str(tmp_path / "saved" / "*.arrow"))
    assert len(arrow) == 1
    shutil.copy(arrow[0], tmp_path / "d.arrow")
    assert rows_of(tmp_path / "d.arrow") == want
    assert rows_of(tmp_path / "saved") == want  # a save_to_disk directory of one Dataset
    where = [w for w, _ in D.read_rows(tmp_path / "d.parquet")]
    assert where == [f"{tmp_path / 'd.parquet'} row {i}" for i in range(1, len(want) + 1)]


def test_csv_and_tsv_match_jsonl(tmp_path):
    want = rows_of(write_jsonl(tmp_path / "t.jsonl", TEXTS))
    import csv

    for name, delim in (("t.csv", ","), ("t.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["text"])
            w.writerows([[r["text"]] for r in TEXTS])
        assert rows_of(tmp_path / name) == want, name


def test_save_to_disk_dict_splits_and_dev_split(tmp_path):
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(TEXTS[:3]),
                              validation=datasets.Dataset.from_list(TEXTS[3:]))
    dd.save_to_disk(str(tmp_path / "dd"))
    assert rows_of(tmp_path / "dd") == TEXTS[:3]
    assert rows_of(tmp_path / "dd", split="validation") == TEXTS[3:]
    with pytest.raises(DataError, match=r"has no split 'test' \(it has train, validation\)"):
        D.read_rows(tmp_path / "dd", split="test")
    cfg = TrainConfig(task="", train_file=str(tmp_path / "dd"), dev_split="validation")
    data = D.read_data(cfg)
    assert [r for _, r in data["train"]] == TEXTS[:3] and [r for _, r in data["dev"]] == TEXTS[3:]
    cfg = TrainConfig(task="", train_file=str(tmp_path / "dd"), dev_file=str(tmp_path / "dd"))  # default: validation
    assert [r for _, r in D.read_data(cfg)["dev"]] == TEXTS[3:]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A dataset 'qzo2test/tiny' in a local HF datasets cache, laid out as `load_dataset` leaves it after an online
    download (built here by the parquet builder, then named as the Hub dataset would be)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    files = {}
    for split, rows in (("train", TEXTS[:4]), ("test", TEXTS[4:])):
        files[split] = str(tmp_path / f"{split}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(files[split])
    datasets.load_dataset_builder("parquet", data_files=files, cache_dir=str(cache)).download_and_prepare()
    os.rename(cache / "parquet", cache / "qzo2test___tiny")
    (config_dir,) = glob.glob(str(cache / "qzo2test___tiny" / "default-*"))
    os.rename(config_dir, cache / "qzo2test___tiny" / "default")
    for f in glob.glob(str(cache / "qzo2test___tiny" / "*" / "*" / "*" / "parquet-*.arrow")):
        os.rename(f, f.replace("/parquet-", "/tiny-"))
    return cache


def test_dataset_by_name_from_the_local_cache(hf_cache, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # a user who is online (the tests run offline)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    seen = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        seen.append((datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert rows_of("qzo2test/tiny") == TEXTS[:4]
    assert rows_of("qzo2test/tiny", split="test") == TEXTS[4:]
    with pytest.raises(DataError, match=r"split 'nope'"):
        D.read_rows("qzo2test/tiny", split="nope")
    assert seen == [(True, True)] * 3  # offline while qzo2 reads ...
    assert (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE) == (False, False)  # ... and as before after, errors too
    with pytest.raises(DataError, match="no dataset of that name in the local HF cache"):
        D.read_rows("qzo2test/absent")
    cfg = resolve_paths(TrainConfig(task="", train_file="qzo2test/tiny", dev_split="test"))
    assert cfg.train_file == "qzo2test/tiny"  # a name is not made into a path
    assert [r for _, r in D.read_data(cfg)["dev"]] == TEXTS[4:]


def test_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(DataError, match=r"nope\.parquet: no such file"):
        D.read_rows(tmp_path / "nope.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read it as parquet"):
        D.read_rows(tmp_path / "bad.parquet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        D.read_rows(tmp_path / "plain")
    assert resolve_paths(TrainConfig(task="", train_file="rel/x.parquet")).train_file == os.path.abspath("rel/x.parquet")


def test_bad_row_names_its_source_and_row(tmp_path):
    datasets.Dataset.from_list(TEXTS[:2] + [{"text": ""}]).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(DataError, match=r"b\.parquet row 3: field 'text' is empty"):
        D.read_data(TrainConfig(task="", train_file=str(tmp_path / "b.parquet")))
    datasets.Dataset.from_list([{"text": "a", "id": 1}]).to_parquet(str(tmp_path / "extra.parquet"))
    with pytest.raises(DataError, match=r"extra\.parquet row 1: text row has unknown field\(s\) \['id'\]"):
        D.read_data(TrainConfig(task="", train_file=str(tmp_path / "extra.parquet")))


def test_columns_map_source_columns_to_fields(tmp_path):
    src = [{"question": "2+2?", "answer": " 4", "id": 7}, {"question": "3+3?", "answer": " 6", "id": 8}]
    datasets.Dataset.from_list(src).to_parquet(str(tmp_path / "qa.parquet"))
    cfg = TrainConfig(task="", train_file=str(tmp_path / "qa.parquet"), columns="prompt=question,completion=answer")
    got = [r for _, r in D.read_data(cfg)["train"]]
    assert got == [{"prompt": r["question"], "completion": r["answer"]} for r in src]
    from qzo2.config import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: ''\ntrain_file: {tmp_path / 'qa.parquet'}\ncolumns: {{prompt: question, completion: answer}}\n")
    assert load_config(str(recipe)).columns == "prompt=question,completion=answer"
    with pytest.raises(DataError, match="is not FIELD=COLUMN"):
        D.read_data(TrainConfig(task="", train_file=str(tmp_path / "qa.parquet"), columns="prompt"))
    with pytest.raises(DataError, match=r"row 1: none of the mapped columns \['body'\]"):
        D.read_data(TrainConfig(task="", train_file=str(tmp_path / "qa.parquet"), columns="text=body"))


def test_task_rows_from_csv_with_columns_match_jsonl(tmp_path):
    task = tmp_path / "t.yaml"
    task.write_text("template: 'Review: {sentence}\\nSentiment:'\ncandidates: [' negative', ' positive']\n")
    rows = [{"sentence": f"film {i}", "label": i % 2} for i in range(6)]
    want = D.read_data(TrainConfig(task=str(task), train_file=str(write_jsonl(tmp_path / "t.jsonl", rows))))
    with open(tmp_path / "t.csv", "w") as f:
        f.write("review,stars\n" + "".join(f"{r['sentence']},{r['label']}\n" for r in rows))
    got = D.read_data(TrainConfig(task=str(task), train_file=str(tmp_path / "t.csv"),
                                  columns="sentence=review,label=stars"))
    assert [(e.prompt, e.candidates, e.label) for e in got["train"]] == \
        [(e.prompt, e.candidates, e.label) for e in want["train"]]


def test_dev_fraction_carves_a_seeded_dev_set(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def split(seed, fraction=0.25):
        d = D.read_data(TrainConfig(task="", train_file=str(path), dev_fraction=fraction, seed=seed))
        return [r["text"] for _, r in d["train"]], [r["text"] for _, r in d["dev"]]

    train, dev = split(0)
    assert len(dev) == 5 and len(train) == 15
    assert sorted(train + dev, key=lambda t: int(t.split()[1])) == [r["text"] for r in rows]  # a partition
    assert train == [t for t in (r["text"] for r in rows) if t not in dev]  # train keeps the file's order
    assert split(0) == (train, dev) and split(1)[1] != dev  # the seed picks the dev rows
    assert D.read_data(TrainConfig(task="", train_file=str(path)))["dev"] == []  # off by default
    with pytest.raises(DataError, match="leaves no training rows"):
        D.carve_dev(rows[:1], 0.5, 0)


def test_splits_of_a_source_without_splits_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    assert rows_of(path, split="train") == TEXTS  # a file's one split, as datasets names it
    with pytest.raises(DataError, match=r"d\.jsonl has no splits, so not 'validation'"):
        D.read_data(TrainConfig(task="", train_file=str(path), dev_split="validation"))
    datasets.Dataset.from_list(TEXTS).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match="has no splits, so not 'test'"):
        D.read_data(TrainConfig(task="", train_file=str(tmp_path / "one"), train_split="test"))
    from qzo2.config import ConfigError

    with pytest.raises(ConfigError, match="dev_fraction carves"):
        TrainConfig(task="", train_file=str(path), dev_file=str(path), dev_fraction=0.1)


def test_paths_into_local_directories_are_not_dataset_names(tmp_path, monkeypatch):
    from qzo2.config import is_symbolic

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert not is_symbolic("train_file", "data/train")  # a file to be, inside ./data
    assert is_symbolic("train_file", "org/name") and is_symbolic("train_file", "rotten_tomatoes")
    with pytest.raises(DataError, match="data/train: no such file"):
        D.read_rows("data/train")


def test_csv_text_that_reads_as_missing_stays_text(tmp_path):
    (tmp_path / "na.csv").write_text("text\nNA\nnull\nNone\n")
    assert rows_of(tmp_path / "na.csv") == [{"text": "NA"}, {"text": "null"}, {"text": "None"}]
