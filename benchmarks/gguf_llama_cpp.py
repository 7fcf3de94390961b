#!/usr/bin/env python
"""Opt-in check that a `qzo2 export RUN -o OUT --format gguf` model runs in real llama.cpp (not a test).

llama-cpp-python goes in a venv of its own, built from the sdist (about 15 min on 2 cores):

    python3 -m venv /tmp/llcpp/venv && /tmp/llcpp/venv/bin/pip install numpy
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF" \\
      CMAKE_BUILD_PARALLEL_LEVEL=2 /tmp/llcpp/venv/bin/pip install -v --no-binary llama-cpp-python llama-cpp-python

Then, in this order (HF_DIR: the same model as an fp32 HF directory, e.g. `qzo2 export RUN --format hf --dtype fp32`):

    .venv/bin/python benchmarks/gguf_llama_cpp.py hf --gguf OUT --hf HF_DIR -o WORKDIR     # HF ids, logits, greedy
    /tmp/llcpp/venv/bin/python benchmarks/gguf_llama_cpp.py llama --gguf OUT -o WORKDIR    # the same in llama.cpp
    .venv/bin/python benchmarks/gguf_llama_cpp.py compare -o WORKDIR                      # table + WORKDIR/summary.json

The `llama` side runs llama.cpp on the HF token ids, so that logits are compared position by position. llama.cpp's
Q4_0 CPU kernels quantize the activations to Q8, so its logits differ from the fp32 HF ones by about 1 (of a logit
range of about 30); the argmax should agree except at near-ties and the greedy texts should be identical.
This module imports only numpy, json, llama_cpp and the stdlib at module level (torch/transformers: `hf` only).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "In 1492, Columbus sailed across the Atlantic Ocean to",
    "Water boils at 100 degrees Celsius, and it freezes at",
    "Hello world! How are you doing today? I'm fine, thanks.",
]
N_GEN, GEN_PROMPTS = 20, (0, 1)  # greedy tokens, for these prompts


def gguf_path(p: str) -> str:
    return str(Path(p) / "model.gguf") if Path(p).is_dir() else p


def side_hf(args: argparse.Namespace, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.hf)
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    gen = {}
    with torch.no_grad():
        for i, x in enumerate(ids):
            np.save(out / f"hf_logits_{i}.npy", model(torch.tensor([x])).logits[0].float().numpy())
        for i in GEN_PROMPTS:  # plain argmax loop (no EOS stop, no cache: a few dozen tokens), like the llama side
            new: list[int] = []
            for _ in range(N_GEN):
                new.append(int(model(torch.tensor([ids[i] + new])).logits[0, -1].argmax()))
            gen[str(i)] = {"ids": new, "text": tok.decode(new)}
            print(i, repr(gen[str(i)]["text"]))
    meta = {"prompts": PROMPTS, "hf": args.hf, "gguf": args.gguf, "ids": ids, "gen": gen}
    (out / "hf.json").write_text(json.dumps(meta, indent=1))


def side_llama(args: argparse.Namespace, out: Path) -> None:
    import llama_cpp

    hf = json.loads((out / "hf.json").read_text())
    m = llama_cpp.Llama(model_path=gguf_path(args.gguf), logits_all=True, n_ctx=512, n_threads=2, verbose=False)
    res = {"version": llama_cpp.__version__, "gguf": gguf_path(args.gguf),
           "tok_nobos": [m.tokenize(p.encode(), add_bos=False) for p in hf["prompts"]],
           "tok_default": [m.tokenize(p.encode()) for p in hf["prompts"]], "gen": {}}
    for i, ids in enumerate(hf["ids"]):
        m.reset()
        m.eval(ids)
        np.save(out / f"llama_logits_{i}.npy", np.array(m.scores[:m.n_tokens], dtype=np.float32))
    for i in GEN_PROMPTS:
        m.reset()
        m.eval(hf["ids"][i])
        new: list[int] = []
        for _ in range(N_GEN):
            new.append(int(np.argmax(m.scores[m.n_tokens - 1])))
            m.eval([new[-1]])
        res["gen"][str(i)] = {"ids": new, "text": m.detokenize(new).decode(errors="replace")}
        print(i, repr(res["gen"][str(i)]["text"]))
    (out / "llama.json").write_text(json.dumps(res, indent=1))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def compare(out: Path) -> None:
    hf, ll = json.loads((out / "hf.json").read_text()), json.loads((out / "llama.json").read_text())
    print(f"HF `{hf['hf']}` (fp32) vs llama.cpp {ll['version']} `{ll['gguf']}`\n")
    print("| prompt | tokens | ids equal (add_bos=False / default) | max abs diff, last / all pos "
          "| % of logit range, last / all | argmax agrees | max KL(hf‖ll) |")
    print("|---|---|---|---|---|---|---|")
    rows, n_am, n_pos = [], 0, 0
    for i, p in enumerate(hf["prompts"]):
        h = np.load(out / f"hf_logits_{i}.npy").astype(np.float64)
        lg = np.load(out / f"llama_logits_{i}.npy").astype(np.float64)
        d, rng = np.abs(h - lg).max(1), h.max(1) - h.min(1)
        lh, ll_ = log_softmax(h), log_softmax(lg)
        kl = (np.exp(lh) * (lh - ll_)).sum(1)
        am = int((h.argmax(1) == lg.argmax(1)).sum())
        n_am, n_pos = n_am + am, n_pos + len(h)
        r = {"prompt": p, "tokens": len(h), "ids_eq_nobos": hf["ids"][i] == ll["tok_nobos"][i],
             "ids_eq_default": hf["ids"][i] == ll["tok_default"][i], "maxabs_last": float(d[-1]),
             "maxabs_all": float(d.max()), "rel_last": float(d[-1] / rng[-1]), "rel_all": float((d / rng).max()),
             "argmax_agree": am, "kl_max": float(kl.max())}
        rows.append(r)
        yn = {True: "yes", False: "**no**"}
        print(f"| {p} | {len(h)} | {yn[r['ids_eq_nobos']]} / {yn[r['ids_eq_default']]} "
              f"| {r['maxabs_last']:.3f} / {r['maxabs_all']:.3f} | {100 * r['rel_last']:.1f} % / "
              f"{100 * r['rel_all']:.1f} % | {am}/{len(h)} | {r['kl_max']:.3f} |")
    gens = {}
    for i in map(str, GEN_PROMPTS):
        a, b = hf["gen"][i], ll["gen"][i]
        gens[i] = {"hf": a["text"], "llama": b["text"], "ids_equal": a["ids"] == b["ids"],
                   "text_equal": a["text"] == b["text"]}
    n_tok = sum(r["ids_eq_nobos"] and r["ids_eq_default"] for r in rows)
    print(f"\ntokens equal on {n_tok}/{len(rows)} prompts; argmax agrees at {n_am}/{n_pos} positions")
    for i, g in gens.items():
        same = "identical" if g["ids_equal"] and g["text_equal"] else "**DIFFERENT**"
        print(f"greedy {N_GEN} tokens, prompt {i}: {same}\n  hf:    {g['hf']!r}\n  llama: {g['llama']!r}")
    summary = {"llama_cpp": ll["version"], "hf": hf["hf"], "gguf": ll["gguf"], "rows": rows, "greedy": gens,
               "tokens_equal": f"{n_tok}/{len(rows)}", "argmax_agree": f"{n_am}/{n_pos}",
               "greedy_identical": all(g["ids_equal"] and g["text_equal"] for g in gens.values())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=["hf", "llama", "compare"])
    ap.add_argument("--gguf", help="the export directory (OUT) or its model.gguf")
    ap.add_argument("--hf", help="the same model as an fp32 HF directory (hf side)")
    ap.add_argument("-o", "--workdir", required=True, help="where the ids, logits and summary.json go")
    args = ap.parse_args()
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    if args.side == "hf" and not args.hf:
        ap.error("hf needs --hf HF_DIR")
    if args.side == "llama" and not args.gguf:
        ap.error("llama needs --gguf OUT")
    if args.side == "hf":
        side_hf(args, out)
    elif args.side == "llama":
        side_llama(args, out)
    else:
        compare(out)


if __name__ == "__main__":
    main()
