"""The method registry: every training method declares itself here, in its own module, with `register`.

A method is one file (qzo2/methods/<name>.py): a `base.Method` subclass, its options (a dataclass of the config keys
only it reads, declared with `config._f`), and one `@register(...)` naming it and saying what it can do. The config,
`qzo2 train --help`, recipe loading, resume checks, model loading and `qzo2 bench` read this table; nothing outside
qzo2/methods/ names a method. docs/architecture.md walks through adding one.

This module imports nothing heavy: `qzo2.config` asks it about keys before any model code is loaded.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TRAINS = ("scales", "weights")  # what a method can train: the scales of a quantized model, the weights of a dense one


@dataclass(frozen=True)
class BenchMode:
    """One `qzo2 bench --mode`: the step of its method on a random model built as said."""

    quantized: bool  # int4 model (the step trains its scales) or a dense one (its Linear weights)
    offload: bool = False  # every decoder block streamed from host memory (codes, or the weights in ZO2 mode)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type  # the base.Method subclass: cls(model, cfg, targets, kind)
    help: str  # one line for `qzo2 train --help`
    options: type | None = None  # dataclass of the method's own config keys (config._f fields), or None
    trains: tuple = TRAINS  # a subset of TRAINS
    first_order: bool = False  # needs a backward pass (streamed blocks stream again through it, checkpointed)
    accumulates: str | bool = True  # gradient_accumulation_steps > 1 works; a str says why it cannot
    multi_rank: bool = True  # runs under torchrun / accelerate launch
    bench: dict = field(default_factory=dict)  # bench mode name -> BenchMode
    memory: str = ""  # what it keeps besides the model, for the docs and --help


_SPECS: dict[str, MethodSpec] = {}


def register(name: str, **spec):
    """Class decorator: `@register("toy", help="...", options=ToyOptions, trains=("weights",))` adds the method
    `name` (keyword arguments as MethodSpec's). A class may be registered under several names (qzo and mezo are one
    class); the options of every method share one key namespace, so a key two methods declare must be the same key
    (same type and default), which a shared options base class gives."""

    def add(cls):
        s = MethodSpec(name=name, cls=cls, **spec)
        bad = set(s.trains) - set(TRAINS)
        if bad or not s.trains:
            raise ValueError(f"method {name}: trains must be a non-empty subset of {TRAINS}, got {s.trains}")
        if s.options is not None:
            for f in dataclasses.fields(s.options):
                for other in _SPECS.values():
                    o = {g.name: g for g in dataclasses.fields(other.options)} if other.options else {}
                    if f.name in o and (o[f.name].type, o[f.name].default) != (f.type, f.default):
                        raise ValueError(f"method {name}: key {f.name} is also a key of method {other.name} with "
                                         f"another type or default; share one options class")
        taken = {m: o.name for o in _SPECS.values() for m in o.bench if o.name != name}
        clash = [m for m in s.bench if m in taken]
        if clash:
            raise ValueError(f"method {name}: bench mode {clash[0]} belongs to method {taken[clash[0]]}")
        _SPECS[name] = s
        if "name" not in cls.__dict__:  # Method.name: the (first) name it is registered under
            cls.name = name
        return cls

    return add


def unregister(name: str) -> None:
    """Remove a method (tests that register a throwaway one)."""
    _SPECS.pop(name, None)


def _load() -> dict[str, MethodSpec]:
    """The table, with the built-in methods registered (importing qzo2.methods imports each method module)."""
    import qzo2.methods  # noqa: F401  (registers the built-ins)

    return _SPECS


def specs() -> dict[str, MethodSpec]:
    return dict(_load())


def names() -> tuple[str, ...]:
    return tuple(_load())


def get(name: str) -> MethodSpec:
    table = _load()
    if name not in table:
        raise KeyError(name)
    return table[name]


def option_fields() -> dict[str, tuple[dataclasses.Field, tuple[str, ...]]]:
    """Every method option key -> (its field, the methods that take it), in registration order."""
    out: dict[str, tuple[dataclasses.Field, tuple[str, ...]]] = {}
    for s in _load().values():
        for f in dataclasses.fields(s.options) if s.options else ():
            first, owners = out.get(f.name, (f, ()))
            out[f.name] = (first, owners + (s.name,))
    return out


def bench_modes() -> dict[str, tuple[MethodSpec, BenchMode]]:
    """Every bench mode -> (its method, how its model is built)."""
    return {mode: (s, b) for s in _load().values() for mode, b in s.bench.items()}
