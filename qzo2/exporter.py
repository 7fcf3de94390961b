"""`qzo2 export`: a run's trained tensors written out as a checkpoint people can serve.

  gptq / gptq_v2  the source GPTQ checkpoint with only `scales` replaced by the trained ones (in the source's scale
                  dtype, fp16 for every GPTQ loader, clamped into its range). qweight, g_idx and every other tensor
                  are copied byte for byte; qzeros too, unless the export changes v1 <-> v2 (then only re-encoded).
  hf              every quantized Linear dequantized with its trained scales (W = Δ·(q − z)) into a plain
                  `weight`, all floats cast to --dtype: a checkpoint stock transformers loads with no quantization
                  package. For a MeZO run, the base weights with the trained ones swapped in.

Both stream one tensor at a time from the source's safetensors into shards, so memory stays near one shard plus one
layer whatever the model size, and both write into a temporary directory renamed into place at the end.
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from quant.checkpoint import (
    CheckpointError, ShardWriter, atomic_dir, checkpoint_tensors, copy_tokenizer_files, fill_architectures,
    is_quantized_part, open_quantized, open_source, read_tensor, write_json,
)
from quant.format import convert_qzeros

from .export_gguf import DTYPES as GGUF_DTYPES, GGUF_NAME, export_gguf
from .model import DTYPES, is_quantized_dir, resolve_source
from .outputs import clear_stale_lock, guard_output, locked, remove_stale, write_marker

FORMATS = ("gptq", "gptq_v2", "hf", "gguf")
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass
class Trained:
    """What to export: the base model and the tensors a run trained (empty for a plain model directory)."""

    base: str
    tensors: dict[str, torch.Tensor]
    run: dict = field(default_factory=dict)  # method, step, task, metrics ... for the model card; {} if no run


@dataclass
class ExportReport:
    out: Path
    fmt: str
    replaced: int = 0  # tensors that differ from the source because training changed them
    dequantized: int = 0  # quantized Linears merged into plain weights (hf)
    copied: int = 0  # tensors written unchanged (byte-identical for gptq)
    clamped: int = 0  # trained scales pulled into the checkpoint dtype's range
    changed: int = 0  # written values (weights for hf, scales for gptq) that training changed, in fp32
    lost: int = 0  # ... of which the cast to the output dtype rounds back to the untrained value
    dtype: str = ""
    bytes: int = 0
    gguf: object = None  # export_gguf.GGUFReport of a gguf export

    def count_change(self, new: torch.Tensor, old: torch.Tensor, dtype: torch.dtype) -> None:
        """Count the values training moved (new != old in fp32) and those the cast to `dtype` erases."""
        new, old = new.float(), old.float()
        moved = new != old
        self.changed += int(moved.sum())
        self.lost += int((moved & (new.to(dtype) == old.to(dtype))).sum())

    def loss_warning(self) -> str | None:
        """One line when the cast erased most of the trained change, else None."""
        if not self.changed or self.lost * 2 <= self.changed:
            return None
        hint = ("export --format hf --dtype fp32 keeps them" if self.fmt != "hf" or self.dtype != "fp32"
                else "")
        return (f"the {self.dtype} cast erases the trained change of {self.lost:,} of {self.changed:,} changed "
                f"values ({100 * self.lost / self.changed:.1f}%)" + (f"; {hint}" if hint else ""))

    def summary(self) -> str:
        if self.gguf is not None:
            types = ", ".join(f"{n} {t}" for t, n in sorted(self.gguf.types.items()))
            err = (f"; Q4_1 offsets within {self.gguf.q4_1_max_error:.2g} of s·(q − z)"
                   if self.gguf.q4_1_max_error else "")
            return (f"exported gguf to {self.out / GGUF_NAME} with an Ollama Modelfile ({self.replaced} trained "
                    f"tensors; {types}{err}; {self.bytes / 2**20:.1f} MiB)")
        parts = [f"{self.replaced} trained tensors"]
        if self.dequantized:
            parts.append(f"{self.dequantized} Linears dequantized")
        parts.append(f"{self.copied} tensors copied")
        if self.clamped:
            parts.append(f"{self.clamped} scales clamped")
        return f"exported {self.fmt} checkpoint to {self.out} ({', '.join(parts)}; {self.bytes / 2**20:.1f} MiB)"


# ---- what to export -------------------------------------------------------------------------------------------------
def load_run(path: str, checkpoint: str = "auto") -> Trained:
    """A run directory -> its base model and the trained tensors of `checkpoint` (auto = best if the run has one,
    else last; best; last; or a step number); any model
    directory or .gguf -> itself with nothing trained (so `export --format hf` also dequantizes a plain GPTQ dir)."""
    from .config import TrainConfig, load_config as load_train_config
    from .run import RunDir, check_inputs, fingerprint, is_run_dir, read_state, read_trained

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path} does not exist")
    if not is_run_dir(p):
        return Trained(str(p), {})
    run = RunDir(p)
    ckpt = run.checkpoint(checkpoint)  # auto: best by dev metric when the run evaluated, else the last step
    state = read_state(ckpt)
    cfg = (TrainConfig.from_saved(state["config"]) if state.get("config")  # the config it was trained with
           else load_train_config(str(p / "config.yaml"), saved=True))
    base = resolve_source(cfg.model)
    if not Path(base).exists():
        raise CheckpointError(f"the base model {base} of run {path} does not exist (moved or deleted?); restore it "
                              f"there to export this run")
    check_inputs(state.get("inputs"), {"model": fingerprint(base)}, ckpt, keys=("model",), cfg=cfg)
    metrics = [m for m in run.read_metrics() if m.get("step") == state["step"]]
    info = dict(method=cfg.method, step=state["step"], steps=cfg.steps, checkpoint=checkpoint, task=cfg.task,
                train_file=cfg.train_file, n_train=cfg.n_train, objective=cfg.objective, lr=cfg.lr,
                options=_changed_options(cfg), first_order=cfg.spec.first_order, batch_size=cfg.batch_size,
                seed=cfg.seed, base=cfg.model, trained_values=state.get("trained"),
                dtype=cfg.dtype,
                dev={k: v for m in metrics for k, v in m.items() if k.startswith("dev_")})
    tensors = read_trained(ckpt)
    scales = sum(k.endswith(".scales") for k in tensors)
    info["trains"] = ("quantization scales" + (" and other tensors" if scales < len(tensors) else "")
                      if scales else "weights")
    return Trained(resolve_source(cfg.model), tensors, info)


def _changed_options(cfg) -> dict:
    """The method's own keys that differ from their defaults (for the model card)."""
    if cfg.options is None:
        return {}
    return {f.name: getattr(cfg.options, f.name) for f in dataclasses.fields(cfg.options)
            if getattr(cfg.options, f.name) != f.default}


