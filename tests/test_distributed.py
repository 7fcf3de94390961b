"""Data-parallel training under torch.distributed (gloo on CPU), two processes started by torchrun itself (and once by
`accelerate launch`), against one process with the joint batch."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_config
from qzo2 import trainer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONWARNINGS": "ignore"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "qzo2"]


@pytest.fixture
def data16(tiny, tmp_path):
    """The tiny quantized and unquantized models and 16 text rows (batch 4 splits into 2 x 2)."""
    from conftest import TEXT

    q, src, _ = tiny
    words = TEXT.split()
    rows = [{"prompt": " ".join(words[i:i + 4]), "completion": " " + " ".join(words[i + 4:i + 8])}
            for i in range(0, 64, 4)]
    data = tmp_path / "train16.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return q, src, data


def overrides(cfg) -> list[str]:
    return [f"{k}={'' if v is None else v}" for k, v in cfg.to_dict().items()]


def launch(cfg, launcher=TORCHRUN, timeout=240, **popen):
    return subprocess.run(launcher + ["train"] + overrides(cfg), env=ENV, capture_output=True, text=True,
                          timeout=timeout, **popen)


def last_trained(run) -> dict:
    return load_file(str(trainer.RunDir(run).checkpoint("last") / "trained.safetensors"))


def change_gap(a: dict, b: dict, start: dict) -> float:
    """‖b − a‖ / ‖a − start‖: how far two runs' trained tensors are apart, relative to how far training moved them."""
    num = sum(float((b[k] - a[k]).double().pow(2).sum()) for k in a) ** 0.5
    den = sum(float((a[k] - start[k]).double().pow(2).sum()) for k in a) ** 0.5
    assert den > 1e-3  # training moved the tensors: the comparison means something
    return num / den


def initial(cfg) -> dict:
    from qzo2.methods import load_for_training

    _, _, method = load_for_training(cfg)
    return {t.path: t.tensor.detach().clone() for t in method.targets}


def records(run) -> list[dict]:
    return trainer.RunDir(run).read_metrics()


