#!/usr/bin/env bash
# Build the digits CNN for ONNX Runtime at fp32 and int8, inspect, self-test and use the int8 bundle.
set -euo pipefail
OUT=${1:-build/examples/digits}
mkdir -p "$OUT"
python -m edgeexport.models.digits "$OUT/digits.npz"
for precision in fp32 int8; do
  edgeexport build --target ort --model edgeexport.models.digits:model --calib "$OUT/digits.npz" \
    --precision "$precision" --holdout 200 --out "$OUT/bundle-$precision" --force
done
edgeexport inspect "$OUT/bundle-int8"
python "$OUT/bundle-int8/loader.py" --selftest
cd "$OUT/bundle-int8"
python - <<'PY'
import numpy as np
from loader import load

model = load(".")
data = np.load("../digits.npz")
x, y = data["image"][:50], data["labels"][:50]
pred = np.array([model(x[i:i + 1])["output"].argmax() for i in range(len(x))])
print(f"int8 bundle: {np.mean(pred == y):.0%} of 50 digits right")
PY
