"""The `qzo2` command: thin verbs that parse, validate and call the library."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import warnings
import sys
from pathlib import Path

from .config import keys_help, parse_size
from .outputs import os_error_line

EPILOG_QUANTIZE = """examples:
  qzo2 quantize -o runs/smollm2-int4                       # the embedded SmolLM2-135M, RTN int4 g64, GPTQ v1
  qzo2 quantize path/to/hf-model -o q8 --bits 8 --group-size -1
  qzo2 quantize path/to/hf-model -o q4 --method gptq --calib data.txt   # needs: pip install 'qzo2[gptq]'
  qzo2 quantize -o nf4 --format nf4 --group-size 64          # bitsandbytes NF4, fp32 absmax per block

The output is a standard GPTQ checkpoint (qweight/qzeros/scales/g_idx in safetensors, quantize_config.json) that
transformers + optimum + gptqmodel load, and that `qzo2 train` fine-tunes by training the scales."""


EPILOG_EXPORT = """examples:
  qzo2 export runs/sentiment-adalomo -o runs/sentiment-gptq             # GPTQ, only the scales changed
  qzo2 export runs/sentiment-adalomo -o runs/sentiment-hf --format hf --dtype bf16
  qzo2 export runs/my-dense-run -o runs/my-hf --format hf                # a run on a dense model: merged weights
  qzo2 export runs/sentiment-adalomo -o runs/sentiment-gguf --format gguf  # model.gguf + Modelfile (llama.cpp, Ollama)

All load with AutoModelForCausalLM.from_pretrained (gptq needs optimum + gptqmodel; gguf: gguf_file="model.gguf")
and with `qzo2 eval`. GGUF keeps the codes and trained scales exactly on a Q4_0/Q8_0 grid (qzo2 quantize --format
gguf-q4_0 / gguf-q8_0; 4-bit symmetric with any group size that is a multiple of 32 is Q4_0 too)."""


EPILOG_BENCH = """examples (the modes: see --mode; docs/bench.md has the measured runs):
  qzo2 bench --shape tiny --mode forward,MODE,MODE --batch 2 --seq 64 --compare        # CPU smoke run
  qzo2 bench --shape llama2-7b --mode forward,MODE --batch 16 --seq 256 --compare -o runs/bench.jsonl

Models are random (random codes and scales for the quantized modes), built directly on the device. One JSON line
per mode: step_ms (median of the last half of the measured steps), tok_s (batch*seq per step), torch_peak_gb,
nvml_used_gb, h2d_gb_per_step, d2h_gb_per_step, host_rss_gb, ratio_to_forward (GB = GiB)."""


EPILOG_PLAN = """examples:
  qzo2 plan llama3-8b --seq 2048                                 # every method, on a 24 GB card
  qzo2 plan llama2-70b --method METHOD,METHOD --gpu-memory 48GB --no-search
  qzo2 plan path/to/hf-model --gpu-memory 16GB

