#!/usr/bin/env bash
# The GPU measurements of issue #5 in one place, for a lent H100/H200 (run from the repo root there: its python3
# already has torch, transformers, triton and pytest; qzo2 runs from the source tree, nothing is installed).
#   scripts/gpu_proof.sh [all|tests|llama7b|opt|peak|70b|fo|fo70b] ...
# JSON lines go to $OUT/bench.jsonl (or runs/gpu/), the --compare tables and test output to *.log beside it.
#   tests    CUDA tests (engine streams/events/pinned buffers, z and rounding on the device, bench modes) + Triton
#   llama7b  Llama-2-7B int4 g128, 16x256: QZO resident and offloaded against the two-forward bf16 floor
#   opt      OPT-6.7B, 1x2048: QZO offloaded, ZO2 mode and MeZO resident against the floor (ZO2 anchor: 4,150 tok/s)
#   peak     Llama-2-7B int4, 1x512: torch peak memory resident and offloaded
#   70b      Llama-2-70B int4 offloaded, 1x512 (h2d_floor_ms in the record is the transfer floor)
#   fo       issue #11: Llama-2-7B int4 scales, 1x512: LOMO, AdaLomo and torch AdamW steps against the floor and QZO
#   fo70b    issue #31: Llama-2-70B int4, AdaLomo with the codes streamed through backward, 1x2048 (h2d_floor_ms:
#            2 x code bytes over the measured PCIe bandwidth) and Llama-2-7B streamed against resident
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-runs/gpu}"
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())"
# a failing part is reported and the next one still runs
# each measured run is followed by its simulation (qzo2 bench --simulate: fake tensors, same code), so the first GPU
# run checks the memory model: compare torch_peak_gb with simulated_peak_gb line by line
bench() { python3 -m qzo2.cli bench "$@" --compare -o "$out/bench.jsonl" 2>&1 | tee -a "$out/bench.log" ||
          echo "gpu_proof.sh: bench $* failed" | tee -a "$out/bench.log"
          python3 -m qzo2.cli bench "$@" --simulate --compare -o "$out/simulated.jsonl" 2>&1 | tee -a "$out/bench.log" ||
          echo "gpu_proof.sh: bench --simulate $* failed" | tee -a "$out/bench.log"; }
for part in "${@:-all}"; do
  case "$part" in
    tests|all) python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_kernels.py \
                 tests/test_engine.py tests/test_zo.py tests/test_lomo.py 2>&1 | tee -a "$out/tests.log" ||
                 echo "gpu_proof.sh: tests failed" | tee -a "$out/tests.log" ;;&
    llama7b|all) bench --shape llama2-7b --mode forward,qzo,qzo-offload --batch 16 --seq 256 --steps 10 --warmup 3 ;;&
    opt|all) bench --shape opt-6.7b --mode forward,qzo-offload,zo2,mezo --batch 1 --seq 2048 --steps 10 --warmup 3
             # depth 3 lets the download of block k-2 overlap the upload of block k+1 (depth 2 serializes them)
             bench --shape opt-6.7b --mode zo2 --depth 3 --batch 1 --seq 2048 --steps 10 --warmup 3 ;;&
    peak|all) bench --shape llama2-7b --mode qzo,qzo-offload --batch 1 --seq 512 --steps 10 --warmup 3 ;;&
    70b|all) bench --shape llama2-70b --mode qzo-offload --batch 1 --seq 512 --steps 5 --warmup 2 ;;&
    fo|all) bench --shape llama2-7b --mode forward,qzo,lomo,adalomo,adamw --batch 1 --seq 512 --steps 10 --warmup 3 ;;&
    fo70b|all) bench --shape llama2-7b --mode adalomo,adalomo-offload --batch 1 --seq 2048 --steps 5 --warmup 2
               bench --shape llama2-70b --mode adalomo-offload --batch 1 --seq 2048 --steps 3 --warmup 1 ;;&
    tests|llama7b|opt|peak|70b|fo|fo70b|all) ;;
    *) echo "gpu_proof.sh: unknown part '$part' (all, tests, llama7b, opt, peak, 70b, fo, fo70b)" >&2; exit 2 ;;
  esac
done
