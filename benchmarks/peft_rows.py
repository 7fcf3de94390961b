#!/usr/bin/env python
"""The rows users compare qzo2 against: peft LoRA on the fp32 model and QLoRA on a bitsandbytes NF4 base, trained
and scored exactly as the accuracy benchmark's qzo2 rows (benchmarks/accuracy.py): the same splits, batches, loss,
lr schedule, dev evaluation and best-dev selection (qzo2's own data, objective and evaluation code), test accuracy
as `qzo2 eval --task sentiment` computes it. Benchmark-only: needs `pip install -e '.[bench]'` (peft).

    .venv/bin/python benchmarks/peft_rows.py lora  [--seed S] [--rank 16] [key=value ...]   # base recipe overrides
    .venv/bin/python benchmarks/peft_rows.py qlora [--seed S] [--rank 16] [key=value ...]
    .venv/bin/python benchmarks/peft_rows.py lora-nf4 ...    # QLoRA's numbers without bitsandbytes (a diagnosis)
    .venv/bin/python benchmarks/peft_rows.py check-nf4       # bitsandbytes' NF4 against its dequantized twin

Prints one JSON line: dev accuracy by step, best step, test accuracy, train wall time; benchmarks/accuracy.py runs it
as its `lora` / `qlora` rows (its process's peak RSS measured there). AdamW (torch.optim, no weight decay) on the
adapters; LoRA on every Linear of the decoder blocks (q/k/v/o, gate/up/down), alpha = 2 * rank, no dropout. QLoRA:
the same adapters over the model's decoder Linears quantized by bitsandbytes to NF4 (blocks of 64, fp32 compute),
peft's prepare_model_for_kbit_training (norms and head in fp32); the adapters are scored on the NF4 base (not merged).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

BASE = Path(__file__).resolve().with_name("accuracy-base.yaml")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(kind: str, rank: int, dtype=torch.float32):
    """(peft model, tokenizer): the embedded SmolLM2 in fp32 (lora) or with NF4 decoder Linears (qlora)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qzo2.model import load_model

    model, tokenizer = load_model(None, dtype=dtype)
    if kind == "qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:  # bitsandbytes quantizes while loading a checkpoint directory
            config = copy.deepcopy(model.config)  # the default model comes from a GGUF: save it as plain HF
            config.__dict__.pop("quantization_config", None)
            plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
            plain.load_state_dict(model.state_dict())
            plain.save_pretrained(tmp)
            del plain
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                     bnb_4bit_use_double_quant=False, llm_int8_skip_modules=["lm_head"])
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb, dtype=dtype,
                                                         device_map={"": "cpu"}, local_files_only=True)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


def dequantized_copy(model):
    """An fp32 copy of a peft model whose bitsandbytes Linear4bit bases are replaced by nn.Linear holding their
    dequantized weights (the adapters copied as they are): what the NF4 model computes, without bitsandbytes."""
    import copy

    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit):
            w = F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            dense = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            dense.weight.data.copy_(w)
            dense.weight.requires_grad_(False)
            if m.bias is not None:
                dense.bias.data.copy_(m.bias.data.float())
                dense.bias.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, dense)
    return twin


def check_nf4(seed: int, rank: int, batches: int = 3) -> dict:
    """Is bitsandbytes' CPU NF4 path right? On training batches of the benchmark: the loss and every LoRA gradient
    of the NF4 model against those of its dequantized fp32 twin (the adapters' B is made non-zero first, so the
    gradients of A are not all zero)."""
    from qzo2 import data as D
    from qzo2 import objective
    from qzo2.config import load_config
    from qzo2.trainer import step_batch

    cfg = load_config(str(BASE), [f"seed={seed}", "method=adamw"])
    torch.manual_seed(seed)
    model, tokenizer = lora_model("qlora", rank)
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    twin = dequantized_copy(model)
    task = D.build_task(cfg, tokenizer, D.read_data(cfg))
    out = []
    for step in range(batches):
        batch = step_batch(task, tokenizer, cfg, step)
        result = []
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            sums, _ = objective.chunk_sums(m, task.kind, batch, 1)
            loss = sums[0] / max(objective.loss_weight(task.kind, batch), 1.0)
            loss.backward()
            result.append((float(loss), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}))
        (la, ga), (lb, gb) = result
        rel = max(float((ga[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-30)) for n in gb)
        out.append({"step": step, "loss_nf4": la, "loss_dequantized": lb, "max_rel_grad_diff": rel,
                    "grads": len(gb)})
    return {"check": "nf4 vs dequantized fp32", "batches": out}


def train(kind: str, seed: int, rank: int, overrides: list[str]) -> dict:
    from qzo2 import data as D
    from qzo2 import objective
    from qzo2.config import load_config, lr_at
    from qzo2.evaluation import evaluate_model
    from qzo2.trainer import step_batch

    cfg = load_config(str(BASE), [f"seed={seed}", "method=adamw", *overrides])  # adamw: no method keys to ignore
    torch.manual_seed(seed)
    model, tokenizer = lora_model("qlora" if kind == "lora-nf4" else kind, rank)
    if kind == "lora-nf4":  # the QLoRA model with its NF4 layers dequantized: the same numbers, no bitsandbytes
        model = dequantized_copy(model)
    model.eval()  # dropout off, as qzo2 trains
    task = D.build_task(cfg, tokenizer, D.read_data(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    dev, best, best_state = {}, None, None

    def evaluate(step: int):
        nonlocal best, best_state
        with torch.no_grad():
            m = objective.evaluate(model, task.dev_kind, task.dev, tokenizer, cfg.max_length, cfg.eval_batch_size)
        dev[step] = m["accuracy"]
        if best is None or m["accuracy"] > dev[best]:  # the first best, as the trainer keeps it
            best, best_state = step, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    t0 = time.perf_counter()
    evaluate(0)
    losses = []
    for step in range(cfg.steps):
        batch = step_batch(task, tokenizer, cfg, step)
        sums, _ = objective.chunk_sums(model, task.kind, batch, 1)
        loss = sums[0] / max(objective.loss_weight(task.kind, batch), 1.0)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"non-finite loss at step {step}")
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate(step + 1)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in best_state:
                p.copy_(best_state[n])
    scored = model.merge_and_unload() if kind == "lora" else model  # adapters on NF4 (or its twin): scored unmerged
    test = evaluate_model(scored, tokenizer, task="sentiment", split="test", seed=seed, template=cfg.template)
    return {"kind": kind, "rank": rank, "lr": cfg.lr, "steps": cfg.steps, "seed": seed, "dev_accuracy": dev,
            "best_step": best, "test_accuracy": test.metrics["accuracy"], "train_wall_s": round(wall, 1),
            "loss_first_last": [round(sum(losses[:10]) / 10, 4), round(sum(losses[-10:]) / 10, 4)],
            "trained_values": sum(p.numel() for p in params)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["lora", "qlora", "lora-nf4", "check-nf4"],
                   help="lora-nf4: LoRA on the NF4 weights dequantized to fp32 (QLoRA without bitsandbytes in the "
                        "loop); check-nf4: bitsandbytes' NF4 loss and LoRA gradients against that fp32 twin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("overrides", nargs="*", help="key=value on top of benchmarks/accuracy-base.yaml (e.g. lr=2e-4)")
    args = p.parse_intermixed_args(argv)
    if args.kind == "check-nf4":
        print(json.dumps(check_nf4(args.seed, args.rank)), flush=True)
        return 0
    print(json.dumps(train(args.kind, args.seed, args.rank, args.overrides)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
