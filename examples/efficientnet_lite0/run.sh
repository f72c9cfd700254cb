#!/usr/bin/env bash
# EfficientNet-Lite0 (ImageNet weights) -> ORT int8, calibrated on real photo crops, validated on crops of
# *other* photos; then the same build with a constant-gray calibration set, which the gate must refuse.
set -euo pipefail
OUT=${1:-build/examples/efficientnet_lite0}
mkdir -p "$OUT"
python -m edgeexport.models.photos "$OUT/calib" --set calib --per-photo 64
python -m edgeexport.models.photos "$OUT/val" --set val --per-photo 64
python -m edgeexport.models.photos "$OUT/gray" --constant 32
COMMON=(--model edgeexport.models.efficientnet:lite0 --val "$OUT/val"
        --resize-shorter 256 --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 --bench-runs 20)
edgeexport build --target ort "${COMMON[@]}" --calib "$OUT/calib" --precision fp32 --out "$OUT/fp32" --force
# int8 with the default recipe (percentile ranges, 8-bit per-channel GPTQ weights, bias correction, float
# logits): about 0.98 top-1 agreement, within the default limits. --explain ranks the layers by the noise their
# own quantization makes (printed, and in the bundle's report.md and layer_errors.png)
edgeexport build --target ort "${COMMON[@]}" --calib "$OUT/calib" --precision int8 --out "$OUT/int8" --force \
  --explain
# a constant-gray calibration must be refused (--no-diagnose: no alternative can rescue it, so do not try three)
if edgeexport build --target ort "${COMMON[@]}" --calib "$OUT/gray" --precision int8 --out "$OUT/broken" --force \
     --no-diagnose; then
  echo "ERROR: a constant-image calibration was accepted" >&2
  exit 1
fi
echo "the constant-image calibration was refused, as it must be"
# TFLite full-integer int8 (int8 activations everywhere, XNNPACK on CPU): about 0.97 top-1 agreement here
edgeexport build --target tflite "${COMMON[@]}" --calib "$OUT/calib" --precision int8 --out "$OUT/tflite-int8" \
  --force
# TensorRT int8 for a Jetson: explicit Q/DQ on the inputs of every conv (symmetric int8, per-channel weights).
# No TensorRT here: the engine is deferred to the device and the Q/DQ graph is validated on onnxruntime
# (about cosine 0.998, top-1 0.97 on these crops).
edgeexport build --target trt "${COMMON[@]}" --calib "$OUT/calib" --precision int8 --out "$OUT/trt-int8" --force
python "$OUT/trt-int8/loader.py" --selftest --runtime onnxruntime
python "$OUT/int8/loader.py" --selftest
cd "$OUT/int8"
python - <<'PY'
import glob
import numpy as np
from loader import load

model = load(".")
for path in sorted(glob.glob("../val/*.png"))[:4]:
    logits = model(model.preprocess(path))["output"][0]
    print(f"{path.split('/')[-1]}: class {int(logits.argmax())}")
PY
