"""Evaluation: task accuracy (via objective.evaluate), perplexity on a text, greedy generations. `evaluate_model` is
the one implementation behind `qzo2 eval` and `qzo2.evaluate`, `write_lm_eval` the one behind `qzo2 eval
--lm-eval-task`; both take typed arguments and return what they measured, the callers format it."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .outputs import guard_file, write_file


def check_windows(seqlen, nseq, batch_size=1) -> None:
    """perplexity's window settings, checked before any model is loaded: a window scores the tokens after its first,
    so it needs two."""
    for name, value, low in (("seqlen", seqlen, 2), ("nseq", nseq, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low} (got {value!r})")


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seqlen: int = 256, nseq: int = 8,
               batch_size: int = 4) -> tuple[float, int]:
    """(exp(mean next-token NLL), windows) over the first nseq non-overlapping windows of seqlen tokens (fewer when
    the text is shorter: the second value says how many)."""
    check_windows(seqlen, nseq, batch_size)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and seqlen > positions:
        raise ValueError(f"--seqlen {seqlen} is longer than the model's {positions} positions; give --seqlen "
                         f"{positions} or less")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(nseq, ids.numel() // seqlen)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    total, count = 0.0, 0
    device = model.get_input_embeddings().weight.device
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count), n


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation (chat template applied when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None))
    ids = ids.to(model.get_input_embeddings().weight.device)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def load_for_eval(path: str | None, checkpoint: str = "best", dtype: str | None = None, device: str | None = None):
    """A run dir (its base model + trained tensors of `checkpoint`, placed as the run was: its dtype and device
    unless given) or any model (dtype default fp32, device default auto, streamed if it does not fit as training
    would) -> (model, tokenizer, run config or None)."""
    from .config import load_config
    from .engine import place_model
    from .methods import load_for_training
    from .model import DTYPES, load_model, resolve_device, resolve_source
    from .run import RunDir, is_run_dir, load_trained

    if path and is_run_dir(path):
        cfg = load_config(str(Path(path) / "config.yaml"))
        cfg.dtype = dtype or cfg.dtype
        cfg.device = device or cfg.device
        model, tokenizer, method = load_for_training(cfg)
        load_trained(RunDir(path).checkpoint(checkpoint), method.targets)
        method.close()  # a plain model from here on: no hooks, nothing requires grad
        return model, tokenizer, cfg
    if path and not Path(resolve_source(path)).exists():
        raise ValueError(f"model {path} does not exist")
    model, tokenizer = load_model(path, dtype=DTYPES[dtype or "fp32"])
    place_model(model, resolve_device(device or "auto"))
    return model, tokenizer, None


def eval_config(cfg=None, batch_size: int | None = None, max_length: int | None = None,
                template: str | None = None):
    """The TrainConfig an evaluation scores with: the run's (`cfg`, else the defaults) with the eval batch size,
    max_length and template given (None: the run's) applied."""
    import dataclasses

    from .config import TrainConfig

    ecfg = cfg or TrainConfig()
    return dataclasses.replace(ecfg, **{k: v for k, v in (("eval_batch_size", batch_size), ("max_length", max_length),
                                                            ("template", template)) if v is not None})


def sentiment_items(ecfg, split: str, seed: int) -> list:
    """The built-in sentiment `split` (dev / test) of `seed`, sized and prompted as `ecfg` (a TrainConfig) says."""
    from . import data as D

    if split not in ("dev", "test"):
        raise ValueError(f"split must be dev or test (got {split!r})")
    return D.sentiment_splits(seed, ecfg.n_train, ecfg.n_dev, ecfg.n_test,
                              template=D.SENTIMENT_TEMPLATES[ecfg.template])[split]


def task_items(task: str, data, split: str, seed: int | None, cfg, ecfg) -> tuple[list, str]:
    """(the classification examples of `task`, what they are: 'sentiment test' or 'TASK ROWS.jsonl').
    task: 'sentiment' (the `split` of `seed`, default the run's, else 0) or a task .yaml over `data`: a data source
    path or (location, row) pairs."""
    from . import data as D

    if task == "sentiment":
        seed = seed if seed is not None else (cfg.seed if cfg else 0)
        return sentiment_items(ecfg, split, seed), f"sentiment {split}"
    if data is None:
        raise ValueError(f"task {task} needs data: rows or a data source path")
    if isinstance(data, (str, os.PathLike)):
        return D.load_task_examples(D.load_task_yaml(task), data), f"{task} {Path(data).name}"
    return D.task_examples(D.load_task_yaml(task), data, "eval_data"), f"{task} eval_data"


@dataclass
class Evaluation:
    """What evaluate_model measured: `metrics` of the task (accuracy, loss, predicted: each class's prediction rate,
    n: the examples; None without a task) on `about` ('sentiment test', 'TASK ROWS.jsonl'), the `predictions` file
    written, the `generations` (prompt, continuation), the `perplexity` of the text (None unless asked) and the
    `text` file it read (None for a text given as a string)."""

    metrics: dict | None = None
    about: str = ""
    predictions: Path | None = None
    generations: list[tuple[str, str]] = field(default_factory=list)
    perplexity: float | None = None
    windows: int | None = None  # of the perplexity: nseq, or fewer when the text is shorter
    text: Path | None = None


def evaluate_model(model=None, tokenizer=None, *, cfg=None, checkpoint: str = "best", dtype: str | None = None,
                   device: str | None = None, task: str | None = None, data=None, split: str = "test",
                   seed: int | None = None, template: str | None = None, max_length: int | None = None,
                   batch_size: int | None = None, predictions: str | os.PathLike | None = None,
                   prompts: list[str] | tuple[str, ...] = (), max_new_tokens: int = 40, ppl: bool = False,
                   text: str | None = None, text_file: str | os.PathLike | None = None, seqlen: int = 256,
                   nseq: int = 8) -> Evaluation:
    """Score a model, in this order: accuracy on `task` (task_items; with `predictions` also each example's
    candidate scores as jsonl there), greedy continuations of `prompts`, and with `ppl` perplexity on `text` (else
    the file `text_file`, default the shipped Hamlet) in `nseq` windows of `seqlen` tokens, `batch_size` (default
    4) per forward.

    model: a path load_for_eval takes (a run dir at `checkpoint`, placed in `dtype` on `device`; any model; None:
    the embedded SmolLM2) or an nn.Module with its `tokenizer` and run config `cfg` (or None). Task settings
    (template, max_length, eval batch size, seed) default to the run's, else TrainConfig's."""
    from . import data as D
    from .model import default_text_path
    from .objective import evaluate as score

    if ppl:
        check_windows(seqlen, nseq)
    if predictions:  # before anything loads: never an input, never a file this command did not write
        predictions = guard_file(predictions, eval_inputs(model, task, data), what="--predictions",
                                 own_keys=("index", "label", "pred", "scores"))
    if model is None or isinstance(model, (str, os.PathLike)):
        model, tokenizer, cfg = load_for_eval(None if model is None else str(model), checkpoint, dtype, device)
    elif tokenizer is None:
        raise TypeError("evaluate(model) with an nn.Module needs its tokenizer")
    ecfg = eval_config(cfg, batch_size, max_length, template)
    out = Evaluation()
    was_training = model.training
    model.eval()
    try:
        if task is not None:
            items, out.about = task_items(task, data, split, seed, cfg, ecfg)
            scores = [] if predictions else None
            m = score(model, "classification", items, tokenizer, ecfg.max_length, ecfg.eval_batch_size,
                      scores=scores)
            out.metrics = {**m, "n": len(items)}
            if scores is not None:
                out.predictions = write_predictions(predictions, items, scores)
        out.generations = [(prompt, generate(model, tokenizer, prompt, max_new_tokens)) for prompt in prompts]
        if ppl:
            if text is None:
                out.text = Path(text_file) if text_file else default_text_path()
                if not out.text.is_file():
                    raise ValueError(f"text file {out.text} does not exist")
                text = D.read_utf8(out.text, "text file")
            out.perplexity, out.windows = perplexity(model, tokenizer, text, seqlen=seqlen, nseq=nseq,
                                                     batch_size=batch_size or 4)
    finally:
        model.train(was_training)
    return out


def eval_inputs(model, task, data) -> list:
    """The paths an evaluation reads, which its outputs must never be or be inside: the model (for a run directory
    also its base model), the task file and the data."""
    from .run import is_run_dir

    paths = [v for v in (model, task, data) if isinstance(v, (str, os.PathLike)) and os.path.exists(v)]
    if isinstance(model, (str, os.PathLike)) and is_run_dir(model):
        from .config import load_config

        base = load_config(str(Path(model) / "config.yaml")).model
        paths += [base] if base and os.path.exists(base) else []
    return paths


def write_predictions(path, items: list, scores: list) -> Path:
    """Each example's label, prediction and candidate scores (mean log-prob per token) as jsonl at `path`."""
    import json

    if len(scores) != len(items):
        raise ValueError("--predictions needs the examples scored in one process (not under torchrun)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, "".join(json.dumps({"index": i, "label": e.label, "pred": max(range(len(s)), key=s.__getitem__),
                                        "scores": s}) + "\n" for i, (e, s) in enumerate(zip(items, scores))))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the same examples as an lm-evaluation-harness task

