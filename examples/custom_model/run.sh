#!/usr/bin/env bash
# Build a user model from a file: dry-run to YAML, replay the YAML, run a batch through the loader.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-build/examples/custom_model}
mkdir -p "$OUT"
python "$HERE/make_data.py" "$OUT/windows.npz"
edgeexport build --model "$HERE/model.py:build" --calib "$OUT/windows.npz" --precision int8 \
  --calib-method percentile --out "$OUT/bundle" --force --dry-run > "$OUT/config.yaml"
cat "$OUT/config.yaml"
edgeexport build -c "$OUT/config.yaml"
cd "$OUT/bundle"
python - <<'PY'
import numpy as np
from loader import load

model = load(".")
batch = np.load("../windows.npz")["window"][:8]
print("batch of 8 ->", model({"window": batch})["output"].shape)
PY