Every number is SIMULATED: qzo2's own GPU step (the code `qzo2 train` runs) on PyTorch fake tensors, which allocate
what the GPU would allocate but hold no data. A real GPU adds its CUDA context and the allocator's cache (--reserve).
docs/gpu-memory.md compares the simulation with reference figures; no GPU has run it."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def size_arg(text: str) -> int:
    """argparse type: a size such as 4GB (config.parse_size), its complaint as the message."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (got {text})")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count or a length of 0 would only fail later, less clearly)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="qzo2", description="Quantization-first zeroth-order fine-tuning of LLMs.",
                epilog="QZO2_DEBUG=1 shows the traceback behind a one-line error.")
    p.add_argument("--version", action="version", version=f"qzo2 {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a causal LM into a GPTQ (or NF4) checkpoint",
                       description="Quantize a Hugging Face causal LM into int codes with per-group scales.",
                       epilog=EPILOG_QUANTIZE, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("src", nargs="?", default=None,
                   help="local HF model directory (safetensors) or .gguf file; default: the embedded SmolLM2-135M")
    q.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--bits", type=int, default=None, choices=[2, 4, 8], help="bits per weight (default 4)")
    q.add_argument("--group-size", type=int, default=None, choices=[-1, 32, 64, 128, 256],
                   help="input channels sharing one scale; -1 = one per output channel (default: 128, or the "
                        "largest of 64/32 that divides every layer's in_features, e.g. 64 for SmolLM2's 576)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with a zero point per group")
    q.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="rtn: round to nearest (fast, no data); gptq: error-compensating GPTQ via gptqmodel")
    q.add_argument("--format", choices=["gptq", "gptq_v2", "nf4", "gguf-q4_0", "gguf-q4_1", "gguf-q8_0"],
                   default="gptq",
                   help="gptq: v1 layout most tools read (default); gptq_v2: true zero points; nf4: bitsandbytes; "
                        "gguf-q4_0 / gguf-q4_1 / gguf-q8_0: GPTQ on the grid of that GGUF type (group 32), so "
                        "`export --format gguf` writes the trained model to it exactly")
    q.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="regex of Linear names to keep unquantized (repeatable), e.g. --skip 'mlp\\.down_proj'")
    q.add_argument("--calib", default=None, help="GPTQ calibration text file (default: Hamlet, shipped offline)")
    q.add_argument("--nsamples", type=positive_int, default=128, help="GPTQ calibration sequences (default 128)")
    q.add_argument("--seqlen", type=positive_int, default=512, help="GPTQ calibration sequence length (default 512)")
    q.add_argument("--desc-act", action="store_true", help="GPTQ act-order (columns by decreasing activation)")
    q.add_argument("--max-shard-size", type=size_arg, default="4GB", help="safetensors shard size (default 4GB)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--trust-remote-code", action="store_true", help="allow model code from the source directory")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("train", help="fine-tune the scales of a quantized model or the weights of a dense one ("
                                     + ", ".join(_methods()) + ")",
                       description="Train from a YAML recipe with key=value overrides, e.g.\n"
                                   "  qzo2 train recipes/sentiment.yaml model=runs/smollm2-int4 steps=200",
                       epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("recipe", nargs="?", default=None,
                   help="YAML recipe (flat key: value mapping); optional: key=value overrides alone also work")
    t.add_argument("overrides", nargs="*", help="key=value overrides, applied after the recipe")
    t.add_argument("--print-config", action="store_true",
                   help="validate the recipe and overrides, print the resolved config as YAML and exit")

    x = sub.add_parser("export", help="write a run as a servable checkpoint: GPTQ with trained scales, GGUF, or "
                                      "merged HF",
                       description="Export a training run (or a quantized model) as a checkpoint to serve.",
                       epilog=EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("run", help="run directory of `qzo2 train` (or a quantized model directory, for --format hf or "
                               "gguf)")
    x.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --overwrite)")
    x.add_argument("--format", choices=["gptq", "gptq_v2", "hf", "gguf"], default="gptq",
                   help="gptq: the base GPTQ checkpoint with trained scales (default); gptq_v2: same, true zero "
                        "points; hf: dequantized, merged plain checkpoint; gguf: OUT/model.gguf (llama.cpp, "
                        "Ollama) with the codes and trained scales as Q4_0/Q4_1/Q8_0 blocks, and a Modelfile")
    x.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "q8_0"], default=None,
                   help="weights of an hf export (default: the run's training dtype; for a model dir its own); for "
                        "gguf the tensors that are not quantized Linears (embeddings, an untied head; default: as "
                        "stored; q8_0 re-quantizes them)")
    x.add_argument("--checkpoint", default="auto",
                   help="best, last or a step number (default: best if the run evaluated, else last)")
    x.add_argument("--max-shard-size", type=size_arg, default="4GB", help="safetensors shard size (default 4GB)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    e = sub.add_parser("eval", help="evaluate a model or a run: task accuracy, perplexity, generations",
                       description="Evaluate a model or a training run. With no --task/--generate: perplexity on a "
                                   "text file (default: Hamlet, shipped offline).")
    e.add_argument("model", nargs="?", default=None,
                   help="run dir (trained), quantized dir, HF model dir or .gguf; default: the embedded SmolLM2-135M")
    e.add_argument("--checkpoint", default="best", help="for a run dir: best, last or a step number (default best)")
    e.add_argument("--task", default=None, help="'sentiment' or a task .yaml: accuracy by candidate scoring")
    e.add_argument("--data", default=None, help="jsonl of task rows (for a task .yaml)")
    e.add_argument("--split", choices=["dev", "test"], default="test", help="sentiment split (default test)")
    e.add_argument("--seed", type=int, default=None, help="sentiment split seed (default: the run's, else 0)")
    e.add_argument("--ppl", default=None, metavar="FILE", help="text file for perplexity (default: Hamlet)")
    e.add_argument("--seqlen", type=positive_int, default=256, help="perplexity window in tokens (default 256)")
    e.add_argument("--nseq", type=positive_int, default=8, help="perplexity windows (default 8)")
    e.add_argument("--generate", action="append", default=[], metavar="PROMPT", help="greedy generation (repeatable)")
    e.add_argument("--max-new-tokens", type=positive_int, default=40)
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="activations (default: a run's training dtype, else fp32)")
    e.add_argument("--device", default=None, help="auto, cpu or cuda (default: a run's device setting, else auto)")
    e.add_argument("--batch-size", type=positive_int, default=None,
                   help="examples (perplexity: windows) per forward (default: a run's eval_batch_size, else 16; "
                        "perplexity 4)")
    e.add_argument("--max-length", type=positive_int, default=None,
                   help="task prompt tokens (default: a run's max_length, else 256)")
    e.add_argument("--template", choices=["review", "sst2", "goodbad"], default=None,
                   help="sentiment prompt template (default: a run's template, else review)")
    e.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                   help="with --task: also write each example's label, prediction and candidate scores")
    e.add_argument("--lm-eval-task", default=None, metavar="DIR",
                   help="with --task: write the examples this command would score as an lm-evaluation-harness task "
                        "in DIR (for lm_eval --include_path DIR) and exit; the model is not loaded")

    b = sub.add_parser("bench", help="speed benchmark: one ZO step per mode on a random model of a named shape",
                       description="Time zeroth-order steps (and the two-forward floor) on a random-weight model "
                                   "of a named shape; one JSON line per mode.",
                       epilog=EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--shape", default="tiny", help="a named shape (" + ", ".join(_shapes()) + "; default tiny) or "
                                                   "a model directory (its config.json; no weights are read)")
    b.add_argument("--mode", default=None,
                   help="comma list of forward (two plain forwards: the floor) and the methods' modes: "
                        + ", ".join(_bench_modes()) + " (default: the first)")
    b.add_argument("--batch", type=int, default=1, help="rows per step (default 1)")
    b.add_argument("--seq", type=int, default=512, help="tokens per row (default 512)")
    b.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    b.add_argument("--bits", type=int, default=4, choices=[2, 4, 8], help="code bits of the quantized modes")
    b.add_argument("--group-size", type=int, default=None,
                   help="input channels per scale; -1 = per channel (default: as qzo2 quantize picks it, 128 or the "
                        "largest of 64/32 that divides every layer)")
    b.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    b.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="activations and dense weights (default bf16 on cuda, fp32 on cpu)")
    b.add_argument("--depth", type=int, default=2, help="streamed modes: prefetch depth, device slots (>= 2)")
    b.add_argument("--compare", action="store_true", help="forward first (ratios), then a markdown table last")
    b.add_argument("--profile", action="store_true",
                   help="one more step of each mode under torch.profiler: its ops by self CPU time, in the record "
                        "and as a table")
    b.add_argument("-o", "--output", default=None, help="append the JSON lines to this file")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights, data and perturbations")
    pl = sub.add_parser("plan", help="will it fit? simulated GPU memory of every method for a model (no GPU needed)",
                        description="Run each method's real GPU step on fake tensors (no GPU, no weights read) and "
                                    "say its peak device memory, the placement qzo2 would take on a GPU of the "
                                    "given size, and the largest batch and longest sequence that fit.",
                        epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("model", help="a named shape (" + ", ".join(_shapes()) + ") or a model directory (its "
                                  "config.json: a dense HF model, or a GPTQ one whose bits and group size are used)")
    pl.add_argument("--method", default=None, help="comma list of methods (default: all): " + ", ".join(_methods()))
    pl.add_argument("--batch", type=positive_int, default=1, help="rows per step (default 1)")
    pl.add_argument("--seq", type=positive_int, default=512, help="tokens per row (default 512)")
    pl.add_argument("--gpu-memory", default="24GB", help="the GPU's memory, e.g. 24GB, 80GB (default 24GB)")
    pl.add_argument("--reserve", type=non_negative_float, default=1.0,
                    help="GB a real GPU needs beyond the simulated bytes: CUDA context (~0.5) and allocator cache "
                         "(default 1.0)")
    pl.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="activations and dense "
                                                                                    "weights (default bf16)")
    pl.add_argument("--bits", type=int, default=4, choices=[2, 4, 8], help="code bits of the quantized methods")
    pl.add_argument("--group-size", type=int, default=None, help="input channels per scale (default: as qzo2 "
                                                                 "quantize picks it)")
    pl.add_argument("--no-search", action="store_true", help="only batch x seq: skip the largest-batch and "
                                                              "longest-sequence searches (faster)")
    pl.add_argument("--json", action="store_true", help="one JSON line per method instead of the table")

    b.add_argument("--simulate", action="store_true",
                   help="no GPU needed: run each mode's real GPU step on fake tensors and report its device memory "
                        "(simulated_peak_gb and its breakdown), pinned host bytes and H2D/D2H per step; no timings")
    return p


def cmd_quantize(args) -> int:
    from .api import quantize

    if args.quiet:  # transformers' own bars too (dequantizing a .gguf source)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    report = quantize(args.src, args.output, bits=args.bits, group_size=args.group_size, sym=args.sym,
                      method=args.method, format=args.format, skip=args.skip, calib=args.calib,
                      nsamples=args.nsamples, seqlen=args.seqlen, desc_act=args.desc_act,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                      trust_remote_code=args.trust_remote_code, progress=not args.quiet, echo=print)
    print(report.summary(Path(args.output)))
    return 0


def cmd_train(args) -> int:
    from .config import config_yaml, load_config
    from .trainer import train

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():  # `qzo2 train key=value ...`, no recipe
        recipe, overrides = None, [recipe] + overrides
    cfg = load_config(recipe, overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    if _main_rank():
        print("# qzo2 train, resolved config\n" + config_yaml(cfg), end="", flush=True)
    result = train(cfg)
    best = f", best dev {result.best_metric:.4f} at step {result.best_step}" if result.best_step is not None else ""
    how = {None: "finished", signal.SIGINT: "interrupted (Ctrl-C), saved", signal.SIGTERM: "terminated, saved"}.get(
        result.signal, f"stopped by signal {result.signal}, saved")
    if _main_rank():  # rank 0 alone reports
        print(f"{how} at step {result.step} ({result.trained:,} trained values, {result.skipped} skipped "
              f"steps){best}; run: {result.run}")
    return 128 + result.signal if result.signal else 0  # 130 after Ctrl-C, 143 after SIGTERM, as shells do


def cmd_export(args) -> int:
    from .api import export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the clamp warning is printed below as one line
        report = export(args.run, args.output, format=args.format, dtype=args.dtype, checkpoint=args.checkpoint,
                        overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    if report.clamped:
        print(f"qzo2 export: warning: {report.clamped} trained scales were outside the checkpoint dtype's range "
              f"and were clamped", file=sys.stderr)
    if report.loss_warning():
        print(f"qzo2 export: warning: {report.loss_warning()}", file=sys.stderr)
    print(report.summary())
    return 0


def cmd_eval(args) -> int:
    from .evaluation import evaluate_model, write_lm_eval

    if args.lm_eval_task and not args.task:
        raise ValueError("--lm-eval-task needs --task (sentiment or a task .yaml)")
    if args.task and args.task != "sentiment" and not args.data:
        raise ValueError(f"--task {args.task} needs --data PATH with its examples")
    task = dict(task=args.task or None, data=args.data, split=args.split, seed=args.seed, template=args.template,
                max_length=args.max_length)  # settings a run dir's config fills in (TrainConfig's for a model)
    if args.lm_eval_task:  # the examples only: the model is not loaded (its tokenizer is, to check the mapping)
        t = write_lm_eval(args.lm_eval_task, args.model, **task)
        lines = [f"wrote lm-eval task {t.name} ({t.n} examples of {t.about}): {t.path}",
                 f"score a model directory (a `qzo2 export` of a run) on it: lm_eval --model hf --model_args "
                 f"pretrained={t.model_dir or 'EXPORT_DIR'},dtype=float32 --include_path {args.lm_eval_task} "
                 f"--tasks {t.name}"]
        lines += (["(no tokenizer directory to check the candidates' tokens with)"] if t.caveats is None
                  else [f"warning: {w}" for w in t.caveats])
    else:
        r = evaluate_model(args.model, checkpoint=args.checkpoint, dtype=args.dtype, device=args.device,
                           batch_size=args.batch_size, predictions=args.predictions, prompts=args.generate,
                           max_new_tokens=args.max_new_tokens, ppl=bool(args.ppl) or not (args.task or args.generate),
                           text_file=args.ppl, seqlen=args.seqlen, nseq=args.nseq, **task)
        lines = []
        if r.metrics is not None:
            m = r.metrics
            lines.append(f"{args.model or 'default'}: {r.about}: accuracy {m['accuracy']:.4f} on {m['n']} examples "
                         f"(candidate loss {m['loss']:.4f}; predicted classes "
                         f"{' / '.join(f'{x:.3f}' for x in m['predicted'])})")
        if r.predictions is not None:
            lines.append(f"per-example candidate scores (mean log-prob per token): {r.predictions}")
        lines += [f"> {prompt}\n{text}" for prompt, text in r.generations]
        if r.perplexity is not None:
            lines.append(f"perplexity {r.perplexity:.2f} ({r.windows}x{args.seqlen} tokens of {r.text.name})")
    for line in lines:
        print(line)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    run_bench(args.shape, args.mode or _bench_modes()[0], args.batch, args.seq, args.steps, args.warmup, args.bits, args.group_size,
              args.device, args.dtype, args.depth, args.compare, args.output, args.seed,
              echo=lambda line: print(line, flush=True), simulate=args.simulate, profile=args.profile)
    return 0


def cmd_plan(args) -> int:
    import json

    from .plan import format_plan, plan

    methods = [m.strip() for m in args.method.split(",") if m.strip()] if args.method is not None else None
    if methods == []:
        raise ValueError("--method is empty; give a comma list of methods (qzo2 plan --help lists them), or leave it "
                         "out for all")
    echo = (lambda row: print(json.dumps(dict(vars(row), simulated=True)), flush=True)) if args.json else None
    rows = plan(args.model, methods, args.batch, args.seq, args.gpu_memory, args.dtype, args.bits, args.group_size,
                args.reserve, not args.no_search, echo=echo)
    if not args.json:
        print(format_plan(rows, args.model, args.batch, args.seq, args.gpu_memory, args.reserve, args.dtype))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop: unwind like Ctrl-C (temporary directories are removed), exit 143."""


