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
    """"8GiB", "500MB", "1.5gb", "1073741824" -> bytes (kB/MB/GB/TB are binary units, like KiB/MiB/GiB/TiB). A
    number without a unit is bytes and must be at least 1 MiB: "24" is refused (24GB was meant)."""
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
            u = None
    except ValueError:
        raise ValueError(f"{text!r} is not a size like 8GiB or 500MB") from None
    if u is None and 0 < n < 1 << 20:
        raise ValueError(f"{text!r} has no unit, so it would be {n:g} bytes; give a unit such as GB or MB")
    if not 1 <= n < float("inf"):
        raise ValueError(f"{text!r} is not a positive size")
    return int(n)


def _f(default, help: str, choices: tuple | None = None, range: str | None = None, experimental: bool = False):
    """A config key: its default, help, and the values it takes (`choices`, or a numeric `range` such as
    "(0, inf)" or "[0, 1)": brackets include the end, parentheses exclude it; inf is never a value).
    `experimental`: an option that measured no gain, kept to reproduce a study (--help marks it)."""
    return field(default=default, metadata={"help": help, "choices": choices, "range": range,
                                            "experimental": experimental})


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


RENAMED = {"mezo_params": "params"}  # old key -> new key, still read from recipes and old run directories
REPORT_TO = ("jsonl", "tensorboard", "wandb")  # report_to names (qzo2/tracking.py); jsonl is always written


def _registry():
    from .methods import registry  # late: the method modules import this one

    return registry


