"""The `qzo2` command: thin verbs that parse, validate and call the library."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG_QUANTIZE = """examples:
  qzo2 quantize -o runs/smollm2-int4                       # the embedded SmolLM2-135M, RTN int4 g128, GPTQ v1
  qzo2 quantize path/to/hf-model -o q8 --bits 8 --group-size -1
  qzo2 quantize path/to/hf-model -o q4 --method gptq --calib data.txt   # needs: pip install 'qzo2[gptq]'
  qzo2 quantize -o nf4 --format nf4 --group-size 64          # bitsandbytes NF4, fp32 absmax per block

The output is a standard GPTQ checkpoint (qweight/qzeros/scales/g_idx in safetensors, quantize_config.json) that
transformers + optimum + gptqmodel load, and that `qzo2 train` fine-tunes by training the scales."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _size(text: str) -> int:
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "b": 1}
    t = text.strip().lower()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qzo2", description="Quantization-first zeroth-order fine-tuning of LLMs.")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a causal LM into a GPTQ (or NF4) checkpoint",
                       description="Quantize a Hugging Face causal LM into int codes with per-group scales.",
                       epilog=EPILOG_QUANTIZE, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("src", nargs="?", default=None,
                   help="local HF model directory (safetensors) or .gguf file; default: the embedded SmolLM2-135M")
    q.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--bits", type=int, default=4, choices=[2, 4, 8], help="bits per weight (default 4)")
    q.add_argument("--group-size", type=int, default=None, choices=[-1, 32, 64, 128, 256],
                   help="input channels sharing one scale; -1 = one per output channel (default: 128, or the "
                        "largest of 64/32 that divides every layer's in_features, e.g. 64 for SmolLM2's 576)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with a zero point per group")
    q.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="rtn: round to nearest (fast, no data); gptq: error-compensating GPTQ via gptqmodel")
    q.add_argument("--format", choices=["gptq", "gptq_v2", "nf4"], default="gptq",
                   help="gptq: v1 layout most tools read (default); gptq_v2: true zero points; nf4: bitsandbytes")
    q.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="regex of Linear names to keep unquantized (repeatable), e.g. --skip 'mlp\\.down_proj'")
    q.add_argument("--calib", default=None, help="GPTQ calibration text file (default: Hamlet, shipped offline)")
    q.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration sequences (default 128)")
    q.add_argument("--seqlen", type=int, default=512, help="GPTQ calibration sequence length (default 512)")
    q.add_argument("--desc-act", action="store_true", help="GPTQ act-order (columns by decreasing activation)")
    q.add_argument("--max-shard-size", type=_size, default="4GB", help="safetensors shard size (default 4GB)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--trust-remote-code", action="store_true", help="allow model code from the source directory")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a model (perplexity on a text file)",
                       description="Evaluate a model: perplexity on a text file (default: Hamlet, shipped offline).")
    e.add_argument("model", nargs="?", default=None,
                   help="quantized dir, HF model dir or .gguf file; default: the embedded SmolLM2-135M")
    e.add_argument("--ppl", default=None, metavar="FILE", help="text file for perplexity (default: Hamlet)")
    e.add_argument("--seqlen", type=int, default=256)
    e.add_argument("--nseq", type=int, default=8)
    e.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    return p


def cmd_quantize(args) -> int:
    from quant.checkpoint import atomic_dir, auto_group_size, open_source, quantize
    from quant.format import QuantConfig

    from .model import default_text_path, resolve_source

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise ValueError(f"output {out} already exists (pass --overwrite to replace it)")
    source = open_source(resolve_source(args.src), trust_remote_code=args.trust_remote_code)
    group_size = args.group_size
    if group_size is None:
        group_size = auto_group_size(source.config, args.skip, (64,) if args.format == "nf4" else (128, 64, 32))
        print(f"group size {group_size}")
    fmt = "gptq" if args.format == "nf4" else args.format
    cfg = QuantConfig(bits=args.bits, group_size=group_size, sym=args.sym, desc_act=args.desc_act,
                      checkpoint_format=fmt, method=args.method)
    calib = Path(args.calib) if args.calib else None
    if args.method == "gptq" and calib is None:
        calib = default_text_path()
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        report = quantize(source, tmp, cfg, fmt=args.format, skip=args.skip, calib=calib, nsamples=args.nsamples,
                          seqlen=args.seqlen, max_shard_bytes=args.max_shard_size, progress=not args.quiet)
    print(report.summary(out))
    return 0


def cmd_eval(args) -> int:
    import torch

    from .evaluate import perplexity
    from .model import default_text_path, load_model

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, tok = load_model(args.model, dtype=dtype)
    path = Path(args.ppl) if args.ppl else default_text_path()
    if not path.is_file():
        raise ValueError(f"text file {path} does not exist")
    ppl = perplexity(model, tok, path.read_text(encoding="utf-8"), seqlen=args.seqlen, nseq=args.nseq)
    print(f"perplexity {ppl:.2f} ({args.nseq}x{args.seqlen} tokens of {path.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument already reported in one line
        return int(e.code or 0)
    handler = {"quantize": cmd_quantize, "eval": cmd_eval}[args.verb]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # CheckpointError is a ValueError
        print(f"qzo2 {args.verb}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qzo2 {args.verb}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