def _terminate(signum, frame):
    raise Terminated


def _runtime_error(verb: str, where: str, e: RuntimeError) -> int:
    """A collective that failed because another rank stopped (its own error line says why) gets one line; any other
    RuntimeError is a bug and keeps its traceback."""
    if not where or "DistBackendError" not in {c.__name__ for c in type(e).__mro__}:
        raise e
    print(f"qzo2 {verb}: error{where}: another rank stopped, so this one cannot go on "
          f"({(str(e).splitlines() or [''])[0][:200]})", file=sys.stderr)
    return 1


def _main_rank() -> bool:
    """Not a rank of torchrun / accelerate launch, or its rank 0: the process that prints reports."""
    return os.environ.get("RANK", "").strip() in ("", "0")


def _rank_tag() -> str:
    """' (rank R of N)' under torchrun / accelerate launch, so each rank's one error line says whose it is."""
    size = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {size})" if size.strip() not in ("", "1") else ""


# import-time warnings of packages the gptq extra installs (torchao's missing CUDA libraries on a CPU machine, torch's
# deprecation of their enum registration): noise on every command, not about the user's input
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def _methods() -> tuple[str, ...]:
    from .methods import registry

    return registry.names()


def _shapes() -> tuple[str, ...]:
    from .bench import SHAPES

    return tuple(SHAPES)


