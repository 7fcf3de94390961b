"""Benchmark helpers: random-weight checkpoints of named shapes are real HF checkpoints qzo2 can quantize."""
import json

import torch

from qzo2.bench import SHAPES, bench_kernels, make_config, skeleton_tensors, write_random_checkpoint
from qzo2.cli import main


def test_random_checkpoint_loads_and_quantizes(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "tiny"
    n = write_random_checkpoint("tiny", src, max_shard_bytes=200_000)
    assert (src / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(src)
    assert sum(p.numel() for p in model.parameters()) == n
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "-q"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["group_size"] == 128


def test_shapes_have_the_published_parameter_counts():
    counts = {name: sum(torch.Size(s).numel() for _, s, _ in skeleton_tensors(make_config(name)))
              for name in ("llama2-7b", "opt-6.7b")}
    assert counts == {"llama2-7b": 6_738_415_616, "opt-6.7b": 6_658_473_984}
    assert set(SHAPES) >= {"tiny", "llama-3b", "llama2-7b", "llama2-13b", "llama2-70b", "opt-6.7b"}


def test_kernel_bench_reports_every_path():
    recs = bench_kernels(rows=8, repeats=1, shapes=((64, 128),))
    assert [r["dtype"] for r in recs] == ["float32", "bfloat16"]
    assert all(r[k] > 0 for r in recs for k in ("dense_ms", "dequant_ms", "dequant_cached_ms", "int4pack_ms"))


def test_run_measured_reports_the_child_alone_and_accuracy_parses():
    import sys

    import pytest

    from qzo2.bench import _accuracy, run_measured

    # ru_maxrss is max(the forked parent's RSS, the child's own peak): allocate well above the test process
    big = run_measured([sys.executable, "-c", "b = bytearray(700 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                                              "print('runs/x: sentiment test: accuracy 0.6380 on 500 examples')"])
    small = run_measured([sys.executable, "-c", "pass"])
    assert big["peak_rss_gib"] > 0.68 and small["peak_rss_gib"] < 0.6 and big["wall_s"] >= 0
    assert _accuracy(big["output"]) == 0.638
    with pytest.raises(RuntimeError, match="exit 3"):
        run_measured([sys.executable, "-c", "raise SystemExit(3)"])
