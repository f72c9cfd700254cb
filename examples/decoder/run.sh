#!/usr/bin/env bash
# A small GPT-2 trained here on the standard library's pydoc_data.topics -> ONNX Runtime with its KV cache, at fp32
# and weight-only int4, validated on paragraphs it never saw; then the bundle generates text on the device.
set -euo pipefail
OUT=${1:-build/examples/decoder}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
# trains the decoder on first use (about 3 minutes on 2 cores), then finds it in the cache
MODEL="hf:$(python -m edgeexport.models.decoder --held-out "$OUT/held_out.txt")"
for precision in fp32 int4-weight; do
  edgeexport build --task text-generation --model "$MODEL" --calib "$OUT/held_out.txt" --precision "$precision" \
    --out "$OUT/$precision" --force
done
python "$OUT/int4-weight/loader.py" --selftest
du -k "$OUT/fp32/model.onnx" "$OUT/int4-weight/model.onnx"
cd "$OUT/int4-weight"
python - <<'PY'
from loader import load

model = load(".", threads=2)
prompt = "The import statement"
print("greedy:", repr(prompt + model.generate(prompt, max_new_tokens=24)))
print("sampled:", repr(prompt + model.generate(prompt, max_new_tokens=24, temperature=0.8, top_k=40, seed=1)))
PY
