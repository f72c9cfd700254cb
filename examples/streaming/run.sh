#!/usr/bin/env bash
# A stateful streaming model: a GRU reads each digit one pixel row at a time, fed its own state, with a scalar
# (pixel scale) input. Built at int8, validated by streaming the held-out rows, then run row by row from the
# bundle's loader with stream()/reset().
set -euo pipefail
OUT=${1:-build/examples/streaming}
mkdir -p "$OUT"
python -m edgeexport.models.streaming "$OUT/stream.npz"
# the state pair h <- hn is detected by name (--state h=hn says it explicitly); prob is a probability output
edgeexport build --target ort --model edgeexport.models.streaming:model --calib "$OUT/stream.npz" \
  --precision int8 --state h=hn --out "$OUT/bundle" --force
python "$OUT/bundle/loader.py" --selftest
cd "$OUT/bundle"
python - <<'PY'
import numpy as np
from loader import load

model = load(".")
data = np.load("../stream.npz")
rows, scale = data["row"], np.asarray(data["scale"])
for image in range(3):
    model.reset()  # a new digit: the state goes back to zeros
    probs = [float(model.stream({"row": rows[image * 8 + k], "scale": scale})["prob"][0, 0]) for k in range(8)]
    print(f"digit {image}: P(digit >= 5) row by row: " + " ".join(f"{p:.2f}" for p in probs))
PY
