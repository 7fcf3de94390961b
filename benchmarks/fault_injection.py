#!/usr/bin/env python
"""Fault injection over the whole qzo2 pipeline: kill -9 at random points of quantize, train, resume and export.

    .venv/bin/python benchmarks/fault_injection.py [--trials 24] [--seed 0] [--workdir DIR] [--keep]

Setup (in a work directory, a fresh temporary one by default): a tiny random Llama (hidden 128, 2 layers, a BPE
tokenizer trained on a few sentences) saved with save_pretrained, its int4 quantization (the base every run trains),
a train.jsonl of prompt/completion rows and out/keep.txt, a file of the user's beside the outputs. The package
(qzo2/, quant/) is copied into the work directory first, so that edits to the checkout during the run do not
change the code under test.

Each trial (seeded RNG) picks one command: quantize (a fresh output, or --overwrite onto an earlier complete one),
train (a new run dir; method adamw, qzo or adalomo, eval_every=1 so that best/ is rewritten at most steps), resume
(the train command of an existing run dir again, possibly with a larger steps=) or export (gptq or hf, of a run
dir, sometimes --overwrite). It launches it as `python -m qzo2.cli ...` and sends it SIGKILL at a point drawn from
that command's measured timings (its last uninterrupted run: process exit, and when it took and released its
output lock `.NAME.lock`, which the watcher polls; train: also its first checkpoint write):
  - anywhere: uniform in [0.05, 1.0] x its duration (many of these land during the imports of torch/transformers);
  - in the writing phase: uniform between taking the lock (train: its first checkpoint write) and releasing it;
  - train / resume only, a third of them: right after best/ is replaced for the k-th time (k in 1..3; the watcher
    polls best/'s inode every 0.5 ms), i.e. between writing best/ and the step checkpoint that points at it.
Where each kill landed (before the lock, holding it, after releasing it) is reported. Then it checks:

  1. the output is absent or complete and loadable: a quantize / export directory has qzo2.json and loads
     (quant.checkpoint.load_quantized; transformers' AutoModelForCausalLM for an hf export); in a run dir every
     checkpoints/step-* and best/ has its files and they load (safetensors, state.json parses); an output
     replaced with --overwrite is never missing (it is the old or the new one);
  2. run dirs: best/'s state.json step >= the last checkpoint's best_step (best/ is never behind the pointer);
  3. nothing else under the work directory changed (every file outside the command's output and its own
     `.NAME.*` temporaries keeps its sha256; out/keep.txt among them);
  4. the very same command, run again without a kill, exits 0 and leaves a complete output (a quantize / export
     with no --overwrite whose killed run had already put its output in place is refused in one line instead, its
     output untouched), and no `.*.tmp-*`, `.*.old-*`, `.*.work-*` or `*.lock` is left anywhere under the work
     directory. For train / resume, the rerun's last trained.safetensors equals bit for bit that of an
     uninterrupted reference run of the same config (run once per config, cached); a quantize rerun's
     model.safetensors equals the uninterrupted base quantization's byte for byte.

The seed fixes the commands and the drawn kill points; where a kill lands also depends on the machine's timing,
so two runs with the same seed can differ. One line per trial, a summary table at the end; exit status 1 if any
trial failed. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TEXT = " ".join(
    "the quick brown fox jumps over the lazy dog while a quantized model reads every word of this small corpus "
    "and learns nothing at all because it is only here to train a tokenizer for the tests".split() * 3
)
LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
METHODS = {"adamw": "1e-2", "qzo": "1e-3", "adalomo": "1e-2"}  # method -> lr
FIRST_STEPS, MORE_STEPS = 12, 4  # a new run trains 12 steps; a resume may add 4 (up to MAX_STEPS)
MAX_STEPS = 20
SAME = ("task=", "train_file=", "dev_file=", "batch_size=", "max_length=", "eval_every=", "save_every=", "progress=",
        "lr=", "model=")  # train arguments every trial shares (left out of the trial lines)
STALE = re.compile(r"^\..+\.(?:tmp|old|work)-[A-Za-z0-9_]+$|\.lock$")


# ---- setup ---------------------------------------------------------------------------------------------------------
def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def build_source(dst: Path) -> None:
    """A tiny random Llama with a trained BPE tokenizer, saved as a HF directory (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer) + 20, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=2, tie_word_embeddings=False, **LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)


