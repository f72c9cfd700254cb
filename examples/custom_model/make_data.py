"""Sensor-like calibration data: three noisy sinusoid channels per window (deterministic)."""

import sys

import numpy as np

rng = np.random.default_rng(0)
t = np.linspace(0, 1, 64, dtype=np.float32)
freqs = rng.uniform(1, 8, size=(300, 3, 1)).astype(np.float32)
window = np.sin(2 * np.pi * freqs * t) + 0.1 * rng.standard_normal((300, 3, 64)).astype(np.float32)
np.savez(sys.argv[1], window=window.astype(np.float32))
print(f"wrote {sys.argv[1]}: window {window.shape}")
