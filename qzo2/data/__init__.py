"""Training data: where rows come from, their formats and tokenization, classification tasks, built-in corpora,
deterministic batches, and the assembly of what a run trains on. The scoring of candidates is qzo2.objective's."""
from .assembly import Task, build_task, carve_dev, memory_fingerprint, read_data, source_rows
from .batching import batch_at, batch_rows, collate_lm, encode, encode_candidates, pad_id, shuffled
from .corpora import (chatterbot_rows, package_dir, plot_or_review_rows, rotten_tomatoes_plots,
                      rotten_tomatoes_reviews, seeded_splits, sentiment_rows, sentiment_splits)
from .formats import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE, check_text_rows, encode_prompt_and_candidates,
                      load_text_dataset, tokenize_row, tokenize_rows)
from .sources import DataError, dataset_rows, read_rows, read_source, read_utf8
from .tasks import (SENTIMENT_TEMPLATE, SENTIMENT_TEMPLATES, SST2_TEMPLATE, ClassificationExample, ClassificationTask,
                    load_task_examples, load_task_yaml, task_examples)

__all__ = [
    # sources
    "DataError", "dataset_rows", "read_rows", "read_source", "read_utf8",
    # formats
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "IGNORE", "check_text_rows", "encode_prompt_and_candidates",
    "load_text_dataset", "tokenize_row", "tokenize_rows",
    # tasks
    "SENTIMENT_TEMPLATE", "SENTIMENT_TEMPLATES", "SST2_TEMPLATE", "ClassificationExample", "ClassificationTask",
    "load_task_examples", "load_task_yaml", "task_examples",
    # corpora
    "chatterbot_rows", "package_dir", "plot_or_review_rows", "rotten_tomatoes_plots", "rotten_tomatoes_reviews",
    "seeded_splits", "sentiment_rows", "sentiment_splits",
    # batching
    "batch_at", "batch_rows", "collate_lm", "encode", "encode_candidates", "pad_id", "shuffled",
    # assembly
    "Task", "build_task", "carve_dev", "memory_fingerprint", "read_data", "source_rows",
]