def write_data(path: Path) -> None:
    words = TEXT.split()
    rows = [{"prompt": " ".join(words[i:i + 4]), "completion": " " + " ".join(words[i + 4:i + 8])}
            for i in range(0, 64, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---- running commands ----------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, work: Path):
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        PYTHONPATH=str(work / "code"), PYTHONDONTWRITEBYTECODE="1")
        self.env.pop("QZO2_DEBUG", None)
        self.n = 0

    def launch(self, argv: list[str], tag: str):
        self.n += 1
        log = self.logs / f"{self.n:03d}-{tag}.log"
        f = open(log, "wb")
        p = subprocess.Popen([sys.executable, "-m", "qzo2.cli", *argv], cwd=self.work, env=self.env, stdout=f,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return p, f, log

    def run(self, argv: list[str], tag: str, lock: Path | None = None, kill_at: float | None = None,
            watch: Path | None = None, kill_on_new: tuple[Path, int] | None = None) -> dict:
        """Run the command, SIGKILLed `kill_at` seconds after its launch if given -> {rc, seconds, killed_at,
        t_lock, t_unlock (seconds to when its output lock file `lock` appeared and was removed again, None if not
        seen), t_work (seconds to the first change of directory `watch`: a train's first checkpoint write), landed
        (still running at the kill), phase (where the kill landed: 'before lock' (imports, reading inputs),
        'in lock' (the command held its output lock: quantize / export writing; train loading the model and
        training), 'after lock' (released,
        the process exiting)), out (its stdout + stderr)}. `kill_on_new` (path, k): SIGKILL as soon as `path`
        (a run's best/) is replaced for the k-th time (a new inode), instead of after a delay."""
        t0 = time.perf_counter()
        p, f, log = self.launch(argv, tag)
        t_lock, t_unlock, t_work, landed, phase = None, None, None, False, None

        def mtime():
            try:
                return watch.stat().st_mtime_ns
            except (OSError, AttributeError):
                return None

        initial = mtime()

        def inode():
            try:
                return kill_on_new[0].stat().st_ino
            except OSError:
                return None

        ino, replaced = (inode(), 0) if kill_on_new else (None, 0)
        mine = f"pid {p.pid},".encode()  # what qzo2 writes into the lock file it holds (a killed run's may be there)

        def held() -> bool:
            try:
                return lock is not None and lock.read_bytes().startswith(mine)
            except OSError:
                return False

        while p.poll() is None:
            now = time.perf_counter() - t0
            if lock is not None and t_unlock is None:
                if t_lock is None and held():
                    t_lock = now
                elif t_lock is not None and not held():
                    t_unlock = now
            if watch is not None and t_work is None and mtime() != initial:
                t_work = now
            if kill_on_new:
                new = inode()
                if new is not None and new != ino:
                    replaced += 1
                ino = new
            if (kill_at is not None and now >= kill_at) or (kill_on_new and replaced >= kill_on_new[1]):
                held_now = held()
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
                    landed = True
                    phase = "in lock" if held_now else "after lock" if t_lock is not None else "before lock"
                break
            time.sleep(0.0005 if kill_on_new else 0.004)
        rc = p.wait()
        f.close()
        return {"rc": rc, "seconds": time.perf_counter() - t0, "killed_at": now if landed else None,
                "t_lock": t_lock, "t_unlock": t_unlock, "t_work": t_work, "landed": landed, "phase": phase,
                "out": log.read_text(errors="replace")}


# ---- invariants ----------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(work: Path, target: Path) -> dict[str, str]:
    """sha256 of every file under the work directory except the target output, its own `.NAME.*` siblings
    (lock, temporaries), the logs and the code copy."""
    skip = {work / "logs", work / "code"}
    out = {}
    for dirpath, dirnames, filenames in os.walk(work):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n not in skip and d / n != target
                       and not (d == target.parent and n.startswith(f".{target.name}."))]
        for n in filenames:
            if d == target.parent and n.startswith(f".{target.name}."):
                continue
            out[str((d / n).relative_to(work))] = sha256(d / n)
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def stale_names(work: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(work):
        d = Path(dirpath)
        if d == work:
            dirnames[:] = [n for n in dirnames if n not in ("logs", "code")]
        for n in dirnames + filenames:
            if STALE.search(n):
                found.append(str((d / n).relative_to(work)))
    return sorted(found)


def check_model_dir(path: Path, fmt: str) -> str | None:
    """None if `path` is a complete qzo2 checkpoint that loads, else what is wrong."""
    if not (path / "qzo2.json").is_file():
        return "no qzo2.json"
    try:
        json.loads((path / "qzo2.json").read_text())
        if fmt == "hf":
            import torch
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

            AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
        else:
            from quant.checkpoint import load_quantized

            load_quantized(path)
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        return f"does not load: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    return None


def check_ckpt(path: Path, with_method: bool) -> str | None:
    from safetensors.torch import load_file

    names = {p.name for p in path.iterdir()}
    want = {"trained.safetensors", "state.json"} | ({"method.safetensors"} if with_method else set())
    if names != want:
        return f"{path.name} holds {sorted(names)}, expected {sorted(want)}"
    try:
        load_file(str(path / "trained.safetensors"))
        if with_method:
            load_file(str(path / "method.safetensors"))
        json.loads((path / "state.json").read_text())
    except Exception as e:  # noqa: BLE001
        return f"{path.name} does not load: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    return None


def check_run_dir(run: Path, with_method: bool) -> tuple[list[str], dict]:
    """-> (problems, facts) for a run directory (absent is fine); `with_method`: its checkpoints hold
    method.safetensors (the method keeps state tensors, as its reference run's checkpoints show)."""
    facts = {"exists": run.is_dir(), "steps": [], "best": None}
    if not run.is_dir():
        return [], facts
    problems = []
    if (run / "config.yaml").exists():
        try:
            import yaml

            yaml.safe_load((run / "config.yaml").read_text())
        except Exception as e:  # noqa: BLE001
            problems.append(f"config.yaml does not parse: {e}")
    ckpts = run / "checkpoints"
    steps = sorted(p for p in ckpts.glob("step-*")) if ckpts.is_dir() else []
    for p in steps:
        if not re.fullmatch(r"step-\d{6}", p.name):
            problems.append(f"unexpected checkpoint name {p.name}")
            continue
        problems += [x for x in [check_ckpt(p, with_method)] if x]
    facts["steps"] = [int(p.name[5:]) for p in steps if re.fullmatch(r"step-\d{6}", p.name)]
    best = run / "best"
    if best.exists():
        err = check_ckpt(best, with_method)
        if err:
            problems.append("best/: " + err)
        else:
            facts["best"] = json.loads((best / "state.json").read_text())["step"]
    if facts["steps"] and not problems:
        last = json.loads((ckpts / f"step-{facts['steps'][-1]:06d}" / "state.json").read_text())
        pointer = last.get("best_step")
        if pointer is not None:
            if facts["best"] is None:
                problems.append(f"last checkpoint points at best step {pointer} but best/ is missing")
            elif facts["best"] < pointer:
                problems.append(f"best/ is at step {facts['best']}, behind the pointer best_step {pointer}")
    return problems, facts


def trained_bits(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    return {k: v.contiguous().view(-1).view(torch.uint8) for k, v in load_file(str(path)).items()}


def same_bits(a: Path, b: Path) -> bool:
    import torch

    ta, tb = trained_bits(a), trained_bits(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---- the campaign --------------------------------------------------------------------------------------------------
class Campaign:
    def __init__(self, work: Path, rng: random.Random):
        self.work, self.rng = work, rng
        self.runner = Runner(work)
        self.out = work / "out"
        self.timing: dict[str, tuple] = {}  # command key -> (seconds, to taking its lock, to releasing it, to the
        # first checkpoint write of a train)
        self.refs: dict[tuple[str, int], Path] = {}  # (method, steps) -> reference trained.safetensors
        self.runs: dict[str, dict] = {}  # run dir name -> {method, steps} of its last complete command
        self.run_counter = Counter()
        self.base_weights = None

    # -- setup --
    def setup(self) -> None:
        for pkg in ("qzo2", "quant"):  # the code under test, frozen for the campaign
            shutil.copytree(REPO / pkg, self.work / "code" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        sys.path.insert(0, str(self.work / "code"))
        build_source(self.work / "src")
        write_data(self.work / "train.jsonl")
        self.out.mkdir()
        (self.out / "keep.txt").write_text("the user's notes: qzo2 must never touch this file\n")
        r = self.runner.run(["quantize", "src", "-o", "q", "-q", "--group-size", "32"], "setup-quantize",
                            lock=self.work / ".q.lock")
        if r["rc"]:
            sys.exit(f"setup: qzo2 quantize failed ({r['rc']}):\n{r['out']}")
        self.timing["quantize"] = (r["seconds"], r["t_lock"], r["t_unlock"], r["t_work"])
        self.base_weights = sha256(self.work / "q" / "model.safetensors")
        from quant.checkpoint import exchange

        a, b = Path(tempfile.mkdtemp(dir=self.work)), Path(tempfile.mkdtemp(dir=self.work))
        self.exchange = exchange(a, b)
        shutil.rmtree(a), shutil.rmtree(b)

    # -- commands --
    @staticmethod
    def train_argv(method: str, steps: int, output_dir: str) -> list[str]:
        return ["train", "model=q", "task=", "train_file=train.jsonl", "dev_file=train.jsonl", f"steps={steps}",
                "batch_size=2", "max_length=32", "eval_every=1", "save_every=2", "progress=false",
                f"lr={METHODS[method]}", f"method={method}", f"output_dir={output_dir}"]

    def reference(self, method: str, steps: int) -> Path:
        """trained.safetensors of the last checkpoint of an uninterrupted run of this config (run once, cached)."""
        key = (method, steps)
        if key not in self.refs:
            d = f"ref/{method}-{steps}"
            r = self.runner.run(self.train_argv(method, steps, d), f"ref-{method}-{steps}",
                                lock=self.work / "ref" / f".{method}-{steps}.lock",
                                watch=self.work / d / "checkpoints")
            if r["rc"]:
                raise RuntimeError(f"reference run {d} failed ({r['rc']}): {r['out'][-400:]}")
            self.timing.setdefault(f"train-{method}", (r["seconds"], r["t_lock"], r["t_unlock"], r["t_work"]))
            self.refs[key] = self.work / d / "checkpoints" / f"step-{steps:06d}" / "trained.safetensors"
        return self.refs[key]

    def measure(self, c: dict) -> tuple:
        """(seconds, seconds to taking the output lock, to releasing it, to a train's first checkpoint write) of the
        command's last uninterrupted run; the first time, measured by an uninterrupted run of it (train: its
        reference run; export: into ref/) before the trial."""
        key = c["key"]
        if key not in self.timing:
            if c["kind"] in ("train", "resume"):
                self.reference(c["method"], FIRST_STEPS)
                self.timing.setdefault(key, self.timing[f"train-{c['method']}"])
            else:  # export
                name = f"export-{c['fmt']}"
                argv = [a for a in c["argv"] if a != "--overwrite"]
                argv[argv.index("-o") + 1] = f"ref/{name}"
                r = self.runner.run(argv, f"measure-{key}", lock=self.work / "ref" / f".{name}.lock")
                if r["rc"]:
                    raise RuntimeError(f"measuring {key} failed ({r['rc']}): {r['out'][-400:]}")
                self.timing[key] = (r["seconds"], r["t_lock"], r["t_unlock"], r["t_work"])
        return self.timing[key]

    def pick(self) -> dict:
        """A command for this trial: {kind, key, argv, target, fmt, method, steps, overwrite}."""
        rng = self.rng
        complete_runs = [r for r in self.runs if (self.out / r / "checkpoints").is_dir()]
        kinds = ["quantize", "train", "resume", "export"]
        weights = [1, 1, 1.2 if self.runs else 0, 1.2 if complete_runs else 0]
        kind = rng.choices(kinds, weights)[0]
        if kind == "quantize":
            name = f"quant-{rng.randrange(2)}"
            target = self.out / name
            overwrite = target.exists() or rng.random() < 0.3  # onto an earlier complete output, or a new one
            argv = ["quantize", "src", "-o", f"out/{name}", "-q", "--group-size", "32"]
            return dict(kind=kind, key="quantize", argv=argv + ["--overwrite"] * overwrite, target=target,
                        fmt="gptq", overwrite=overwrite)
        if kind == "train":
            method = rng.choice(list(METHODS))
            self.run_counter[method] += 1
            name = f"run-{method}-{self.run_counter[method]}"
            return dict(kind=kind, key=f"train-{method}", argv=self.train_argv(method, FIRST_STEPS, f"out/{name}"),
                        target=self.out / name, method=method, steps=FIRST_STEPS, overwrite=False)
        if kind == "resume":
            name = rng.choice(sorted(self.runs))
            method, steps = self.runs[name]["method"], self.runs[name]["steps"]
            if rng.random() < 0.75 and steps + MORE_STEPS <= MAX_STEPS:
                steps += MORE_STEPS
            return dict(kind=kind, key=f"resume-{method}", argv=self.train_argv(method, steps, f"out/{name}"),
                        target=self.out / name, method=method, steps=steps, overwrite=False)
        run = rng.choice(sorted(complete_runs))
        fmt = rng.choice(["gptq", "hf"])
        name = f"export-{fmt}-{rng.randrange(2)}"
        target = self.out / name
        overwrite = target.exists() or rng.random() < 0.3
        argv = ["export", f"out/{run}", "-o", f"out/{name}"] + ["--format", "hf"] * (fmt == "hf")
        return dict(kind=kind, key=f"export-{fmt}", argv=argv + ["--overwrite"] * overwrite, target=target,
                    fmt=fmt, overwrite=overwrite)

    def check_output(self, c: dict, stage: str, problems: list, existed: bool, inode) -> str:
        """Invariants 1 and 2 on the command's output -> what was found, in a few words."""
        target = c["target"]
        if c["kind"] in ("train", "resume"):
            with_method = (self.reference(c["method"], c["steps"]).parent / "method.safetensors").exists()
            errs, facts = check_run_dir(target, with_method)
            problems.extend(f"{stage}: {e}" for e in errs)
            if not facts["exists"]:
                return "run dir absent"
            ahead = facts["best"] is not None and facts["best"] > max(facts["steps"], default=-1)
            if ahead and stage == "after kill":
                c["best_ahead"] = True  # killed between writing best/ and the step checkpoint that points at it
            return (f"ckpts {facts['steps'] or 'none'}"
                    + (f", best/ step {facts['best']}" if facts["best"] is not None else "")
                    + (" (best/ ahead of the last checkpoint)" if ahead else ""))
        if not target.exists():
            if c["overwrite"] and existed:
                problems.append(f"{stage}: {target.name} was being replaced (--overwrite) and is now missing")
            return "absent"
        err = check_model_dir(target, c["fmt"])
        if err:
            problems.append(f"{stage}: {target.name}: {err}")
            return "broken"
        if existed:
            return "complete (the old one)" if target.stat().st_ino == inode else "complete (the new one)"
        return "complete"

    def trial(self, i: int) -> dict:
        c = self.pick()
        kind, target = c["kind"], c["target"]
        lock = target.parent / f".{target.name}.lock"
        full, t_lock, t_unlock, t_work = self.measure(c)
        watch = target / "checkpoints" if kind in ("train", "resume") else None
        if kind in ("train", "resume"):
            self.reference(c["method"], c["steps"])  # before the kill: no reference runs beside a trial's files
        u, kill_on_new = self.rng.random(), None
        if kind in ("train", "resume") and u < 1 / 3:  # right after the k-th new best/: before its step checkpoint
            kill_on_new = (target / "best", self.rng.randint(1, 3))  # qzo / adalomo improve on dev less often
            delay = None
        elif u < (2 / 3 if kind in ("train", "resume") else 0.5) or t_lock is None:
            delay = self.rng.uniform(0.05 * full, full)  # anywhere in the run (many land during the imports)
        else:  # in the writing phase, as measured: from taking the output lock (train: from its first checkpoint
            delay = self.rng.uniform(t_work or t_lock, t_unlock or full)  # write) to releasing the lock
        before = snapshot(self.work, target)
        existed = target.is_dir()
        inode = target.stat().st_ino if existed else None
        problems, found = [], []

        k = self.runner.run(c["argv"], f"t{i:02d}-{kind}", lock=lock, kill_at=delay, watch=watch,
                            kill_on_new=kill_on_new)
        when = (f"kill at {delay:5.2f} s of {full:.1f} s" if kill_on_new is None else
                f"kill on new best/ #{kill_on_new[1]}" + (f" (at {k['killed_at']:.2f} s)" if k["landed"] else ""))
        found.append(f"killed {k['phase']}" if k["landed"] else f"exited {k['rc']} before the kill")
        found.append(self.check_output(c, "after kill", problems, existed, inode))
        left = stale_names(self.work)
        if left:
            found.append(f"{len(left)} temporaries left")
        diff = changed(before, snapshot(self.work, target))
        if diff:
            problems.append(f"after kill: files outside the output changed: {diff[:3]}")

        # invariant 4: the very same command again, uninterrupted
        done_before = kind in ("quantize", "export") and not c["overwrite"] and target.exists()
        r = self.runner.run(c["argv"], f"t{i:02d}-{kind}-rerun", lock=lock, watch=watch)
        last_line = (r["out"].strip().splitlines() or [""])[-1][:200]
        if done_before:
            if r["rc"] != 2 or "already exists" not in r["out"]:
                problems.append(f"rerun: expected the one-line refusal of an existing output, got exit {r['rc']}: "
                                f"{last_line}")
            found.append("rerun refused (output already complete, no --overwrite)")
        elif r["rc"] != 0:
            problems.append(f"rerun exited {r['rc']}: {last_line}")
        else:
            self.timing[c["key"]] = (r["seconds"], r["t_lock"], r["t_unlock"], r["t_work"])
        after = self.check_output(c, "after rerun", problems, existed, inode)
        if kind in ("quantize", "export") and not target.exists():
            problems.append(f"after rerun: {target.name} is absent")
        if kind == "quantize" and target.exists() and sha256(target / "model.safetensors") != self.base_weights:
            problems.append("after rerun: model.safetensors differs from the uninterrupted quantization's")
        if kind in ("train", "resume") and r["rc"] == 0:
            last = target / "checkpoints" / f"step-{c['steps']:06d}" / "trained.safetensors"
            if not last.exists():
                problems.append(f"after rerun: no checkpoint at step {c['steps']}")
            elif not same_bits(last, self.reference(c["method"], c["steps"])):
                problems.append(f"after rerun: step {c['steps']} trained.safetensors differs from the reference run's")
            else:
                after += ", bit-identical to the reference"
            self.runs[target.name] = {"method": c["method"], "steps": c["steps"]}
        left = stale_names(self.work)
        if left:
            problems.append(f"after rerun: stale temporaries {left}")
        diff = changed(before, snapshot(self.work, target))
        if diff:
            problems.append(f"after rerun: files outside the output changed: {diff[:3]}")
        found.append(f"rerun: {after}")
        return dict(i=i, kind=kind, key=c["key"], argv=c["argv"], when=when, landed=k["landed"],
                    phase=k["phase"], best_ahead=c.get("best_ahead", False), found="; ".join(found),
                    problems=problems)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="work directory (created; default: a fresh temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep a temporary work directory afterwards")
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=False)
    else:
        work = Path(tempfile.mkdtemp(prefix="qzo2-fault-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for name in ("torchao", "torch.utils._pytree"):  # import-time noise of optional packages (as qzo2.cli does)
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"work directory {work}; {args.trials} trials, seed {args.seed}; python {sys.executable}", flush=True)
    camp = Campaign(work, random.Random(args.seed))
    camp.setup()
    print(f"setup {time.perf_counter() - t0:.1f} s: quantize takes {camp.timing['quantize'][0]:.1f} s, its lock "
          f"taken at {camp.timing['quantize'][1]:.1f} s; "
          f"renameat2 RENAME_EXCHANGE {'works' if camp.exchange else 'is not supported'} here", flush=True)

    results = []
    for i in range(1, args.trials + 1):
        r = camp.trial(i)
        results.append(r)
        status = "OK" if not r["problems"] else "FAIL"
        shown = [a for a in r["argv"] if not a.startswith(SAME) and a not in ("-q", "--group-size", "32")]
        print(f"trial {i:2d} {r['kind']:<8} qzo2 {' '.join(shown)}", flush=True)
        print(f"         {r['when']}: {r['found']}  {status}",
              flush=True)
        for p in r["problems"]:
            print(f"         FAIL: {p}", flush=True)

    wall = time.perf_counter() - t0
    print("\nsummary (where the kill landed: before = before the output lock was taken (imports, reading inputs); "
          "in = with the lock held (quantize / export writing, train loading and training); after = after it was "
          "released (exiting))")
    head = ("command", "trials", "killed", "before", "in", "after", "best>ck", "OK", "FAIL")
    print(f"{head[0]:<15}" + "".join(f"{h:>8}" for h in head[1:]))
    by = defaultdict(list)
    for r in results:
        by[r["key"]].append(r)

    def row(name, rs):
        cells = [len(rs), sum(r["landed"] for r in rs)]
        cells += [sum(r["phase"] == p for r in rs) for p in ("before lock", "in lock", "after lock")]
        cells += [sum(r["best_ahead"] for r in rs)]
        cells += [sum(not r["problems"] for r in rs), sum(bool(r["problems"]) for r in rs)]
        print(f"{name:<15}" + "".join(f"{x:>8}" for x in cells))

    for key in sorted(by):
        row(key, by[key])
    row("total", results)
    print("(best>ck: the kill left best/ ahead of the last step checkpoint, i.e. it landed between writing best/ and "
          "the checkpoint)")
    print("\nmeasured times of the last uninterrupted run of each command (seconds: output lock taken, released, "
          "process exit; train: first checkpoint write)")
    for key in sorted(camp.timing):
        full, t_lock, t_unlock, t_work = camp.timing[key]
        print(f"  {key:<15} {t_lock or float('nan'):5.2f} {t_unlock or float('nan'):5.2f} {full:5.2f}"
              + (f" {t_work:5.2f}" if t_work else ""))
    ok = sum(not r["problems"] for r in results)
    print(f"\n{ok}/{len(results)} OK; wall time {wall:.0f} s; work directory {work}"
          + (" (kept)" if args.workdir or args.keep or ok < len(results) else " (removed)"))
    if not args.workdir and not args.keep and ok == len(results):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
