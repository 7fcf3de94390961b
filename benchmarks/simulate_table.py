#!/usr/bin/env python
"""The table users look for: simulated peak GPU memory of every qzo2 bench mode on real model sizes, and the largest
batch and sequence that fit a GPU of a given size. Every cell is qzo2's real GPU step run on fake tensors
(qzo2.simulate, the same code as `qzo2 bench --simulate` and `qzo2 plan`); nothing here ran on a GPU.

    .venv/bin/python benchmarks/simulate_table.py run [--models llama2-7b,...] [--modes qzo,...]  # appends rows
    .venv/bin/python benchmarks/simulate_table.py table                                           # markdown

`run` appends one JSON line per (model, mode) to benchmarks/results/simulate_table.jsonl (committed: the rows behind
docs/gpu-memory.md's table, so a later session goes on from them) and skips the pairs already there, so an
interrupted run picks up where it stopped (`--no-search`: the sizes only, a few measurements a row; a later run
without it searches those rows and its lines replace them in the table). A row holds the simulated peak at each size in SIZES (one step after the
first, so the method's state is all there), and, where 1x512 fits `--gpu-memory` less `--reserve` (what a real GPU
adds: CUDA context and allocator cache), the largest batch at seq 512 and the longest seq at batch 1 that fit
(qzo2.plan's search). Each row's `command` is the `qzo2 bench --simulate` line that reproduces its 1x512 cell.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = ["llama2-7b", "llama3-8b", "llama2-13b", "llama2-70b", "opt-175b"]
SIZES = [(1, 512), (1, 2048), (16, 256)]
OUT = Path(__file__).parent / "results" / "simulate_table.jsonl"


def _done(path: Path, search: bool = True) -> set:
    """The (model, mode, gpu) rows already there; with `search`, only those whose largest fit was searched."""
    if not path.exists():
        return set()
    return {(r["model"], r["mode"], r["gpu_memory"]) for r in map(json.loads, path.read_text().splitlines())
            if not search or r["max_batch_at_512"] is not None}


def run(args) -> None:
    import torch

    from qzo2.config import parse_size
    from qzo2.methods import registry
    from qzo2.plan import MAX_BATCH, SEQ_STEP, _largest
    from qzo2.simulate import Simulation
    from qzo2.tracking import GB

    limit = parse_size(args.gpu_memory) / GB - args.reserve
    modes = args.modes.split(",") if args.modes else list(registry.bench_modes())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set() if args.redo else _done(args.out, args.search)
    for model in args.models.split(","):
        for mode in modes:
            if (model, mode, args.gpu_memory) in done:  # a sizes-only row is redone by a later --search run
                continue
            t0 = time.time()
            row = {"model": model, "mode": mode, "dtype": "bf16", "bits": 4, "group_size": 128,
                   "gpu_memory": args.gpu_memory, "reserve_gb": args.reserve, "simulated": True,
                   "command": f"qzo2 bench --simulate --shape {model} --mode {mode} --batch 1 --seq 512"}
            with Simulation(mode, model, torch.bfloat16, 4, 128) as sim:
                for i, (b, t) in enumerate(SIZES):
                    rec = sim.measure(b, t, None if i == 0 else 1)
                    row[f"{b}x{t}"] = round(rec["simulated_peak_gb"], 3)
                    if i == 0:
                        row.update(pinned_host_gb=round(rec["pinned_host_gb"], 3),
                                   h2d_gb_per_step=round(rec["h2d_gb_per_step"], 3),
                                   breakdown_gb={k: round(v, 3) for k, v in rec["breakdown_gb"].items()})
                fits = row["1x512"] <= limit
                if args.search:
                    row["max_batch_at_512"] = (_largest(lambda n: sim.measure(n, 512, 1)["simulated_peak_gb"], limit,
                                                        1, MAX_BATCH) if fits else 0)
                    max_pos = int(getattr(sim.run.model.config, "max_position_embeddings", 0) or 0) or 1 << 17
                    row["max_seq_at_1"] = (SEQ_STEP * _largest(lambda n: sim.measure(1, n * SEQ_STEP, 1)
                                                               ["simulated_peak_gb"], limit, 1, max_pos // SEQ_STEP)
                                           if fits else 0)
                else:  # sizes only: `qzo2 plan` searches one model's fit on demand
                    row["max_batch_at_512"] = row["max_seq_at_1"] = None
            row["wall_s"] = round(time.time() - t0, 1)
            row["revision"] = _revision()
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in row if k != "breakdown_gb"}), flush=True)


def _revision() -> str | None:
    """The commit the row was simulated at (None outside a git checkout)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _fit(v) -> str:
    """A largest-fit cell: the number, '-' when 1x512 does not fit, 'n/s' when not searched."""
    return "n/s" if v is None else str(v) if v else "-"


def table(args) -> str:
    latest = {}  # the last row of each (model, mode): a searched row replaces a sizes-only one
    for r in map(json.loads, args.out.read_text().splitlines()):
        if r["gpu_memory"] == args.gpu_memory:
            latest[r["model"], r["mode"]] = r
    rows = list(latest.values())
    from qzo2.methods import registry

    modes = list(registry.bench_modes())
    order = {m: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (order.get(r["model"], 99), modes.index(r["mode"]) if r["mode"] in modes else 99))
    sizes = [f"{b}x{t}" for b, t in SIZES]
    searched = any(r["max_batch_at_512"] is not None for r in rows)  # no fit columns when nothing was searched
    fit_head = f" | max batch @512 ({args.gpu_memory}) | max seq @1 ({args.gpu_memory})" if searched else ""
    out = [f"| model | mode | " + " | ".join(f"GB {s.replace('x', '×')}" for s in sizes)
           + fit_head + " | pinned host GB |",
           "|" + "---|" * (len(sizes) + (5 if searched else 3))]
    for r in rows:
        fit = f" | {_fit(r['max_batch_at_512'])} | {_fit(r['max_seq_at_1'])}" if searched else ""
        out.append(f"| {r['model']} | {r['mode']} | " + " | ".join(f"{r[s]:.2f}" for s in sizes)
                   + fit + f" | {r['pinned_host_gb']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["run", "table"])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default="", help="comma-separated bench modes (default: all)")
    p.add_argument("--gpu-memory", default="24GB")
    p.add_argument("--reserve", type=float, default=1.0, help="GB a real GPU adds (CUDA context, allocator)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--redo", action="store_true", help="simulate the rows again even where they are there (after a "
                                                       "change to the step code); the new lines replace them")
    p.add_argument("--no-search", dest="search", action="store_false",
                   help="the three sizes only, no largest-fit search (a few measurements a row instead of ~20)")
    args = p.parse_args(argv)
    if args.what == "run":
        run(args)
    else:
        print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
