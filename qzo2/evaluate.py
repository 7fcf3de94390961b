"""Evaluation: perplexity on a text file, greedy generations, and `qzo2 eval` (task accuracy via objective.evaluate)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seqlen: int = 256, nseq: int = 8, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the first nseq non-overlapping windows of seqlen tokens."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(nseq, ids.numel() // seqlen)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    total, count = 0.0, 0
    device = model.get_input_embeddings().weight.device
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation (chat template applied when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None))
    ids = ids.to(model.get_input_embeddings().weight.device)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def load_for_eval(path: str | None, checkpoint: str = "best", dtype: str | None = None, device: str | None = None):
    """A run dir (its base model + trained tensors of `checkpoint`, placed as the run was: its dtype and device
    unless given) or any model (dtype default fp32, device default auto, streamed if it does not fit as training
    would) -> (model, tokenizer, run config or None)."""
    from .config import load_config
    from .engine import place_model
    from .methods import DTYPES, load_for_training
    from .model import load_model, resolve_device, resolve_source
    from .run import RunDir, is_run_dir, load_trained

    if path and is_run_dir(path):
        cfg = load_config(str(Path(path) / "config.yaml"))
        cfg.dtype = dtype or cfg.dtype
        cfg.device = device or cfg.device
        model, tokenizer, method = load_for_training(cfg)
        load_trained(RunDir(path).checkpoint(checkpoint), method.targets)
        method.close()  # a plain model from here on: no hooks, nothing requires grad
        return model, tokenizer, cfg
    if path and not Path(resolve_source(path)).exists():
        raise ValueError(f"model {path} does not exist")
    model, tokenizer = load_model(path, dtype=DTYPES[dtype or "fp32"])
    place_model(model, resolve_device(device or "auto"))
    return model, tokenizer, None


def evaluate_cli(args) -> list[str]:
    """What `qzo2 eval` prints. Task settings (template, max_length, eval batch size, seed) default to the run's."""
    import dataclasses

    from . import data as D
    from .config import TrainConfig
    from .model import default_text_path
    from .objective import evaluate

    model, tokenizer, cfg = load_for_eval(args.model, args.checkpoint, args.dtype, args.device)
    ecfg = cfg or TrainConfig()
    ecfg = dataclasses.replace(ecfg, **{k: v for k, v in (("eval_batch_size", args.batch_size),
                                                            ("max_length", args.max_length),
                                                            ("template", args.template)) if v is not None})
    lines = []
    if args.task:
        if args.task == "sentiment":
            seed = args.seed if args.seed is not None else (cfg.seed if cfg else 0)
            splits = D.sentiment_splits(seed, ecfg.n_train, ecfg.n_dev, ecfg.n_test,
                                        template=D.SENTIMENT_TEMPLATES[ecfg.template])
            items = splits[args.split]
        else:
            if not args.data:
                raise ValueError(f"--task {args.task} needs --data PATH with its examples")
            items = D.load_task_examples(D.load_task_yaml(args.task), args.data)
        m = evaluate(model, "classification", items, tokenizer, ecfg.max_length, ecfg.eval_batch_size)
        lines.append(f"{args.model or 'default'}: {args.task} "
                     f"{args.split if args.task == 'sentiment' else Path(args.data).name}: "
                     f"accuracy {m['accuracy']:.4f} on {len(items)} examples (candidate loss {m['loss']:.4f}; "
                     f"predicted classes {' / '.join(f'{x:.3f}' for x in m['predicted'])})")
    for prompt in args.generate:
        lines.append(f"> {prompt}\n{generate(model, tokenizer, prompt, args.max_new_tokens)}")
    if args.ppl or not (args.task or args.generate):
        path = Path(args.ppl) if args.ppl else default_text_path()
        if not path.is_file():
            raise ValueError(f"text file {path} does not exist")
        ppl = perplexity(model, tokenizer, path.read_text(encoding="utf-8"), seqlen=args.seqlen, nseq=args.nseq,
                         batch_size=args.batch_size or 4)
        lines.append(f"perplexity {ppl:.2f} ({args.nseq}x{args.seqlen} tokens of {path.name})")
    return lines
