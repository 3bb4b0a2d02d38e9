#!/usr/bin/env bash
# On a machine with a CUDA GPU: the full test suite (GPU tests included) and the full benchmark
# (the paper's shapes, every backend), then the report under benchmarks/results/<device>/.
#   bash benchmarks/run_gpu.sh            # uses the active python (with this package installed)
# PYTHONPATH makes it work from a checkout without installing (e.g. on a lent machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
"$PY" - <<'PYCHECK'
import torch
assert torch.cuda.is_available(), "run_gpu.sh needs a CUDA GPU"
print("GPU:", torch.cuda.get_device_name(), "torch", torch.__version__)
PYCHECK
out=$(mktemp -d)
"$PY" -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$out/tests.log"
"$PY" -m pytest benchmarks -q -p no:cacheprovider --bench-scale gpu --benchmark-json="$out/bench.json" \
  --benchmark-columns=median,iqr 2>&1 | tee "$out/bench.log"
"$PY" -m benchmarks.report "$out/bench.json"
device=$("$PY" -c "import torch; print(''.join(c if c.isalnum() else '-' for c in torch.cuda.get_device_name().lower()).strip('-'))")
cp "$out/bench.json" "$out/tests.log" "$out/bench.log" "benchmarks/results/$device/"
echo "results in benchmarks/results/$device/"
