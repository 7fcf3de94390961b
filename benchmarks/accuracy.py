#!/usr/bin/env python
"""The accuracy benchmark of docs/benchmarks.md (SmolLM2-135M + Rotten Tomatoes; results in docs/results.md).

    .venv/bin/python benchmarks/accuracy.py accuracy --seed 0 [--rows fp32,rtn,gptq,qzo,mezo] [key=value ...]
    .venv/bin/python benchmarks/accuracy.py accuracy-table [--rows NAME,...]      # (or `table`) the results.md table
    .venv/bin/python benchmarks/accuracy.py train ROW [--seed S] [--print-config] [key=value ...]  # qzo2 train a row
    .venv/bin/python benchmarks/accuracy.py command ROW [--seed S] [key=value ...]  # print that `qzo2 train` line

Rows: zero-shot fp32 / bf16 / int4 RTN / int4 GPTQ, and one trained row per entry of ROWS. A trained row is
benchmarks/accuracy-base.yaml (what every row shares: task, data sizes, max_length, batch size, steps, schedule,
eval/save/log cadence) plus the row's own key=value overrides below, plus model= (its base: the int4 RTN model,
made by the `rtn` row's `qzo2 quantize`, or the fp32 one), seed= and output_dir=; key=value arguments given to
`accuracy` come last. Each step (quantize, train, export, eval) runs as its own `qzo2` process, so its wall time and
peak RSS are that process's. Run from the repository root (the run directories are under -o, runs/accuracy).
Not part of the library (nothing in qzo2/ imports it); tests/test_bench.py checks that every row's resolved config
is the one recorded in tests/accuracy_rows.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

BASE = Path(__file__).resolve().with_name("accuracy-base.yaml")
OUT = "runs/accuracy"  # the default work and result directory


def _kv(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split())


class Row(NamedTuple):
    name: str  # the row's name in results.jsonl and the table
    base: str  # "rtn": trains the int4 RTN model's scales, exported as GPTQ; "default": the fp32 weights, as HF
    overrides: dict[str, str]  # key -> value, applied to BASE

    @property
    def export(self) -> str:
        return "gptq" if self.base == "rtn" else "hf"

    def args(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides.items()]


# the options the recommended zeroth-order rows share (docs/methods.md): perturb inside the span of 32 per-example
# gradients taken once before step 1 (at batch 1; no backward afterwards), normalized step clipped at 3 RMS
SUBSPACE = _kv("zo_subspace=32 zo_mask_samples=32 zo_normalize=true clip=3 eps=1.0e-3")
# ... with 8 directions a step probed one-sided (9 copies of the batch in one forward instead of 16) and the step along
# the tracked subspace gradient (zo_track 0.1: g += 0.1*mean_j u_j(d_j - u_j.g))
TRACK = _kv("n_pairs=8 zo_one_sided=true zo_track=0.1")
WEIGHTS = _kv("params=linear")  # the rows on fp32 weights: every Linear weight
HIFT = _kv("method=hift hift_group_size=6 hift_strategy=down2up")  # one group of 6 units per step, AdamW inside
QZO_SUBSPACE = {**_kv("method=qzo steps=100 lr=1.0e-2"), **SUBSPACE, "n_pairs": "1"}

ROWS: dict[str, Row] = {  # row key (--rows) -> Row; the lr of each row and how it was chosen: docs/results.md
    # plain QZO: zeroth-order on all int4 scales, one +-eps pair per step, inference memory only
    "qzo": Row("QZO int4 RTN", "rtn", _kv("method=qzo steps=300 lr=4.0e-5 eps=1.0e-3 n_pairs=1 clip=100 "
                                          "eval_every=100 save_every=100")),
    "qzo-subspace": Row("QZO int4 RTN, gradient subspace", "rtn", QZO_SUBSPACE),
    "qzo-track": Row("QZO int4 RTN, subspace, 8 one-sided probes, tracked gradient", "rtn", {**QZO_SUBSPACE, **TRACK}),
    # plain MeZO: full-weight zeroth-order on the unquantized model, fp32 compute (on a CPU without a fast bf16 GEMM,
    # bf16 is much slower: docs/bench.md, CPU kernels)
    "mezo": Row("MeZO fp32", "default", {**_kv("method=mezo"), **WEIGHTS,
                                         **_kv("steps=300 lr=1.0e-6 lr_schedule=constant eps=1.0e-3 weight_decay=0.0 "
                                               "eval_every=100 save_every=100")}),
    # MeZO with the recommended options, perturbed and updated only on a Fisher mask of 1.6% of the weights (1.7M,
    # about as many as the int4 model's scales): two one-off backward passes at batch 1 (the mask, then the subspace)
    "mezo-track": Row("MeZO fp32, Fisher mask 1.6%, subspace, 8 one-sided probes, tracked gradient", "default",
                      {**_kv("method=mezo"), **WEIGHTS, **_kv("steps=100 zo_mask=fisher zo_mask_fraction=0.016"),
                       **SUBSPACE, **_kv("lr=3.0e-2 weight_decay=0.0"), **TRACK}),
    "lomo": Row("LOMO int4 RTN scales", "rtn", _kv("method=lomo lr=1.0e-3")),  # fused update, no optimizer state
    "adalomo": Row("AdaLomo int4 RTN scales", "rtn", _kv("method=adalomo lr=3.0e-3")),  # factored second moment
    "adamw": Row("AdamW int4 RTN scales", "rtn", _kv("method=adamw lr=1.0e-4")),  # the first-order reference
    "lomo-weights": Row("LOMO fp32 weights", "default", {**_kv("method=lomo"), **WEIGHTS, **_kv("lr=3.0e-2")}),
    "adalomo-weights": Row("AdaLomo fp32 weights", "default",
                           {**_kv("method=adalomo"), **WEIGHTS, **_kv("lr=1.0e-3")}),
    "adamw-weights": Row("AdamW fp32 weights", "default",  # the peak-memory reference for LOMO
                         {**_kv("method=adamw"), **WEIGHTS, **_kv("lr=1.0e-5")}),
    "hift": Row("HiFT int4 RTN scales", "rtn", {**HIFT, **_kv("lr=3.0e-4")}),
    "hift-weights": Row("HiFT fp32 weights", "default", {**HIFT, **WEIGHTS, **_kv("lr=1.0e-4")}),
    # Adam on 64 selected rows per matrix (Top-r), the selection refreshed every 50 steps
    "grass": Row("GRASS fp32 weights", "default",
                 {**_kv("method=grass"), **WEIGHTS,
                  **_kv("grass_rank=64 grass_refresh=50 grass_select=top lr=1.0e-4")}),
}
ZERO_SHOT = ("fp32", "bf16", "rtn", "rtn-goodbad", "gptq")
# the rows users compare against, trained by benchmarks/peft_rows.py (peft; same splits, loss, schedule, scoring):
# row key -> (row name, peft_rows.py kind, its key=value overrides of the base recipe)
PEFT_ROWS = {"lora": ("LoRA r16 fp32 weights (peft)", "lora", ["lr=2.0e-4"]),
             "qlora": ("QLoRA r16 NF4 base (peft + bitsandbytes)", "qlora", ["lr=2.0e-4"]),
             "lora-nf4": ("LoRA r16 on the NF4 weights dequantized to fp32 (peft)", "lora-nf4", ["lr=2.0e-4"])}


def shown(path) -> str:
    """A path as a command line shows it: relative to the working directory when it is below it."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def train_args(key: str, seed: int = 0, out: Path | str = OUT, tag: str = "", recipe: str | None = None) -> list[str]:
    """The `qzo2 train` arguments of trained row `key`: BASE and the row's overrides (or another `recipe`, which
    replaces both), then model=, seed= and output_dir= (out/KEY{tag}-seed{seed})."""
    if key not in ROWS:
        raise ValueError(f"unknown row {key!r}; choose from {list(ROWS)}")
    row, out = ROWS[key], Path(out)
    model = str(out / "int4-rtn") if row.base == "rtn" else "default"
    head = [recipe] if recipe else [shown(BASE), *row.args()]
    return head + [f"model={model}", f"seed={seed}", f"output_dir={out / f'{key}{tag}-seed{seed}'}"]