@pytest.mark.parametrize("method,parallel,extra", [
    ("qzo", "batch", {}),
    ("qzo", "pairs", {}),
    ("mezo", "batch", {}),
    # the convergence options: the one-off gradient pass runs on every rank alike, the running RMS sees the same d
    ("qzo", "batch", dict(zo_subspace=4, zo_mask_samples=4, zo_normalize=True, clip=3.0)),
])
def test_zo_on_two_ranks_equals_one_rank_with_the_joint_batch(data16, tmp_path, method, parallel, extra):
    q, src, data = data16
    model = q if method == "qzo" else src
    kw = dict(method=method, steps=8, batch_size=4, n_pairs=2, lr=2e-3, eval_every=4, save_every=4, log_every=2,
              **extra)
    one = train_config(tmp_path / "one", model, data, **kw)
    trainer.train(one)
    two = train_config(tmp_path / "two", model, data, zo_parallel=parallel, **kw)
    p = launch(two)
    assert p.returncode == 0, p.stderr[-2000:]
    # The per-example losses are those of the same padded rows, summed in float64 in rank order: on this CPU the runs
    # are bit-identical. A GEMM whose rounding depends on the number of rows could change a loss in its 7th digit,
    # which the 1/2eps of d turns into ~1e-4 of the step, so that is the tolerance.
    assert change_gap(last_trained(one.output_dir), last_trained(two.output_dir), initial(one)) < 1e-4
    r1, r2 = records(one.output_dir), records(two.output_dir)
    assert [r["step"] for r in r2] == [r["step"] for r in r1]  # rank 0 alone logged: each record once
    for a, b in zip(r1, r2):
        for key in ("loss", "dev_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5)
    # tok_s: every rank's tokens (batch-sharded), or the batch's once (pair-parallel: each rank runs all of it)
    assert r2[1]["ranks"] == 2 and (r2[1]["tok_s"] > r2[1]["tok_s_rank"]) == (parallel == "batch")
    assert p.stdout.count("finished at step 8") == 1  # one report, from rank 0


@pytest.mark.parametrize("method,model,kw", [
    ("lomo", "q", dict(lr=1e-2, clip_grad_norm=1.0)),  # the two-pass norm clip: both passes see the global gradient
    ("adalomo", "q", dict(lr=1e-2)),
    ("adamw", "q", dict(lr=1e-2, gradient_accumulation_steps=2)),  # reduced once, after the last micro-batch
    ("hift", "q", dict(lr=1e-2)),
    ("grass", "src", dict(lr=1e-3, grass_rank=8, grass_refresh=3)),  # refresh steps and projected (r x n) steps
])
def test_first_order_on_two_ranks_equals_one_rank_with_the_joint_batch(data16, tmp_path, method, model, kw):
    q, src, data = data16
    common = dict(method=method, steps=6, batch_size=4, eval_every=3, save_every=3, log_every=1, **kw)
    one = train_config(tmp_path / "one", q if model == "q" else src, data, **common)
    trainer.train(one)
    two = train_config(tmp_path / "two", q if model == "q" else src, data, **common)
    p = launch(two)
    assert p.returncode == 0, p.stderr[-2000:]
    # gradients are sums of two half-batch backward passes instead of one: fp32 rounding, ~1e-7 of each step
    assert change_gap(last_trained(one.output_dir), last_trained(two.output_dir), initial(one)) < 1e-5
    losses = [(r["step"], r["loss"]) for r in records(two.output_dir) if "loss" in r]
    assert [s for s, _ in losses] == list(range(1, 7))
    for (_, a), (_, b) in zip([(r["step"], r["loss"]) for r in records(one.output_dir) if "loss" in r], losses):
        assert b == pytest.approx(a, rel=1e-5)  # the logged loss is the whole batch's mean, not rank 0's half


def test_accelerate_launch_runs_the_same_job(data16, tmp_path):
    q, _, data = data16
    kw = dict(steps=4, batch_size=4, n_pairs=2, lr=2e-3, eval_every=2, save_every=2)
    one = train_config(tmp_path / "one", q, data, **kw)
    trainer.train(one)
    two = train_config(tmp_path / "two", q, data, **kw)
    # --multi_gpu is accelerate's torchrun path; on a machine without GPUs qzo2 then joins a gloo group on the CPU
    p = launch(two, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qzo2"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["step"] for r in records(two.output_dir)] == [r["step"] for r in records(one.output_dir)]
    assert change_gap(last_trained(one.output_dir), last_trained(two.output_dir), initial(one)) < 1e-4


def rank_pids(proc) -> dict[str, int]:
    """RANK -> pid of the worker processes torchrun `proc` started (its children; each in a session of its own)."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
        if "RANK" in env:
            out[env["RANK"]] = int(pid)
    return out


def _wait_for(path: Path, proc, timeout=180):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def test_kill_9_of_the_whole_job_then_a_relaunch_resumes_bit_identically(data16, tmp_path):
    q, _, data = data16
    kw = dict(steps=60, batch_size=4, n_pairs=2, lr=2e-3, eval_every=0, save_every=5, log_every=5)
    straight = train_config(tmp_path / "straight", q, data, **kw)
    assert launch(straight).returncode == 0
    killed = train_config(tmp_path / "killed", q, data, **{**kw, "steps": 100000})  # steps: a resumable change
    proc = subprocess.Popen(TORCHRUN + ["train"] + overrides(killed), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(Path(killed.output_dir) / "checkpoints" / "step-000010", proc)
    pids = rank_pids(proc)
    assert set(pids) == {"0", "1"}, pids
    for pid in [proc.pid, *pids.values()]:  # torchrun and both ranks at once: nobody saves anything
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    done = trainer.RunDir(killed.output_dir).steps()
    assert done and done[-1] < 60
    resumed = train_config(tmp_path / "killed", q, data, **kw)
    p = launch(resumed)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = last_trained(straight.output_dir), last_trained(resumed.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in records(resumed.output_dir) if "loss" in r]
    assert steps == list(range(5, 65, 5))  # rank 0 truncated what the killed job wrote past


def test_a_rank_that_dies_stops_the_whole_job(data16, tmp_path):
    q, _, data = data16
    cfg = train_config(tmp_path / "run", q, data, steps=100000, batch_size=4, lr=2e-3, eval_every=0, save_every=5)
    proc = subprocess.Popen(TORCHRUN + ["train"] + overrides(cfg), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(Path(cfg.output_dir) / "checkpoints" / "step-000005", proc)
        ranks = rank_pids(proc)
        assert set(ranks) == {"0", "1"}, ranks
        os.kill(ranks["1"], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # no hang in a collective: the job ends, and says it failed
    finally:
        if proc.poll() is None:
            for pid in [proc.pid, *rank_pids(proc).values()]:
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "rank" in err.lower() and ("fail" in err.lower() or "signal" in err.lower())


def test_bench_under_torchrun_reports_ranks_and_the_bytes_a_zo_step_sends():
    p = subprocess.run(TORCHRUN + ["bench", "--shape", "tiny", "--mode", "qzo,lomo", "--batch", "4", "--seq", "16",
                                   "--steps", "2", "--warmup", "1"], env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in recs] == ["qzo", "lomo"]  # rank 0 alone prints
    qzo, lomo = recs
    assert qzo["ranks"] == 2 and qzo["tok_s_rank"] == pytest.approx(qzo["tok_s"] / 2)
    assert qzo["collective_bytes_per_step"] == 2 * 2 * 8  # sums and counts of the 2 chunks, float64: 4 scalars
    n_scales = sum(t.numel() for t in _tiny_bench_scales())
    assert lomo["collective_bytes_per_step"] >= 4 * n_scales  # first order: every scale's fp32 gradient


def _tiny_bench_scales():
    from qzo2.bench import random_model
    from qzo2.methods import scale_targets

    return [t.tensor for t in scale_targets(random_model("tiny", torch.float32, "cpu", True, 4, 128))]


def test_ranks_that_disagree_stop_with_an_error_and_cuda_n_is_refused(tmp_path, monkeypatch):
    script = tmp_path / "disagree.py"
    script.write_text(
        "import os, sys\n"
        "from qzo2 import distributed\n"
        "w = distributed.init('cpu')\n"
        "distributed.check_same(1.0, 'a value they share')\n"
        "try:\n"
        "    distributed.check_same(float(w.rank), 'the rank')\n"
        "except ValueError as e:\n"
        "    print(f'rank {w.rank}: {e}', flush=True)\n"
        "    sys.exit(3)\n")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "the ranks disagree on the rank: [0.0, 1.0]" in p.stdout  # every rank raises, with every rank's value
    from qzo2 import distributed
    from qzo2.model import resolve_device

    monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank=0, size=2, local_rank=0))
    with pytest.raises(ValueError, match="would put every rank on one GPU"):
        resolve_device("cuda:1")
    assert resolve_device("cpu").type == "cpu"