LM_EVAL_METRICS = ("acc", "acc_norm")
LM_EVAL_HEAD = "# written by qzo2 eval --lm-eval-task"  # the task YAML's first line: what marks it as ours


def lm_eval_task_name(task: str, data, split: str, seed: int | None, template: str) -> str:
    """qzo2_sentiment_test (qzo2_sentiment_sst2_test for another template), qzo2_TASK_ROWS for a task file."""
    import re

    if task == "sentiment":
        parts = ["sentiment"] + ([template] if template != "review" else []) + [split]
        if seed is not None and split != "test":  # the test split is the same for every seed
            parts.append(f"seed{seed}")
    else:
        parts = [Path(task).stem, Path(data).stem]
    return re.sub(r"[^A-Za-z0-9_]+", "_", "_".join(["qzo2"] + parts)).strip("_")


def write_lm_eval_task(out_dir, items: list, name: str, about: str = "") -> Path:
    """Write classification examples as an lm-evaluation-harness (0.4) task: OUT_DIR/NAME.yaml over OUT_DIR/NAME.jsonl
    (rows {"prompt", "label"}, the prompt exactly as qzo2 scores it), for `lm_eval --include_path OUT_DIR --tasks
    NAME`. Returns the YAML's path.

    The mapping: doc_to_text is the prompt column as is (no Jinja rendering, no stripping); doc_to_choice the
    candidates as written (leading spaces included) with target_delimiter "" (lm-eval's default " " would add a
    second space); doc_to_target the label index; no few-shot examples, no description. lm-eval then scores
    log P(candidate | prompt) with the candidate tokenized as ids(prompt + candidate) minus ids(prompt), BOS as the
    tokenizer adds it: qzo2's split (data.encode_prompt_and_candidates). Its `acc` takes the argmax of the summed
    log-probs, qzo2 of the per-token mean, so they are the same metric when every candidate is one token after
    the prompt (every built-in template with SmolLM2's tokenizer); `acc_norm` divides by the candidate's
    characters instead, and equals them too when all candidates have the same length (" negative"/" positive").
    See lm_eval_caveats for what to check with a given tokenizer.
    """
    import json

    import yaml

    out_dir = Path(out_dir)
    if not items:
        raise ValueError("no examples to write")
    candidates = list(items[0].candidates)
    if any(list(e.candidates) != candidates for e in items):
        raise ValueError("an lm-eval task needs the same candidates for every example")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = out_dir / f"{name}.jsonl"
    write_file(rows, "".join(json.dumps({"prompt": e.prompt, "label": int(e.label)}, ensure_ascii=False) + "\n"
                             for e in items))
    task = {
        "task": name,
        "dataset_path": "json",  # datasets' packaged JSON builder: reads the local file, nothing is downloaded
        "dataset_kwargs": {"data_files": {"test": str(rows.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",  # a column name: the prompt as is
        "doc_to_target": "label",
        "doc_to_choice": candidates,
        "target_delimiter": "",  # the candidates carry their own leading space
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in LM_EVAL_METRICS],
        "metadata": {"version": 1.0},
    }
    path = out_dir / f"{name}.yaml"
    head = (f"{LM_EVAL_HEAD}: {len(items)} examples of {about or name}; `acc` is qzo2's\n"
            f"# accuracy when every candidate is one token after the prompt (see qzo2.evaluation.write_lm_eval_task)\n")
    write_file(path, head + yaml.safe_dump(task, sort_keys=False, allow_unicode=True, width=1000))
    return path


def lm_eval_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval 0.4's HFLM splits a request for a causal model: trailing whitespace
    of the context moves to the continuation, then ids(whole) is cut after ids(context), the tokenizer's own special
    tokens on both (lm_eval.api.model.TemplateLM._encode_pair)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def lm_eval_caveats(items: list, tokenizer, max_length: int) -> list[str]:
    """Why lm-eval's `acc` could differ from qzo2's accuracy on these examples with this tokenizer ([] if nothing):
    a candidate of several tokens after some prompt (qzo2 averages its log-probs, lm-eval sums them), a request
    lm-eval tokenizes otherwise than qzo2 beyond a prefix shared by the candidates (the whitespace a prompt ends
    with, which lm-eval scores as part of every candidate, adds the same term to each), or a prompt qzo2 cuts to
    max_length (lm-eval only cuts at the model's context)."""
    from . import data as D

    multi, split, cut = set(), 0, 0
    for e in items:
        prefix, body, cands = D.encode_prompt_and_candidates(tokenizer, e.prompt, e.candidates)
        multi.update(c for c, ids in zip(e.candidates, cands) if len(ids) > 1)
        cut += len(prefix) + len(body) + max(map(len, cands)) > max_length
        theirs = [lm_eval_split(tokenizer, e.prompt, c) for c in e.candidates]
        shared = {(tuple(ctx + cont[:len(cont) - len(ours)]), cont[len(cont) - len(ours):] == ours)
                  for (ctx, cont), ours in zip(theirs, cands)}
        split += len(shared) != 1 or shared != {(tuple(prefix + body), True)}
    out = []
    if multi:
        out.append(f"candidates {sorted(multi)} are several tokens after the prompt: qzo2 ranks candidates by their "
                   f"mean log-prob per token, lm-eval's acc by the sum (acc_norm by the sum per character), so they "
                   f"can disagree")
    if split:
        out.append(f"lm-eval tokenizes {split} of {len(items)} examples otherwise than qzo2 (a merge across the "
                   f"prompt's end): their scores can differ")
    if cut:
        out.append(f"{cut} of {len(items)} prompts are longer than max_length {max_length}, which qzo2 cuts from "
                   f"the left and lm-eval does not: raise --max-length to compare")
    return out


@dataclass
class LmEvalTask:
    """What write_lm_eval wrote: the task `name`, its YAML at `path`, `n` examples of `about`; `model_dir`: the
    plain model directory given, to score on it (None: a run or no directory, whose export is to be scored);
    `caveats`: lm_eval_caveats with the model's tokenizer (None: no tokenizer directory to check with)."""

    name: str
    path: Path
    n: int
    about: str
    model_dir: str | None
    caveats: list[str] | None


def write_lm_eval(out_dir, model: str | None = None, *, task: str, data=None, split: str = "test",
                  seed: int | None = None, template: str | None = None,
                  max_length: int | None = None) -> LmEvalTask:
    """The examples evaluate_model would score on `task` (settings as there: a run dir's by default) as an
    lm-evaluation-harness task in `out_dir` (write_lm_eval_task). The model is not loaded; its tokenizer is, when
    it is a directory, to check the mapping (lm_eval_caveats)."""
    from .config import load_config
    from .model import load_tokenizer, resolve_source
    from .run import is_run_dir

    cfg = load_config(str(Path(model) / "config.yaml")) if model and is_run_dir(model) else None
    ecfg = eval_config(cfg, None, max_length, template)
    items, about = task_items(task, data, split, seed, cfg, ecfg)
    name = lm_eval_task_name(task, data, split, seed, ecfg.template)
    inputs = eval_inputs(model, task, data)  # the two files: never an input, only new or this command's own
    guard_file(Path(out_dir) / f"{name}.jsonl", inputs, own_keys=("prompt", "label"), what="--lm-eval-task")
    guard_file(Path(out_dir) / f"{name}.yaml", inputs, own_head=LM_EVAL_HEAD, what="--lm-eval-task")
    path = write_lm_eval_task(out_dir, items, name, about)
    try:
        source = Path(resolve_source(cfg.model if cfg else model))
        tokenizer = load_tokenizer(source) if source.is_dir() else None
    except (OSError, ValueError):
        tokenizer = None
    return LmEvalTask(name, path, len(items), about, str(model) if model and not cfg and Path(model).is_dir() else None,
                      None if tokenizer is None else lm_eval_caveats(items, tokenizer, ecfg.max_length))
