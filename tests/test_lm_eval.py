"""lm-evaluation-harness scores qzo2's exports: a trained run's HF and GPTQ exports go through the real `lm_eval` CLI
(`--model hf`, a task written by `qzo2 eval --lm-eval-task` over a local jsonl, offline) and its per-example
log-likelihoods and accuracy are compared with `qzo2 eval --predictions` on the same examples.

Tolerances (README, "Scoring exports with lm-evaluation-harness"):
- HF export: the same fp32 model on both sides, so every candidate's log-likelihood agrees to 1e-4 and the
  predictions, hence `acc`, are identical.
- GPTQ export: transformers + optimum + gptqmodel pick gptqmodel's CPU kernel TorchAtenLinear, which computes in
  bf16 whatever the model's dtype; so log-likelihoods agree to bf16 accuracy (GPTQ_LL_TOL) and only examples whose
  top-two candidates are closer than twice that may be predicted differently (`acc` differs by at most those).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import random
import subprocess
import sys
import time

import pytest
import yaml

from conftest import TEXT, build_model
from stock import gptqmodel_available

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="needs lm-evaluation-harness (the 'eval' or 'dev' extra)")

TASK = 'template: "Text: {text}\\nNext:"\ncandidates: [" the", " to", " a"]\n'  # one token each after ":"
GPTQ_LL_TOL = 0.05  # bf16 activations and scales in TorchAtenLinear (measured 0.029 here; 0.27 on SmolLM2-135M)


def task_rows(n: int, seed: int) -> list[dict]:
    """Windows of TEXT with a random label of 3: accuracy is neither 0, 1 nor a coin flip's 0.5 by construction."""
    rng, words = random.Random(seed), TEXT.split()
    out = []
    for _ in range(n):
        i = rng.randrange(len(words) - 6)
        out.append({"text": " ".join(words[i:i + 6]), "label": rng.randrange(3)})
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def lm_eval_cli(model_dir, task_dir, task, out, env) -> subprocess.Popen:
    """The harness's own entry point (`lm_eval` == `python -m lm_eval`), as a user runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={model_dir},dtype=float32", "--device", "cpu", "--batch_size", "16", "--include_path",
         str(task_dir), "--tasks", task, "--output_path", str(out), "--log_samples"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tokenizer):
    """A tiny Llama quantized to GPTQ int4, trained 4 QZO steps on a 3-way task, exported as HF (fp32) and GPTQ,
    each scored by `qzo2 eval --predictions` and by the `lm_eval` CLI on the task `qzo2 eval --lm-eval-task` wrote."""
    from quant.checkpoint import atomic_dir, open_source, quantize
    from quant.format import QuantConfig
    from qzo2.cli import main

    t0 = time.time()
    tmp = tmp_path_factory.mktemp("lm_eval")
    src = tmp / "src"
    build_model("llama", vocab_size=len(tokenizer) + 20).save_pretrained(src)
    tokenizer.save_pretrained(src)
    with atomic_dir(tmp / "q") as d:
        quantize(open_source(src), d, QuantConfig(bits=4, group_size=32), progress=False)
    task = tmp / "next.yaml"
    task.write_text(TASK)
    write_jsonl(tmp / "train.jsonl", task_rows(16, 1))
    write_jsonl(tmp / "test.jsonl", task_rows(40, 2))
    run = tmp / "run"
    assert main(["train", f"model={tmp / 'q'}", "method=qzo", f"task={task}", f"train_file={tmp / 'train.jsonl'}",
                 "steps=4", "batch_size=8", "lr=5e-3", "eps=1e-3", "max_length=64", "eval_every=0", "save_every=4",
                 "log_every=2", f"output_dir={run}", "progress=false"]) == 0
    exports = {"hf": tmp / "export-hf", "gptq": tmp / "export-gptq"}
    assert main(["export", str(run), "-o", str(exports["hf"]), "--format", "hf", "--dtype", "fp32"]) == 0
    assert main(["export", str(run), "-o", str(exports["gptq"]), "--format", "gptq"]) == 0
    task_dir = tmp / "lm_eval_tasks"
    data = ["--task", str(task), "--data", str(tmp / "test.jsonl")]
    assert main(["eval", str(exports["hf"]), *data, "--lm-eval-task", str(task_dir)]) == 0
    name = "qzo2_next_test"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp / "datasets-cache"), TOKENIZERS_PARALLELISM="false")
    formats = ["hf"] + (["gptq"] if gptqmodel_available() else [])
    # both harness runs in the background (one Python start each, seconds of imports) while qzo2 scores
    procs = {f: lm_eval_cli(exports[f], task_dir, name, tmp / f"lm-{f}", env) for f in formats}
    out = {"task_dir": task_dir, "name": name, "task": task, "test": tmp / "test.jsonl", "formats": formats}
    for f in formats:
        assert main(["eval", str(exports[f]), *data, "--predictions", str(tmp / f"qzo2-{f}.jsonl")]) == 0
        out[f"qzo2-{f}"] = [json.loads(line) for line in (tmp / f"qzo2-{f}.jsonl").read_text().splitlines()]
    for f, p in procs.items():
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
        (samples,) = glob.glob(str(tmp / f"lm-{f}" / "*" / f"samples_{name}_*.jsonl"))
        (results,) = glob.glob(str(tmp / f"lm-{f}" / "*" / "results_*.json"))
        out[f"lm-{f}"] = sorted((json.loads(line) for line in open(samples)), key=lambda r: r["doc_id"])
        out[f"acc-{f}"] = json.load(open(results))["results"][name]
    print(f"lm_eval fixture: {time.time() - t0:.1f}s")
    return out


def lls(sample) -> list[float]:
    return [float(ll) for ll, _ in sample["filtered_resps"]]


def argmax(xs) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def test_task_file_is_the_examples_qzo2_scores(scored):
    from qzo2 import data as D

    spec = yaml.safe_load((scored["task_dir"] / f"{scored['name']}.yaml").read_text())
    assert spec["output_type"] == "multiple_choice" and spec["dataset_path"] == "json"
    assert spec["doc_to_text"] == "prompt" and spec["doc_to_target"] == "label"
    assert spec["doc_to_choice"] == [" the", " to", " a"] and spec["target_delimiter"] == ""
    examples = D.load_task_examples(D.load_task_yaml(scored["task"]), scored["test"])
    for f in scored["formats"]:
        samples = scored[f"lm-{f}"]
        assert len(samples) == len(examples)
        for s, e in zip(samples, examples):  # the exact (context, continuation) strings lm-eval scored
            assert s["doc"] == {"prompt": e.prompt, "label": e.label}
            assert [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()] == [(e.prompt, c) for c in e.candidates]


def test_hf_export_lm_eval_equals_qzo2_eval(scored):
    ours, theirs = scored["qzo2-hf"], scored["lm-hf"]
    labels = [r["label"] for r in ours]
    assert len(set(labels)) == 3 and 0.1 < sum(r["pred"] == r["label"] for r in ours) / len(ours) < 0.9
    for o, t in zip(ours, theirs):
        # single-token candidates: lm-eval's summed log-prob is qzo2's per-token mean
        assert lls(t) == pytest.approx(o["scores"], abs=1e-4)
        assert argmax(lls(t)) == o["pred"] and t["acc"] == float(o["pred"] == o["label"])
    accuracy = sum(o["pred"] == o["label"] for o in ours) / len(ours)
    assert scored["acc-hf"]["acc,none"] == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.skipif(not gptqmodel_available(), reason="needs the 'gptq' extra (optimum + gptqmodel)")
def test_gptq_export_lm_eval_matches_qzo2_eval(scored):
    ours, theirs = scored["qzo2-gptq"], scored["lm-gptq"]
    near_ties = 0
    for o, t in zip(ours, theirs):
        assert lls(t) == pytest.approx(o["scores"], abs=GPTQ_LL_TOL)
        top = sorted(o["scores"])
        if top[-1] - top[-2] < 2 * GPTQ_LL_TOL:
            near_ties += 1
        else:
            assert argmax(lls(t)) == o["pred"]
    accuracy = sum(o["pred"] == o["label"] for o in ours) / len(ours)
    assert abs(scored["acc-gptq"]["acc,none"] - accuracy) <= near_ties / len(ours) + 1e-9
    # and qzo2 reads the GPTQ export as it reads the HF one (fp16-rounded scales only)
    assert [o["pred"] for o in ours] == [o["pred"] for o in scored["qzo2-hf"]]


def test_lm_eval_task_of_the_builtin_sentiment_split(tmp_path, capsys):
    """`qzo2 eval --task sentiment --lm-eval-task DIR` writes the test split `qzo2 eval` scores (no model loaded)."""
    from qzo2 import data as D
    from qzo2.cli import main

    assert main(["eval", "--task", "sentiment", "--template", "sst2", "--lm-eval-task", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "qzo2_sentiment_sst2_test" in out and "lm_eval --model hf" in out
    spec = yaml.safe_load((tmp_path / "qzo2_sentiment_sst2_test.yaml").read_text())
    assert spec["doc_to_choice"] == [" terrible", " great"]
    rows = [json.loads(line) for line in (tmp_path / "qzo2_sentiment_sst2_test.jsonl").read_text().splitlines()]
    test = D.sentiment_splits(0, template=D.SST2_TEMPLATE)["test"]
    assert rows == [{"prompt": e.prompt, "label": e.label} for e in test]
    assert spec["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "qzo2_sentiment_sst2_test.jsonl").resolve())


def test_caveats_name_multi_token_candidates_and_cut_prompts(tokenizer):
    from qzo2 import data as D
    from qzo2.evaluation import lm_eval_caveats

    one = [D.ClassificationExample("the lazy dog", [" the", " to"], 0)]
    assert lm_eval_caveats(one, tokenizer, 64) == []
    two = [D.ClassificationExample("the lazy dog", [" quick", " to"], 1)]  # ' quick' is 'Ġqu' 'ick' here
    (w,) = lm_eval_caveats(two, tokenizer, 64)
    assert "[' quick']" in w and "sum" in w
    (w,) = lm_eval_caveats(one, tokenizer, 3)
    assert "1 of 1 prompts" in w
    # a prompt ending in a space: qzo2 scores "a" after "Ġ" (they would merge), lm-eval moves it and scores "Ġa"
    (w,) = lm_eval_caveats([D.ClassificationExample("the lazy dog ", ["a", "b"], 0)], tokenizer, 64)
    assert "otherwise than qzo2" in w
    # one ending in a newline is fine: lm-eval scores '\n' + candidate, the same '\n' term for every candidate
    assert lm_eval_caveats([D.ClassificationExample("the lazy dog\n", ["a", "b"], 0)], tokenizer, 64) == []
