"""One flat training config: a YAML recipe plus key=value overrides, validated with one clear error per problem."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def parse_size(text: str) -> int:
    """"8GiB", "500MB", "1.5gb", "4096" -> bytes (kB/MB/GB/TB are binary units, like KiB/MiB/GiB/TiB)."""
    units = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    t = str(text).strip().lower().replace(" ", "")
    try:
        for u in sorted(units, key=len, reverse=True):
            if t.endswith(u):
                n = float(t[: -len(u)]) * units[u]
                break
        else:
            n = float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a size like 8GiB or 500MB") from None
    if not 0 < n < float("inf"):
        raise ValueError(f"{text!r} is not a positive size")
    return int(n)


def _f(default, help: str, choices: tuple | None = None, range: str | None = None):
    """A config key: its default, help, and the values it takes (`choices`, or a numeric `range` such as
    "(0, inf)" or "[0, 1)": brackets include the end, parentheses exclude it; inf is never a value)."""
    return field(default=default, metadata={"help": help, "choices": choices, "range": range})


def in_range(value, spec: str) -> bool:
    """Whether a number lies in a range like "[0, 1)" (NaN never does)."""
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    above = value >= lo if spec[0] == "[" else value > lo
    below = value <= hi if spec[-1] == "]" else value < hi
    return above and below and math.isfinite(value)


def range_text(spec: str) -> str:
    """"[1, inf)" -> ">= 1", "(0, inf)" -> "> 0", "[0, 1)" -> "in [0, 1)"."""
    lo, hi = (x.strip() for x in spec[1:-1].split(","))
    if hi == "inf":
        return f"{'>=' if spec[0] == '[' else '>'} {lo} and finite"
    return f"in {spec}"


ZO_METHODS = ("qzo", "mezo")
FO_METHODS = ("lomo", "adalomo", "adamw", "hift", "grass")
METHODS = ZO_METHODS + FO_METHODS
RENAMED = {"mezo_params": "params"}  # old key -> new key, still read from recipes and old run directories
REPORT_TO = ("jsonl", "tensorboard", "wandb")  # report_to names (qzo2/tracking.py); jsonl is always written


@dataclass
class TrainConfig:
    # what is trained
    method: str = _f("qzo", "qzo / mezo: zeroth-order on the scales of a quantized model / the weights of an "
                            "unquantized one; lomo, adalomo: first-order with the update fused into backward (LOMO, "
                            "AdaLomo); hift: one group of layers per step (HiFT); adamw: plain first-order AdamW "
                            "(the non-lean reference) -- these train the scales of a quantized model or the weights "
                            "of an unquantized one; grass: row-sparse projected gradients (GRASS), unquantized "
                            "weights only", METHODS)
    model: str = _f("default", "quantized dir (qzo) or HF dir / .gguf (mezo); 'default' = embedded SmolLM2")
    dtype: str = _f("fp32", "activation and non-quantized weight dtype (fp16: first-order methods scale the loss)",
                    ("fp32", "bf16", "fp16"))
    cache_base: str = _f("auto", "qzo on CPU: keep codes-zeros unpacked in fp32 (4 B/weight) to skip unpacking every "
                                 "forward; auto = when it takes < 1/4 of RAM", ("auto", "on", "off"))
    device: str = _f("auto", "where the model computes; auto = cuda when a GPU is available", ("auto", "cpu", "cuda"))
    offload: str = _f("auto", "stream decoder blocks from host memory to the device once per step (qzo: their "
                              "codes; mezo: their bf16/fp32 Linear weights, updated on arrival and copied back -- "
                              "ZO2 mode); auto = only the blocks that do not fit in gpu_memory", ("auto", "on", "off"))
    gpu_memory: str = _f("", "device memory budget for the model, e.g. 8GiB or 500MB; '' = 90% of the GPU's free "
                             "memory (on CPU: no budget, nothing streamed)")
    prefetch_depth: int = _f(2, "offload: device slots uploads are prefetched into (>= 2)", range="[2, inf)")
    trainable: str = _f("", "regex on tensor names: train only matching ones (e.g. 'layers\\.(2[4-9])\\.'); '' = all")
    also_train: str = _f("", "quantized model: comma list of unquantized module kinds trained beside the scales: "
                             "norm (RMSNorm/LayerNorm gains), embedding (and a tied head), linear (an untied head and "
                             "other unquantized Linears); '' = the scales only")
    params: str = _f("linear", "unquantized model: comma list of module kinds whose weights are trained: linear, "
                              "norm, embedding (was mezo_params)")
    # data
    task: str = _f("sentiment", "'sentiment' (built-in Rotten Tomatoes), a task .yaml, or '' for text data")
    template: str = _f("review", "task=sentiment: the prompt; review = 'Review: {text}\\nSentiment (positive or "
                                 "negative):' + negative/positive; sst2 = MeZO's SST-2 prompt '{text} It was' + "
                                 "terrible/great; goodbad = 'Review: {text}\\nThe movie was' + bad/good",
                       ("review", "sst2", "goodbad"))
    objective: str = _f("classification", "tasks: cross-entropy over candidates, or LM loss on the gold answer",
                        ("classification", "lm"))
    train_file: str = _f("", "text rows (text, prompt/completion, messages, alpaca) or task rows: a .jsonl, .json, "
                             ".parquet, .csv, .tsv or .arrow file, a datasets save_to_disk directory, or the name of "
                             "a dataset in the local HF cache (read offline)")
    dev_file: str = _f("", "dev rows for model selection, any source train_file takes (same format)")
    train_split: str = _f("train", "the split of a train_file that has several (save_to_disk DatasetDict, cached "
                                   "dataset)")
    dev_split: str = _f("", "the split of dev_file when it has several (default validation); with no dev_file, "
                            "the split of train_file's dataset used as dev")
    dev_fraction: float = _f(0.0, "with neither dev_file nor dev_split: this share of the train rows, drawn with "
                                  "the seed, held out as dev (0 = no dev set)", range="[0, 1)")
    columns: str = _f("", "FIELD=COLUMN,...: take qzo2's fields (text, prompt, completion, messages, instruction, "
                          "input, output, or a task's fields and label) from these source columns; only mapped "
                          "columns are kept (YAML: a mapping)")
    n_train: int = _f(1000, "sentiment: training examples", range="[1, inf)")
    n_dev: int = _f(500, "sentiment: dev examples (model selection)", range="[0, inf)")
    n_test: int = _f(500, "sentiment: test examples (`qzo2 eval --split test`)", range="[0, inf)")
    max_length: int = _f(256, "tokens per row (prompts are cut from the left for tasks, rows from the right for text)", range="[1, inf)")
    train_on_prompt: bool = _f(False, "text data: also take the loss on prompt tokens")
    # optimization (QZO paper defaults: lr 1e-7, eps 1e-3, batch 16, C 100, constant lr)
    steps: int = _f(1000, "optimization steps", range="[1, inf)")
    batch_size: int = _f(16, "examples per step (each seen 2*n_pairs times in one batched forward)", range="[1, inf)")
    lr: float = _f(1e-6, "peak learning rate", range="(0, inf)")
    lr_schedule: str = _f("constant", "learning-rate schedule after warmup", ("constant", "linear", "cosine"))
    warmup_steps: int = _f(0, "linear warmup steps", range="[0, inf)")
    eps: float = _f(1e-3, "perturbation size epsilon", range="(0, inf)")
    n_pairs: int = _f(1, "independent +-eps pairs per step, averaged", range="[1, inf)")
    clip: float = _f(100.0, "DDC: clip the projected gradient to [-clip, clip] (with zo_normalize: in units of its "
                            "running RMS, e.g. 3); 0 disables", range="[0, inf)")
    zo_parallel: str = _f("batch", "ZO under torchrun / accelerate launch: batch = each rank runs the 2k chunks on its "
                                   "slice of every step's batch (batch_size stays the global batch); pairs = each "
                                   "rank runs the whole batch for the pairs j with j mod ranks == rank (raise "
                                   "n_pairs with the ranks: at least one pair each)", ("batch", "pairs"))
    zo_normalize: bool = _f(False, "ZO: divide each step's projected gradients by their running RMS (EMA of d^2, "
                                   "FZOO/MEAZO style): a scale-free step whose lr transfers")
    zo_rms_beta: float = _f(0.9, "ZO, zo_normalize: decay of the running mean of d^2", range="[0, 1)")
    zo_mask: str = _f("none", "ZO: perturb and update only a fixed subset: magnitude = the smallest-magnitude "
                              "entries (Sparse-MeZO), fisher = the largest diagonal Fisher from a gradient pass over "
                              "zo_mask_samples examples at batch 1 (SensZOQ); the rest stays bitwise unchanged",
                      ("none", "magnitude", "fisher"))
    zo_mask_fraction: float = _f(0.01, "ZO, zo_mask: fraction of the trained entries in the mask", range="(0, 1]")
    zo_mask_samples: int = _f(32, "ZO, zo_mask=fisher / zo_subspace: training examples of the one-off gradient "
                                   "pass (batch 1)", range="[1, inf)")
    zo_subspace: int = _f(0, "ZO: perturb only within the span of the per-example gradients of that one-off pass "
                             "(an orthonormal basis of up to this many directions, over the masked entries); 0 = off", range="[0, inf)")
    zo_orthogonal: bool = _f(False, "ZO, zo_subspace: the n_pairs directions of a step are orthogonal (rows of a random "
                                    "rotation of the subspace) instead of i.i.d.; n_pairs = zo_subspace gives the "
                                    "exact finite-difference gradient on the subspace")
    zo_precondition: str = _f("none", "ZO, zo_subspace: adam = a diagonally preconditioned basis P = D^1/2 Q, Q an "
                                      "orthonormal basis of the D^1/2-scaled gradients, D = 1/(s + 0.1 mean(s)) with s "
                                      "each entry's RMS gradient in the one-off pass (Adam's second moment): a "
                                      "full-rank step along the subspace gradient is then -D grad, Adam's direction, "
                                      "not the gradient's", ("none", "adam"))
    zo_one_sided: bool = _f(False, "ZO: probe one-sided, d_j = (L(theta+eps*z_j) - L(theta))/eps, from k+1 chunks of the "
                                   "batched forward instead of 2k (FZOO style; with n_pairs 8: 9 chunks, not 16)")
    zo_track: float = _f(0.0, "ZO, zo_subspace: track the subspace gradient across steps instead of stepping along "
                              "each step's own estimate: g += a*mean_j u_j(d_j - u_j.g), theta -= lr*B.g (LMS; one "
                              "r-vector of state; a = 1 from g = 0 is the plain first step); 0 = off", range="[0, 1]")
    scale_floor: float = _f(1e-7, "qzo: scales are clamped at this floor after each update", range="[0, inf)")
    weight_decay: float = _f(0.0, "theta -= lr*wd*theta on weights, embeddings and scales, not on biases or norm "
                                  "gains (MeZO's reference, HF Trainer); qzo: not allowed (the QZO paper)", range="[0, inf)")
    clip_grad_norm: float = _f(0.0, "first-order: clip the global gradient norm (LOMO/AdaLomo: two backward passes, "
                                    "the first only measures); 0 = off", range="[0, inf)")
    clip_grad_value: float = _f(0.0, "first-order: clip each gradient entry to [-v, v]; 0 = off", range="[0, inf)")
    loss_scale_window: int = _f(1000, "first-order, dtype=fp16: dynamic loss scale (from 2^16), halved and the step "
                                      "skipped on overflow, doubled after this many overflow-free steps", range="[1, inf)")
    gradient_accumulation_steps: int = _f(1, "adamw: micro-batches per step (batch_size is the whole step's); the "
                                             "fused LOMO/AdaLomo update, HiFT, GRASS and ZO steps cannot accumulate", range="[1, inf)")
    hift_group_size: int = _f(1, "hift: units (embedding, each decoder block, norm + head) trained together per step", range="[1, inf)")
    hift_strategy: str = _f("down2up", "hift: order of the groups: down2up (embedding to head), up2down, random (one "
                                       "seeded permutation)", ("down2up", "up2down", "random"))
    grass_rank: int = _f(64, "grass: rows r of each weight matrix whose projected gradient is trained", range="[1, inf)")
    grass_refresh: int = _f(100, "grass: steps between row selections (each takes one full gradient)", range="[1, inf)")
    grass_select: str = _f("top", "grass: top = the r largest-norm gradient rows; sample = r rows drawn with "
                                  "probability proportional to their norm, unbiased scaling", ("top", "sample"))
    grass_reset: bool = _f(True, "grass: restart the r x n Adam moments at each row selection (else keep the rows "
                                 "that stay selected)")
    grass_scale: float = _f(1.0, "grass: scale alpha of the row update", range="(0, inf)")
    max_skips: int = _f(10, "stop with an error after this many consecutive non-finite steps", range="[1, inf)")
    seed: int = _f(0, "seed of the data order, the perturbations and the sentiment splits")
    # evaluation, logging, checkpoints
    eval_every: int = _f(100, "dev evaluation every N steps (0: only at the end)", range="[0, inf)")
    eval_batch_size: int = _f(16, "examples per evaluation forward", range="[1, inf)")
    log_every: int = _f(10, "metrics.jsonl line every N steps", range="[1, inf)")
    save_every: int = _f(100, "checkpoint every N steps (and at the end)", range="[1, inf)")
    keep_last: int = _f(2, "checkpoints kept besides the best one", range="[0, inf)")
    output_dir: str = _f("runs/qzo2", "run directory: config, metrics, checkpoints, plot")
    overwrite: bool = _f(False, "replace an existing run directory (only a run dir or an empty one) instead of "
                                "resuming from it; the old run is removed only once the new one has started")
    progress: bool = _f(True, "show a progress bar")
    report_to: str = _f("jsonl", "comma list of where the metrics go: jsonl (metrics.jsonl, always written), "
                                 "tensorboard (RUN/tensorboard), wandb (RUN/wandb, offline unless WANDB_MODE "
                                 "says otherwise); the extras need pip install 'qzo2[track]'")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, choices, span = getattr(self, f.name), f.metadata.get("choices"), f.metadata.get("range")
            if not isinstance(value, TYPES[f.type]) or (f.type != "bool" and isinstance(value, bool)):
                raise ConfigError(f"{f.name} expects {f.type}, got {value!r}")
            if choices and value not in choices:
                raise ConfigError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
            if span and not in_range(value, span):
                raise ConfigError(f"{f.name} must be {range_text(span)} (got {value})")
        if self.trainable:
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise ConfigError(f"trainable={self.trainable!r} is not a valid regular expression ({e})") from None
        if self.gpu_memory:
            try:
                parse_size(self.gpu_memory)
            except ValueError as e:
                raise ConfigError(f"gpu_memory={e}") from None
        if self.dev_fraction and (self.dev_file or self.dev_split or self.task == "sentiment"):
            raise ConfigError("dev_fraction carves a dev set out of train_file when there is no other: not with "
                              "dev_file, dev_split or task=sentiment (whose dev set is n_dev)")
        if not self.task and not self.train_file:
            raise ConfigError("set task (e.g. task=sentiment) or train_file=PATH.jsonl")
        if self.gradient_accumulation_steps > 1:
            why = {"lomo": "LOMO updates each tensor inside backward, as soon as its gradient exists, so there is "
                           "nothing to accumulate into", "qzo": "a ZO step is one forward of the whole batch",
                   "mezo": "a ZO step is one forward of the whole batch"}
            why["adalomo"] = why["lomo"].replace("LOMO", "AdaLomo")
            why["hift"] = "each step trains another group of layers, so gradients of one group never add up"
            why["grass"] = "each step's rows are selected and updated within the step"
            if self.method in why:
                raise ConfigError(f"gradient_accumulation_steps > 1 does not work with method={self.method}: "
                                  f"{why[self.method]}; raise batch_size instead")
            if self.batch_size % self.gradient_accumulation_steps:
                raise ConfigError(f"batch_size {self.batch_size} is not a multiple of gradient_accumulation_steps "
                                  f"{self.gradient_accumulation_steps}")
        if self.method not in ZO_METHODS and self.zo_parallel != "batch":
            raise ConfigError(f"zo_parallel is for zeroth-order methods (qzo, mezo), not {self.method}")
        if self.method not in ZO_METHODS and (self.zo_normalize or self.zo_mask != "none" or self.zo_subspace):
            raise ConfigError(f"zo_normalize / zo_mask are for zeroth-order methods (qzo, mezo), not {self.method}")
        if self.zo_precondition != "none" and not self.zo_subspace:
            raise ConfigError("zo_precondition shapes the basis of zo_subspace: set zo_subspace too")
        if self.zo_orthogonal and not self.zo_subspace:
            raise ConfigError("zo_orthogonal chooses the directions inside zo_subspace: set zo_subspace too")
        if self.zo_one_sided and self.method not in ZO_METHODS:
            raise ConfigError(f"zo_one_sided is for zeroth-order methods (qzo, mezo), not {self.method}")
        if self.zo_one_sided and self.zo_parallel == "pairs":
            raise ConfigError("zo_one_sided shares one unperturbed chunk among the pairs: use zo_parallel=batch")
        if self.zo_track and not self.zo_subspace:
            raise ConfigError("zo_track estimates the gradient inside zo_subspace: set zo_subspace too")
        if self.method in ZO_METHODS and (self.clip_grad_norm or self.clip_grad_value):
            raise ConfigError("clip_grad_norm / clip_grad_value are for first-order methods; zeroth-order steps clip "
                              "the projected gradient with clip (DDC)")
        if self.weight_decay and self.method == "qzo":
            raise ConfigError("weight_decay is not for method=qzo: QZO trains the scales without weight decay (as "
                              "the QZO paper), so set weight_decay=0")
        if self.method == "grass" and self.dtype == "fp16":  # its row-sparse backward has no loss scaler
            raise ConfigError("method=grass does not scale the loss, which fp16 needs: use dtype=bf16 or fp32")
        unknown = [n for n in self.report_to.split(",") if n.strip() and n.strip().lower() not in REPORT_TO]
        if unknown:
            raise ConfigError(f"report_to: unknown {', '.join(repr(n.strip()) for n in unknown)}; a comma list of "
                              f"{', '.join(REPORT_TO)} (metrics.jsonl is always written)")
        check_output_dir(self.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
PATH_KEYS = ("model", "train_file", "dev_file", "task", "output_dir")  # stored resolved in a run directory
SYMBOLIC = {"model": ("default",), "task": ("sentiment",)}  # values of PATH_KEYS that are names, not paths
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow")
MEMORY = "memory:"  # a train_file / dev_file of rows handed over in memory (the Python API): "memory:<sha256>"


def is_symbolic(key: str, value: str) -> bool:
    """A value of a PATH_KEY that is a name, not a path: 'default', 'sentiment', rows in memory, or a data source
    that is no file or directory here and reads as a dataset name ('rotten_tomatoes', 'org/name')."""
    if value in SYMBOLIC.get(key, ()) or value.startswith(MEMORY):
        return True
    if not value or key not in ("train_file", "dev_file") or os.path.exists(os.path.expanduser(value)):
        return False
    if value.endswith(DATA_SUFFIXES) or value.startswith((".", "~", "/")) or value.count("/") > 1:
        return False
    return not ("/" in value and os.path.isdir(value.split("/")[0]))  # data/train: a path into a local directory


def check_output_dir(value: str) -> None:
    """Refuse an output_dir that would put a run into (and, with overwrite, empty) the current, home or root
    directory: an unset shell variable (`output_dir=`), `~`, `.` or `/`."""
    text = str(value).strip()
    if not text:
        raise ConfigError("output_dir is empty; give a run directory such as runs/NAME")
    path = Path(text).expanduser().resolve()
    special = {Path.cwd().resolve(): "the current directory", Path.home().resolve(): "the home directory",
               Path(path.anchor): "the filesystem root"}
    if path in special:
        raise ConfigError(f"output_dir={value!r} is {special[path]}; give a run directory such as runs/NAME")


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """A copy with model/train_file/dev_file/task/output_dir as absolute paths (~ expanded), so a run directory
    works from any working directory; names ('default', 'sentiment') and '' stay as they are."""
    values = {}
    for key in PATH_KEYS:
        v = getattr(cfg, key)
        if v and not is_symbolic(key, v):
            values[key] = os.path.abspath(os.path.expanduser(v))
    return dataclasses.replace(cfg, **values)


TYPES = {"bool": bool, "int": int, "float": (int, float), "str": str}


def _coerce(name: str, value):
    """A value for key `name` by the key's type: text (a key=value override, a recipe scalar: the text as typed)
    is parsed as that type; a string key keeps its text (`output_dir=010` is the directory 010, not 8)."""
    kind = FIELDS[name].type
    bad = ConfigError(f"{name} expects {'true/false' if kind == 'bool' else kind}, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise bad
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad  # steps=true is not 1
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise bad from None
        if kind == "float":
            return float(number)
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)  # exact, however large
        if not math.isfinite(number) or not float(number).is_integer():
            raise bad
        return int(number)
    if name == "columns" and isinstance(value, dict):  # YAML `columns: {text: review}` -> "text=review"
        return ",".join(f"{k}={v}" for k, v in value.items())
    if name == "report_to" and isinstance(value, list):  # YAML `report_to: [jsonl, tensorboard]`
        return ",".join(str(v) for v in value)
    if value is None:
        return ""
    if isinstance(value, bool) and "on" in (FIELDS[name].metadata["choices"] or ()):
        return "on" if value else "off"  # the API's offload=True
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{name} expects text, got {value!r} (quote it in YAML: {name}: '...')")
    return str(value)


class _TextLoader(yaml.SafeLoader):
    """YAML for recipes and config.yaml: scalars stay the text as typed (the key's type parses it, see _coerce:
    `output_dir: 010` stays '010', `offload: on` stays 'on'), null is None, and a key given twice is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