def row_config(key: str, overrides: list[str] = (), seed: int = 0, out: Path | str = OUT):
    """The TrainConfig of trained row `key` (with `overrides` last), as `qzo2 train` resolves it: for the
    experiments/ scripts, which rebuild a row's model and method in process."""
    from qzo2.config import load_config

    recipe, *args = train_args(key, seed, out)
    return load_config(recipe, args + list(overrides))


# Runs the command as its child and writes that child's ru_maxrss (KiB) to argv[2]. A process's ru_maxrss starts at
# the RSS of the process it was forked from (Linux records the old address space's high-water mark at exec), so
# measured straight from this (possibly large) process it would read max(ours, the command's); from this small
# launcher it is the command's own.
_LAUNCH = ("import json, resource, subprocess, sys; rc = subprocess.call(json.loads(sys.argv[1])); "
           "open(sys.argv[2], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")


def run_measured(argv: list[str]) -> dict:
    """Run a command; its wall time, peak RSS (its own, through a small launcher) and output. Raises if it fails."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qzo2-rss-") as tmp:
        rss_file = Path(tmp) / "maxrss"
        proc = subprocess.run([sys.executable, "-c", _LAUNCH, json.dumps(list(map(str, argv))), str(rss_file)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.stdout
        if proc.returncode:
            raise RuntimeError(f"{' '.join(map(str, argv))} failed (exit {proc.returncode}):\n{out[-2000:]}")
        maxrss_kib = int(rss_file.read_text())
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(maxrss_kib / 2**20, 2),
            "output": out}


def _accuracy(output: str) -> float:
    line = [ln for ln in output.splitlines() if " accuracy " in ln][-1]
    return float(line.split(" accuracy ")[1].split()[0])


def bench_accuracy(out: Path, seed: int, rows: list[str], overrides: list[str], gptq_nsamples: int = 128,
                   tag: str = "", recipes: dict | None = None) -> list[dict]:
    """The accuracy table: zero-shot fp32/bf16/int4 RTN/int4 GPTQ and every trained row of ROWS (QZO and MeZO,
    LOMO / AdaLomo / AdamW / HiFT on the int4 scales and on the fp32 weights, GRASS); test accuracy (500 examples,
    the same for every seed) of each trained run's exported checkpoint, with train steps, wall time and peak RSS.
    JSON lines to out/results.jsonl. `recipes` maps a row key to another recipe (in place of BASE + its overrides)."""
    from qzo2.config import load_config

    qzo2 = [sys.executable, "-m", "qzo2.cli"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    recipes = recipes or {}
    unknown = [r for r in rows if r not in ZERO_SHOT and r not in ROWS and r not in PEFT_ROWS]
    if unknown:
        raise ValueError(f"unknown row {unknown[0]!r}; choose from {list(ZERO_SHOT) + list(ROWS) + list(PEFT_ROWS)}")

    def record(row: str, **kw):
        rec = dict(row=row + (f" ({tag.strip('-')})" if tag else ""), seed=seed, **kw)
        results.append(rec)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    def quantized(method: str) -> Path:
        path = out / f"int4-{method}"
        if not path.exists():
            extra = ["--nsamples", str(gptq_nsamples)] if method == "gptq" else []
            m = run_measured(qzo2 + ["quantize", "-o", str(path), "--method", method, "-q", *extra])
            record(f"quantize {method}", wall_s=m["wall_s"], peak_rss_gib=m["peak_rss_gib"], options=extra)
        return path

    def zero_shot(row: str, model: str, *extra: str):
        m = run_measured(qzo2 + ["eval", model, "--task", "sentiment", "--seed", str(seed), *extra])
        record(row, steps=0, test_accuracy=_accuracy(m["output"]), eval_wall_s=m["wall_s"],
               eval_peak_rss_gib=m["peak_rss_gib"])

    def trained(key: str):
        row = ROWS[key]
        if row.base == "rtn":
            quantized("rtn")
        args = train_args(key, seed, out, tag, recipes.get(key))
        run = Path(args[-1].split("=", 1)[1])
        t = run_measured(qzo2 + ["train", *args, "overwrite=true", "progress=false", *overrides])
        exported = Path(f"{run}-{row.export}")
        run_measured(qzo2 + ["export", str(run), "-o", str(exported), "--format", row.export, "--overwrite"])
        template = load_config(str(run / "config.yaml")).template
        e = run_measured(qzo2 + ["eval", str(exported), "--task", "sentiment", "--seed", str(seed),
                                 "--template", template])
        best = json.loads((run / "best" / "state.json").read_text()) if (run / "best").is_dir() else {}
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        dev = {r["step"]: r["dev_accuracy"] for r in metrics if "dev_accuracy" in r}
        recipe = recipes.get(key)
        record(row.name, recipe=recipe or shown(BASE), recipe_overrides=[] if recipe else row.args(),
               steps=max(r["step"] for r in metrics), best_step=best.get("step"),
               dev_accuracy=dev, test_accuracy=_accuracy(e["output"]), train_wall_s=t["wall_s"],
               train_peak_rss_gib=t["peak_rss_gib"], eval_wall_s=e["wall_s"], exported=str(exported))

    def peft(key: str):
        name, kind, args = PEFT_ROWS[key]
        m = run_measured([sys.executable, str(Path(__file__).with_name("peft_rows.py")), kind, "--seed", str(seed),
                          *args, *overrides])
        r = json.loads(m["output"].strip().splitlines()[-1])
        record(name, recipe=shown(Path(__file__).with_name("peft_rows.py")),
               recipe_overrides=args, steps=r["steps"], best_step=r["best_step"], dev_accuracy=r["dev_accuracy"],
               test_accuracy=r["test_accuracy"], train_wall_s=r["train_wall_s"], train_peak_rss_gib=m["peak_rss_gib"],
               process_wall_s=m["wall_s"], trained_values=r["trained_values"])

    jobs = {"fp32": lambda: zero_shot("zero-shot fp32", "default"),
            "bf16": lambda: zero_shot("zero-shot bf16", "default", "--dtype", "bf16"),
            "rtn": lambda: zero_shot("zero-shot int4 RTN", str(quantized("rtn"))),
            "rtn-goodbad": lambda: zero_shot("zero-shot int4 RTN, template goodbad", str(quantized("rtn")),
                                             "--template", "goodbad"),
            "gptq": lambda: zero_shot("zero-shot int4 GPTQ", str(quantized("gptq")))}
    jobs.update({key: (lambda key=key: trained(key)) for key in ROWS})
    jobs.update({key: (lambda key=key: peft(key)) for key in PEFT_ROWS})
    for row in rows:  # in the order given
        jobs[row]()
    return results


def accuracy_table(results: Path, rows: list[str] | None = None) -> str:
    """The results.md accuracy table from results.jsonl: one line per row name (the latest record of each seed),
    test accuracy per seed and their mean, steps, mean train wall time, peak RSS."""
    latest: dict = {}
    for line in Path(results).read_text().splitlines():
        rec = json.loads(line)
        if "test_accuracy" in rec:
            latest.setdefault(rec["row"], {})[rec["seed"]] = rec
    names = rows or list(latest)
    out = ["| row | seeds | test accuracy per seed | mean | steps | train wall (mean) | peak RSS |",
           "|---|---|---|---|---|---|---|"]
    for name in names:
        recs = [latest[name][s] for s in sorted(latest.get(name, {}))]
        if not recs:
            continue
        accs = [r["test_accuracy"] for r in recs]
        walls = [r["train_wall_s"] for r in recs if r.get("train_wall_s")]
        rss = [r.get("train_peak_rss_gib") or r.get("eval_peak_rss_gib") for r in recs]
        out.append(f"| {name} | {', '.join(str(r['seed']) for r in recs)} | {' / '.join(f'{a:.3f}' for a in accs)} "
                   f"| **{sum(accs) / len(accs):.3f}** | {recs[0].get('steps', 0)} | "
                   f"{f'{sum(walls) / len(walls) / 60:.1f} min' if walls else '-'} | "
                   f"{max(r for r in rss if r):.2f} GiB |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/accuracy.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("accuracy", help="run rows of the accuracy benchmark (SmolLM2 + Rotten Tomatoes), appending "
                                        "to OUTPUT/results.jsonl")
    a.add_argument("-o", "--output", default=OUT, help="work and result directory")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--rows", default="fp32,rtn,gptq,qzo,mezo",
                   help="comma list of " + ",".join(ZERO_SHOT + tuple(ROWS) + tuple(PEFT_ROWS)) +
                        " (bf16 is slow on CPUs without bf16 GEMM)")
    a.add_argument("--recipe", action="append", default=[], metavar="ROW=PATH",
                   help="another recipe for a trained row (repeatable), e.g. lomo=my-lomo.yaml")
    a.add_argument("--gptq-nsamples", type=int, default=128, help="GPTQ calibration sequences (512 tokens each)")
    a.add_argument("--tag", default="", help="suffix of the trained runs' directories and rows, e.g. -600steps")
    a.add_argument("overrides", nargs="*", help="key=value overrides for every trained row")
    t = sub.add_parser("accuracy-table", aliases=["table"], help="the results.md table from an accuracy results.jsonl")
    t.add_argument("-o", "--output", default=OUT, help="the accuracy benchmark's directory")
    t.add_argument("--rows", default="", help="comma list of row names, in order (default: all, as recorded)")
    for verb, what in (("train", "run `qzo2 train` for a trained row (no export, no test score)"),
                       ("command", "print a trained row's `qzo2 train` command line")):
        c = sub.add_parser(verb, help=what)
        c.add_argument("row", choices=list(ROWS))
        c.add_argument("-o", "--output", default=OUT, help="the accuracy benchmark's directory")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--tag", default="", help="suffix of the run directory")
        if verb == "train":
            c.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        c.add_argument("overrides", nargs="*", help="key=value overrides, last")
    args, extra = p.parse_known_args(argv)
    if extra and (args.verb not in ("train", "command") or any("=" not in e or e.startswith("-") for e in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # `train ROW --seed 1 key=value`: the overrides after an option
        args.overrides += extra
    if args.verb == "accuracy":
        recipes = dict(r.split("=", 1) for r in args.recipe)
        bench_accuracy(Path(args.output), args.seed, args.rows.split(","), args.overrides, args.gptq_nsamples,
                       args.tag, recipes)
    elif args.verb in ("train", "command"):
        line = ["train", *train_args(args.row, args.seed, args.output, args.tag), *args.overrides]
        if args.verb == "command":
            print(shlex.join(["qzo2", *line]))
            return 0
        from qzo2.cli import main as qzo2_main

        return qzo2_main(line + (["--print-config"] if args.print_config else []))
    else:
        print(accuracy_table(Path(args.output) / "results.jsonl", [r for r in args.rows.split(",") if r] or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