# ---- scales -----------------------------------------------------------------------------------------------------------
def checkpoint_scales(trained: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """fp32 trained scales -> `dtype` (the checkpoint's, fp16 for GPTQ), clamped into (0, max]: a scale above the
    dtype's max would become inf, one below its smallest subnormal would become 0 (a dead group). Returns the
    tensor and how many values were clamped."""
    if not torch.isfinite(trained).all():
        raise CheckpointError("trained scales contain NaN/inf; export a checkpoint from before the divergence")
    info = torch.finfo(dtype)
    lo = info.smallest_normal * info.eps if dtype in (torch.float16, torch.bfloat16) else info.tiny  # min subnormal
    t = trained.to(torch.float32)
    clamped = int(((t > info.max) | (t < lo)).sum())
    return t.clamp(lo, info.max).to(dtype), clamped


# ---- writers ------------------------------------------------------------------------------------------------------------
def export_gptq(t: Trained, tmp: Path, fmt: str, max_shard_bytes: int, report: ExportReport) -> None:
    base = Path(t.base)
    config = json.loads((base / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "gptq":
        kind = qc.get("quant_method") or "not quantized"
        raise CheckpointError(f"--format {fmt} needs a GPTQ base model; {base} is {kind} (use --format hf)")
    src_fmt = qc.get("checkpoint_format", "gptq")
    names, where = checkpoint_tensors(base)
    unknown = sorted(set(t.tensors) - set(names))
    if unknown:
        raise CheckpointError(f"trained tensor {unknown[0]} is not in the base checkpoint {base}")
    writer = ShardWriter(tmp, max_shard_bytes)
    for name in names:
        tensor = read_tensor(where, name)
        if name in t.tensors:
            new = t.tensors[name]
            if tuple(new.shape) != tuple(tensor.shape):
                raise CheckpointError(f"trained {name} has shape {tuple(new.shape)}, the base {tuple(tensor.shape)}")
            report.count_change(new, tensor, tensor.dtype)
            if name.endswith(".scales"):
                tensor, n = checkpoint_scales(new, tensor.dtype)
                report.clamped += n
            else:  # an unquantized tensor trained beside the scales (also_train: a norm gain, the head)
                tensor = new.to(tensor.dtype)
            report.replaced += 1
        elif name.endswith(".qzeros") and src_fmt != fmt:
            tensor = convert_qzeros(tensor, int(qc["bits"]), src_fmt, fmt)
            report.copied += 1
        else:
            report.copied += 1
        writer.add(name, tensor)
    writer.finish()
    report.bytes = writer.total
    config["quantization_config"] = dict(qc, checkpoint_format=fmt)
    write_json(tmp / "config.json", config)
    qfile = base / "quantize_config.json"
    quantize_config = json.loads(qfile.read_text()) if qfile.exists() else dict(qc)
    write_json(tmp / "quantize_config.json", dict(quantize_config, checkpoint_format=fmt))
    copy_tokenizer_files(base, tmp)


def export_hf(t: Trained, tmp: Path, dtype: torch.dtype, max_shard_bytes: int, report: ExportReport) -> None:
    base = Path(t.base)
    writer = ShardWriter(tmp, max_shard_bytes)

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype) if x.is_floating_point() else x

    if is_quantized_dir(base):
        q = open_quantized(base)  # its meta skeleton: only the Linears' shapes are read from it
        config, names, where, suffix, read_layer, quantized, skeleton = (q.config, q.names, q.where, q.suffix,
                                                                         q.read_layer, q.quantized, q.skeleton)
        unknown = sorted(n for n in t.tensors if n.rpartition(".")[0] not in quantized and n not in where)
        if unknown:
            raise CheckpointError(f"trained tensor {unknown[0]} is not a quantized layer's scales in {base}")
        for name in names:
            if name.endswith(suffix):
                mod = name[: -len(suffix)]
                layer = read_layer(mod, skeleton.get_submodule(mod))
                scales = t.tensors.get(f"{mod}.scales")
                if scales is not None:
                    if tuple(scales.shape) != tuple(layer.scales.shape):
                        raise CheckpointError(f"trained {mod}.scales has shape {tuple(scales.shape)}, "
                                              f"the base {tuple(layer.scales.shape)}")
                    report.replaced += 1
                # the merge: W = Δ·(q − z) with the trained Δ, computed in fp32, then cast once
                weight = layer.dequantize(scales, torch.float32)
                if scales is not None:
                    report.count_change(weight, layer.dequantize(None, torch.float32), dtype)
                writer.add(f"{mod}.weight", weight.to(dtype))
                report.dequantized += 1
                if f"{mod}.bias" in where:
                    writer.add(f"{mod}.bias", cast(read_tensor(where, f"{mod}.bias")))
            elif is_quantized_part(name, quantized):
                continue  # codes, zeros, scales, g_idx, bias (written above), bitsandbytes state
            elif name in t.tensors:  # trained beside the scales (also_train)
                report.count_change(t.tensors[name], read_tensor(where, name), dtype)
                writer.add(name, cast(t.tensors[name]))
                report.replaced += 1
            else:
                writer.add(name, cast(read_tensor(where, name)))
                report.copied += 1
        copy_tokenizer_files(base, tmp)
    else:
        source = open_source(base)
        config = source.config
        unknown = sorted(set(t.tensors) - set(source.names))
        if unknown:
            raise CheckpointError(f"trained tensor {unknown[0]} is not in the base model {base}")
        for name in source.names:
            if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
                continue  # tied: transformers rebuilds it from the (possibly trained) embedding
            if name in t.tensors:
                report.count_change(t.tensors[name], source.get(name), dtype)
                writer.add(name, cast(t.tensors[name]))
                report.replaced += 1
            else:
                writer.add(name, cast(source.get(name)))
                report.copied += 1
        source.save_tokenizer(tmp)  # a .gguf source saves the tokenizer it carries
    writer.finish()
    report.bytes = writer.total
    d = fill_architectures(config.to_dict())
    d.pop("quantization_config", None)
    d.pop("torch_dtype", None)
    d["dtype"] = DTYPE_NAMES[dtype]
    write_json(tmp / "config.json", d)


def model_card(t: Trained, fmt: str, dtype: str) -> str:
    """README.md for the exported directory: what it is, how it was made, how to load it."""
    r = t.run
    kind = {"gptq": "GPTQ (v1) checkpoint", "gptq_v2": "GPTQ v2 checkpoint",
            "hf": f"merged {dtype} Hugging Face checkpoint", "gguf": "GGUF file"}[fmt]
    order = "first-order" if r and r["first_order"] else "zeroth-order"
    tags = ["qzo2"] + ([order] if r else []) + {"hf": [], "gguf": ["gguf"]}.get(fmt, ["gptq"])
    lines = ["---", yaml.safe_dump({"library_name": "transformers", "tags": tags}, sort_keys=False).strip(), "---",
             "", f"# {kind} exported by qzo2", ""]
    if r:
        what = r["trains"]
        data = r["task"] or r["train_file"]
        lines += [f"- Base model: `{r['base']}`",
                  f"- Method: {r['method']}, trains the {what}; {r['trained_values']:,} trained values",
                  f"- Steps: {r['step']} of {r['steps']} ({r['checkpoint']} checkpoint); batch {r['batch_size']}, "
                  f"lr {r['lr']}, seed {r['seed']}" + "".join(f", {k} {v}" for k, v in r["options"].items()),
                  f"- Data: {data} ({r['objective']}, {r['n_train']} training examples)"]
        if r["dev"]:
            lines.append("- Dev metrics at this step: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["dev"].items())
                                                                     if isinstance(v, float)))
    else:
        lines.append(f"- Source: `{t.base}` (no training run: exported as is)")
    if fmt == "hf":
        lines += ["", "Load with `AutoModelForCausalLM.from_pretrained(path)`; no quantization package is needed."]
    elif fmt == "gguf":
        lines += ["", f"`{GGUF_NAME}` holds the quantized Linears as GGUF blocks built from the base's codes and the "
                  "trained scales (not re-quantized). Serve it with `llama-cli -m " + GGUF_NAME + "`, or "
                  "`ollama create NAME -f Modelfile`; transformers reads it with `from_pretrained(dir, "
                  f"gguf_file=\"{GGUF_NAME}\")`."]
    else:
        lines += ["", "Codes, zero points and g_idx are the base checkpoint's; only `scales` changed. Load with "
                  "transformers + optimum + gptqmodel (`AutoModelForCausalLM.from_pretrained(path)`), or any GPTQ "
                  "runtime (vLLM, TGI, ExLlama)."]
    return "\n".join(lines) + "\n"


def default_dtype(t: Trained) -> str:
    """--dtype when not given: the run's training dtype (an fp32 run exported in bf16 would lose most of its
    change: MeZO's lr-1e-6 updates are far below a bf16 ulp), else the source config's dtype, else bf16."""
    if t.run.get("dtype"):
        return t.run["dtype"]
    try:
        named = json.loads((Path(t.base) / "config.json").read_text()).get("dtype")
    except (OSError, ValueError):
        named = None
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(named, "bf16")


def export(path: str, out: str, fmt: str = "gptq", dtype: str | None = None, checkpoint: str = "auto",
           overwrite: bool = False, max_shard_bytes: int = 4 << 30) -> ExportReport:
    """Export a run (or a model directory) to `out`; dtype (hf only) None = default_dtype. The report counts
    what training changed and what the cast erased (report.loss_warning())."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    if fmt == "gguf":  # --dtype names the GGUF type of the tensors that are not quantized Linears
        dtype = {"fp16": "f16", "fp32": "f32"}.get(dtype, dtype)
        if dtype is not None and dtype not in GGUF_DTYPES:
            raise CheckpointError(f"unknown GGUF dtype {dtype!r}; choose from {GGUF_DTYPES}")
    elif dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose from {tuple(DTYPES)}")
    guard_output(out, [path], replace=overwrite)  # before anything loads; the base is checked once known
    t = load_run(path, checkpoint)
    if fmt != "gguf":
        dtype = dtype or default_dtype(t)
    target = guard_output(out, [path, t.base], replace=overwrite)
    if target.exists() and not overwrite:
        clear_stale_lock(target)
        raise CheckpointError(f"output {out} already exists (pass --overwrite to replace it)")
    report = ExportReport(Path(out), fmt, dtype=dtype if fmt == "hf" else "fp16")
    gguf_report = None
    with locked(target, "export"):  # one writer per output; what a killed export left goes first
        remove_stale(target.parent, re.escape(target.name))
        with atomic_dir(target, overwrite=overwrite) as tmp:
            if fmt == "hf":
                export_hf(t, tmp, DTYPES[dtype], max_shard_bytes, report)
            elif fmt == "gguf":
                gguf_report = export_gguf(t, tmp, dtype, report)
            else:
                export_gptq(t, tmp, fmt, max_shard_bytes, report)
            (tmp / "README.md").write_text(model_card(t, fmt, dtype))
            write_marker(tmp, "export", format=fmt, source=str(Path(path).resolve()),
                         checkpoint=t.run.get("step"))
            guard_output(out, [path, t.base], replace=overwrite)  # again, under the lock, just before the swap
    report.gguf = gguf_report
    if report.clamped:
        warnings.warn(f"{report.clamped} trained scales were outside the checkpoint dtype's range and were clamped",
                      stacklevel=2)
    if report.loss_warning():
        warnings.warn(report.loss_warning(), stacklevel=2)
    return report