def _bench_modes() -> tuple[str, ...]:
    from .bench import mode_names

    return mode_names()[1:]


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("QZO2_DEBUG", "").strip() in ("", "0"):
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument already reported in one line
        return int(e.code or 0)
    handler = {"quantize": cmd_quantize, "train": cmd_train, "export": cmd_export, "eval": cmd_eval,
               "bench": cmd_bench, "plan": cmd_plan}[args.verb]
    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C, so temporary directories are removed
    where = _rank_tag()
    try:
        return handler(args)
    except (ValueError, OSError, ImportError, RuntimeError) as e:  # Config/Data/TrainingError: ValueErrors
        if os.environ.get("QZO2_DEBUG", "").strip() not in ("", "0"):
            raise  # the whole traceback, for a bug report
        if isinstance(e, RuntimeError):
            return _runtime_error(args.verb, where, e)
        if isinstance(e, OSError):  # read-only or full disk, permissions, a vanished file: say which file
            print(f"qzo2 {args.verb}: error{where}: {os_error_line(e)}", file=sys.stderr)
            return 2
        print(f"qzo2 {args.verb}: error{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the training loop handles its own (it saves); this is before or outside it
        terminated = isinstance(e, Terminated)
        print(f"qzo2 {args.verb}: {'terminated' if terminated else 'interrupted'}; nothing was written",
              file=sys.stderr)
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