@dataclass(init=False)
class TrainConfig:
    """The run's keys (model, data, schedule, placement, checkpoints) plus `options`, the chosen method's own keys
    (a dataclass its module declares, see qzo2/methods/registry.py). Keys are flat everywhere a user sees them:
    `TrainConfig(method=NAME, key=value, ...)`, recipes, `key=value` overrides and `to_dict()`; `cfg.KEY` reads
    the method's own keys too. A key of another method is refused unless it has its default (old run configs hold every key)."""

    # what is trained
    method: str = _f("qzo", "the training method (the methods and their own keys are listed below)")
    model: str = _f("default", "a quantized dir (its scales are trained) or an HF dir / .gguf (its weights); "
                               "'default' = the embedded SmolLM2")
    dtype: str = _f("fp32", "activation and non-quantized weight dtype (fp16: first-order methods scale the loss)",
                    ("fp32", "bf16", "fp16"))
    cache_base: str = _f("auto", "quantized model on CPU: keep codes-zeros unpacked in fp32 (4 B/weight) to skip unpacking every "
                                 "forward; auto = when it takes < 1/4 of RAM", ("auto", "on", "off"))
    device: str = _f("auto", "where the model computes; auto = cuda when a GPU is available", ("auto", "cpu", "cuda"))
    offload: str = _f("auto", "stream decoder blocks from host memory to the device (a quantized model: their codes, "
                              "once per step for zeroth-order methods, twice for first-order ones: forward, then "
                              "backward with recomputation; a dense one, zeroth-order only: their Linear weights, "
                              "updated on arrival and copied back -- ZO2 mode); auto = only the blocks that do not fit in gpu_memory", ("auto", "on", "off"))
    gpu_memory: str = _f("", "device memory budget for the model, e.g. 8GiB or 500MB; '' = 90% of the GPU's free "
                             "memory (on CPU: no budget, nothing streamed)")
    prefetch_depth: int = _f(2, "offload: device slots uploads are prefetched into (>= 2)", range="[2, inf)")
    trainable: str = _f("", "regex on tensor names: train only matching ones (e.g. 'layers\\.(2[4-9])\\.'); '' = all")
    also_train: str = _f("", "quantized model: comma list of unquantized module kinds trained beside the scales: "
                             "norm (RMSNorm/LayerNorm gains), embedding (and a tied head), linear (an untied head and "
                             "other unquantized Linears); '' = the scales only", experimental=True)
    params: str = _f("linear", "unquantized model: comma list of module kinds whose weights are trained: linear, "
                              "norm, embedding")
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
    # optimization
    steps: int = _f(1000, "optimization steps", range="[1, inf)")
    batch_size: int = _f(16, "examples per step (each seen 2*n_pairs times in one batched forward)", range="[1, inf)")
    lr: float = _f(1e-6, "peak learning rate", range="(0, inf)")
    lr_schedule: str = _f("constant", "learning-rate schedule after warmup", ("constant", "linear", "cosine"))
    warmup_steps: int = _f(0, "linear warmup steps", range="[0, inf)")
    scale_floor: float = _f(1e-7, "quantized model: trained scales are clamped at this floor after each update",
                            range="[0, inf)")
    weight_decay: float = _f(0.0, "theta -= lr*wd*theta on weights, embeddings and scales, not on biases or norm "
                                  "gains (as the HF Trainer)", range="[0, inf)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per step (batch_size is the whole step's), for the "
                                             "methods that can accumulate", range="[1, inf)")
    max_skips: int = _f(10, "stop with an error after this many consecutive non-finite steps", range="[1, inf)")
    seed: int = _f(0, "seed of the data order, the perturbations and the sentiment splits",
                   range="[-9223372036854775808, 18446744073709551616)")  # what torch.manual_seed takes
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

    options: object = field(default=None, repr=False, metadata={"help": "", "internal": True})

    def __init__(self, options=None, **values):
        registry = _registry()
        values = renamed(values)
        method = values.get("method", FIELDS["method"].default)
        if method not in registry.names():
            raise ConfigError(f"method={method!r} is not one of {', '.join(registry.names())}")
        spec = registry.get(method)
        own = _own_keys(method)
        foreign = registry.option_fields()
        chosen = {}
        for k, v in values.items():
            if k in FIELDS:
                setattr(self, k, v)
            elif k in own:
                chosen[k] = v
            elif k in foreign:  # another method's key: harmless at its default (a config that lists every key)
                f, owners = foreign[k]
                if v != f.default:
                    raise ConfigError(f"{k} is a key of method {', '.join(owners)}, not of method={method}: remove "
                                      f"it, or choose one of those methods")
            else:
                _check_key(k, "the config")
        for k, f in FIELDS.items():
            if k not in values:
                setattr(self, k, f.default)
        if options is not None:  # dataclasses.replace passes the current options (of this or another method)
            chosen = {**{k: v for k, v in dataclasses.asdict(options).items() if k in own}, **chosen}
        self.options = spec.options(**chosen) if spec.options else None
        self.__post_init__()

    @classmethod
    def from_saved(cls, values: dict) -> "TrainConfig":
        """The config of a run directory (state.json / config.yaml): runs made before methods had their own keys
        store every method's keys, so the other methods' keys are dropped whatever their value."""
        values = renamed(dict(values))
        if str(values.get("gpu_memory", "")).strip().isdigit():  # saved before a size needed a unit: bytes
            values["gpu_memory"] = f"{str(values['gpu_memory']).strip()}B"
        own, foreign = _own_keys(values.get("method", FIELDS["method"].default)), _registry().option_fields()
        return cls(**{k: v for k, v in values.items() if k not in foreign or k in own})

    def __getattr__(self, name):  # only for names that are not run keys: the method's own keys
        options = self.__dict__.get("options")
        if options is not None and not name.startswith("__") and name in {f.name for f in dataclasses.fields(options)}:
            return getattr(options, name)
        raise AttributeError(f"the config has no key {name!r} (method={self.__dict__.get('method')!r})")

    @property
    def spec(self):
        """The registered method (qzo2/methods/registry.MethodSpec)."""
        return _registry().get(self.method)

    def __post_init__(self):
        for obj in (self, self.options):
            if obj is not None:
                check_fields(obj)
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
            accumulates = self.spec.accumulates
            if accumulates is not True:
                raise ConfigError(f"gradient_accumulation_steps > 1 does not work with method={self.method}: "
                                  f"{accumulates or 'it cannot accumulate'}; raise batch_size instead")
            if self.batch_size % self.gradient_accumulation_steps:
                raise ConfigError(f"batch_size {self.batch_size} is not a multiple of gradient_accumulation_steps "
                                  f"{self.gradient_accumulation_steps}")
        if hasattr(self.options, "validate"):
            self.options.validate(self)
        unknown = [n for n in self.report_to.split(",") if n.strip() and n.strip().lower() not in REPORT_TO]
        if unknown:
            raise ConfigError(f"report_to: unknown {', '.join(repr(n.strip()) for n in unknown)}; a comma list of "
                              f"{', '.join(REPORT_TO)} (metrics.jsonl is always written)")
        check_output_dir(self.output_dir)

    def to_dict(self) -> dict:
        """Every key, flat: the run's, then the method's."""
        own = dataclasses.asdict(self.options) if self.options is not None else {}
        return {**{k: getattr(self, k) for k in FIELDS}, **own}


