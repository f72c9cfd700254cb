#!/usr/bin/env bash
# all-MiniLM-L6-v2 (sentence-transformers) -> ONNX Runtime at fp32, int8-dynamic and static int8, calibrated on
# real English sentences and validated on *other* sentences; then the bundle embeds strings on the device.
set -euo pipefail
OUT=${1:-build/examples/minilm}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
MODEL="hf:$(python -c 'import edgeexport.models.sentences as s; print(s.minilm_path())')"
python -m edgeexport.models.sentences "$OUT/calib.txt" --count 300
python -m edgeexport.models.sentences "$OUT/val.txt" --count 100 --skip 300
for precision in fp32 int8-dynamic int8; do
  # static int8 also ranks the layers by the error they add (--explain): the ranking goes to stderr
  explain=(); [ "$precision" = int8 ] && explain=(--explain)
  # the int8-dynamic bundle runs on this machine below, so it is built for it (device=host: 7-bit weights on x86
  # CPUs without VNNI, whose int8 kernels saturate 8-bit ones and have no exact mode for dynamic int8; 8-bit
  # elsewhere). The others keep device=generic (ARM64, x86 with VNNI), which the build validates whatever its CPU
  device=(); [ "$precision" = int8-dynamic ] && device=(--option device=host)
  if edgeexport build --model "$MODEL" --task feature-extraction --calib "$OUT/calib.txt" --val "$OUT/val.txt" \
       --max-length 128 --precision "$precision" --out "$OUT/$precision" --force --bench-runs 20 --json \
       "${explain[@]}" "${device[@]}" > "$OUT/$precision.json"; then
    echo "$precision: validated"
  else
    echo "$precision: REFUSED by the validation gate (see $OUT/$precision.json)"
  fi
  python - "$OUT/$precision.json" "$precision" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
out = s["validation"]["outputs"]["sentence_embedding"]
print(f"  {sys.argv[2]}: sentence_embedding mean cosine {out['cosine']:.4f} (min {out['cosine_min']:.4f}) "
      f"on {s['validation']['samples']} held-out sentences")
PY
done
python "$OUT/int8-dynamic/loader.py" --selftest
cd "$OUT/int8-dynamic"
python - <<'PY'
import numpy as np
from loader import load

model = load(".")
texts = ["A bundle carries its own tokenizer.", "The loader turns strings into input ids.", "Cats sleep all day."]
emb = model(texts)["sentence_embedding"]
sims = emb @ emb.T
print("similarity of the first two sentences:", round(float(sims[0, 1]), 3), "| first vs third:", round(float(sims[0, 2]), 3))
PY
