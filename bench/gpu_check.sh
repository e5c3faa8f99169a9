#!/usr/bin/env bash
# The one GPU check of the core (under 8 minutes on one GPU): the CUDA tests (outputs against the
# CPU float64 reference, per-sample statistics, no host sync per step with check_every=0), then
# the benchmark on the four shapes with the captured (torch.compile reduce-overhead) comparison.
# Everything it prints goes to one folder, $1 (default: $OUT, else gpu-check/).
#
#   pip install -e ".[test,bench]"      # with a CUDA build of torch >= 2.1
#   bash bench/gpu_check.sh gpu-check
#
# Record the numbers in README "Speed and memory" (until then the README says CUDA is unmeasured).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
python - <<'EOF' | tee "$out/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
EOF
start=$SECONDS
# 1. the core's CUDA tests (about a minute)
timeout 180 python -m pytest -q -ra tests/test_cuda.py 2>&1 | tee "$out/cuda-tests.txt"
# 2. the benchmark with the captured comparison, all four shapes (memory part skipped: CPU-only allocator probe)
timeout 360 python -m bench.run --device cuda --captured --skip memory \
  --json "$out/bench.json" --markdown "$out/bench.md" 2>&1 | tee "$out/bench.txt"
echo "gpu_check: $((SECONDS - start)) s; results in $out/" | tee "$out/done.txt"