for _tag in ("bool", "int", "float", "timestamp"):
    _TextLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", yaml.SafeLoader.construct_yaml_str)


def read_yaml(path: Path, what: str = "recipe"):
    """A YAML file as _TextLoader reads it; a bad file is one ConfigError line naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); give a YAML file") from None
    try:
        return yaml.load(text, Loader=_TextLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} {path}{where}: invalid YAML: {problem}") from None


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then constant / linear decay to 0 / cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def renamed(values: dict) -> dict:
    """Old key names (RENAMED) mapped to the current ones."""
    return {RENAMED.get(k, k): v for k, v in values.items()}


def _check_key(name: str, where: str) -> None:
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown key {name!r} in {where}{hint}; `qzo2 train --help` lists them")


def load_config(recipe: str | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML recipe (flat mapping) then `key=value` overrides -> validated TrainConfig."""
    values: dict = {}
    if recipe:
        path = Path(recipe)
        if path.is_dir():
            raise ConfigError(f"recipe {recipe} is a directory; give a YAML file such as recipes/sentiment.yaml")
        if not path.is_file():
            raise ConfigError(f"recipe {recipe} does not exist")
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{recipe}: a recipe is a mapping of key: value")
        for k, v in renamed({str(k): v for k, v in data.items()}).items():
            _check_key(k, recipe)
            values[k] = _coerce(k, v)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        k = RENAMED.get(k, k)
        _check_key(k, "overrides")
        values[k] = _coerce(k, v)  # the text as typed, parsed by the key's type
    return TrainConfig(**values)


def config_yaml(cfg: TrainConfig) -> str:
    """The config as YAML a recipe can be (every key, in declaration order): what `qzo2 train --print-config` shows."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def keys_help() -> str:
    lines = ["keys (recipe YAML or key=value):"]
    for name, f in FIELDS.items():
        lines.append(f"  {name:<16} {str(f.default)!r:<22} {f.metadata['help']}")
    return "\n".join(lines)