def _kind(f: dataclasses.Field) -> str:
    """A key's type name ("int", "float", "bool", "str"), whether its annotation is text or a class."""
    return f.type if isinstance(f.type, str) else f.type.__name__


def _own_keys(method: str) -> set[str]:
    """The option keys of a registered method (none for an unknown one)."""
    registry = _registry()
    spec = registry.get(method) if method in registry.names() else None
    return {f.name for f in dataclasses.fields(spec.options)} if spec and spec.options else set()


def check_fields(obj) -> None:
    """Type, choices and range of every key of a config dataclass (TrainConfig or a method's options)."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value, choices, span = getattr(obj, f.name), f.metadata.get("choices"), f.metadata.get("range")
        kind = _kind(f)
        if not isinstance(value, TYPES[kind]) or (kind != "bool" and isinstance(value, bool)):
            raise ConfigError(f"{f.name} expects {kind}, got {value!r}")
        if choices and value not in choices:
            raise ConfigError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
        if span and not in_range(value, span):
            raise ConfigError(f"{f.name} must be {range_text(span)} (got {value})")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}


def key_field(name: str):
    """The field of a key: a run key, or some method's option key."""
    if name in FIELDS:
        return FIELDS[name]
    found = _registry().option_fields().get(name)
    return found[0] if found else None


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
    f = key_field(name)
    kind = _kind(f)
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
    if isinstance(value, bool) and "on" in (f.metadata["choices"] or ()):
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
    if key_field(name) is None:
        close = difflib.get_close_matches(name, list(FIELDS) + list(_registry().option_fields()), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown key {name!r} in {where}{hint}; `qzo2 train --help` lists them")


def load_config(recipe: str | None, overrides: list[str] = (), saved: bool = False) -> TrainConfig:
    """YAML recipe (flat mapping) then `key=value` overrides -> validated TrainConfig. `saved`: the recipe is a run
    directory's config.yaml (see TrainConfig.from_saved)."""
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
    return TrainConfig.from_saved(values) if saved else TrainConfig(**values)


def config_yaml(cfg: TrainConfig) -> str:
    """The config as YAML a recipe can be (every key, in declaration order): what `qzo2 train --print-config` shows."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _key_line(name: str, f) -> str:
    tag = "[experimental] " if f.metadata.get("experimental") else ""
    return f"  {name:<16} {str(f.default)!r:<22} {tag}{f.metadata['help']}"


def keys_help() -> str:
    """`qzo2 train --help`'s key list: the run's keys, the methods, then each method's own keys."""
    registry = _registry()
    lines = ["keys (recipe YAML or key=value):"] + [_key_line(n, f) for n, f in FIELDS.items()]
    lines.append("\nmethods (method=NAME):")
    for s in registry.specs().values():
        trains = " or ".join({"scales": "the scales of a quantized model", "weights": "the weights of a dense model"}[t]
                             for t in s.trains)
        lines.append(f"  {s.name:<16} {s.help} Trains {trains}." + (f" Memory: {s.memory}." if s.memory else ""))
    groups: dict[tuple, list] = {}
    for name, (f, owners) in registry.option_fields().items():
        groups.setdefault(owners, []).append((name, f))
    for owners, keys in groups.items():
        lines.append(f"\nkeys of method {', '.join(owners)}:")
        lines += [_key_line(n, f) for n, f in keys]
    return "\n".join(lines)
