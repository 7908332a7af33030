#!/usr/bin/env bash
# The GPU check: CUDA-marked tests and short GPU benchmarks, one prepared script, under 9 minutes on one GPU.
#   bash scripts/gpu_check.sh
# On a machine with torch+CUDA, Lightning, pytest, pybind11 and a C++ compiler (the lent GPU machines have them)
# and no internet: the native swap engine is built there (a build from this CPU machine is for another Python).
# The check needs nothing else; a package to add travels as a wheel in ./.whl, installed into /tmp/site (see the
# device README).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
# cuBLAS picks deterministic algorithms with a fixed workspace: the bitwise tests compare two runs.
export CUBLAS_WORKSPACE_CONFIG=:4096:8
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

status=0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || status=1
fi
echo "== build memtrain._C in place (thread-pool I/O backend where liburing's headers are missing)"
python3 setup.py -q build_ext --inplace || { echo "memtrain._C did not build: the NVMe tests will fail"; status=1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import memtrain, memtrain._C; print('memtrain', memtrain.__file__)" || status=1
# The activations first (the open GPU targets), then the rest; the timeouts add up to under 9 minutes, so one
# device call of 600 s holds the whole check with the build.
echo "== activations on CUDA: side-stream swap bitwise, plan followed; then the benchmark (targets: auto at full"
echo "   recompute's memory >= 15% faster than it; at <= 1.1x the step time of no policy, <= 1/3 of its memory)"
timeout 120 python3 -m pytest -q -m cuda tests/test_activations_cuda.py || status=1
timeout 150 python3 scripts/bench/activations.py --device cuda --bf16 --seq-lens 2048 8192 --layers 8 --embd 1024 \
    --heads 16 --batch 2 --warmup 3 --steps 5 --threads 4 --out "${OUT:-bench_results}/activations_gpu.json" || status=1
echo "== CUDA tests"
timeout 140 python3 -m pytest -q -m cuda tests/test_cuda.py || status=1   # incl. the snapshot of GPU state
echo "== offload staging bandwidth (device <-> page-locked host) vs pageable copies"
timeout 45 python3 scripts/bench/staging_bw.py --mib 256 --repeats 5 \
    --out "${OUT:-bench_results}/staging_bw.json" || status=1
echo "== sharding benchmark on one GPU"
timeout 80 python3 scripts/bench/sharding.py --device cuda --nproc 1 --steps 20 --warmup 5 \
    --contenders memtrain-zero0,memtrain-zero3,lightning-fsdp2 \
    --out "${OUT:-bench_results}/sharding_gpu.json" || status=1
echo "== gpu_check done, status $status"
exit $status
