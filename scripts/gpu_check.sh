#!/usr/bin/env bash
# The GPU check: CUDA-marked tests and a short GPU benchmark, one prepared script, under 8 minutes on one GPU.
#   bash scripts/gpu_check.sh            (on a machine with torch+CUDA and Lightning; hydra/omegaconf are
#                                         installed from wheels in ./wheels when present, else from PyPI)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

# Dependencies the GPU machine lacks (no internet there: carry wheels in ./wheels).
if [ -d wheels ]; then pip install -q --no-index --find-links wheels hydra-core omegaconf nvidia-ml-py pytest pytest-timeout || true; fi
pip install -q --no-deps -e . || true

status=0
echo "== CUDA tests"
timeout 240 python -m pytest -q -m cuda tests/test_cuda.py || status=1   # incl. the snapshot of GPU state
echo "== sharding benchmark on one GPU"
timeout 240 python scripts/bench/sharding.py --device cuda --nproc 1 --steps 20 --warmup 5 \
    --contenders memtrain-zero0,memtrain-zero3,lightning-fsdp2 \
    --out "${OUT:-bench_results}/sharding_gpu.json" || status=1
echo "== offload staging bandwidth (device <-> page-locked host) vs pageable copies"
timeout 120 python scripts/bench/staging_bw.py --mib 256 --repeats 5 \
    --out "${OUT:-bench_results}/staging_bw.json" || status=1
echo "== activations on CUDA: side-stream swap bitwise, plan followed; then the benchmark (targets: auto at full"
echo "   recompute's memory >= 15% faster than it; at <= 1.1x the step time of no policy, <= 1/3 of its memory)"
timeout 150 python -m pytest -q -m cuda tests/test_activations_cuda.py || status=1
timeout 200 python scripts/bench/activations.py --device cuda --bf16 --seq-lens 2048 8192 --layers 8 --embd 1024 \
    --heads 16 --batch 2 --warmup 3 --steps 5 --threads 4 --out "${OUT:-bench_results}/activations_gpu.json" || status=1
echo "== gpu_check done, status $status"
exit $status
