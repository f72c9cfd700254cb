"""Stateful models: state pairs, stream starts, the float model's state carried into calibration, and validation
that streams each model with its own state (so a state that drifts shows)."""

import numpy as np
import pytest

from edgeexport.calibration import load_calibration
from edgeexport.config import CalibrationConfig, InputSpec
from edgeexport.errors import CalibrationError
from edgeexport import stream

SPECS = [InputSpec(name="x", shape=[1, 3]), InputSpec(name="h", shape=[1, 4]), InputSpec(name="gain", shape=[], dtype="int64")]


class Leaky:
    """A real (numpy) recurrent cell: h' = 0.9 h + W x; y = sigmoid(sum h). ``bias`` is what a quantized copy adds
    to its state every step: tiny per step, and it accumulates only when the model is fed its own state."""

    def __init__(self, bias=0.0):
        self.w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32) * 0.3
        self.bias = bias
        self.calls = 0

    def infer(self, feed):
        self.calls += 1
        h = 0.9 * feed["h"] + feed["x"] @ self.w * float(feed["gain"]) + self.bias
        return {"y": 1 / (1 + np.exp(-h.sum(-1, keepdims=True))), "hn": h.astype(np.float32)}


def _data(tmp_path, n=120, starts=None):
    rng = np.random.default_rng(1)
    arrays = {"x": rng.standard_normal((n, 1, 3)).astype(np.float32), "h": np.zeros((n, 1, 4), np.float32),
              "gain": np.int64(1)}
    if starts is not None:
        arrays["stream_start"] = starts
    np.savez(tmp_path / "s.npz", **arrays)
    return load_calibration(CalibrationConfig(path=str(tmp_path / "s.npz"), holdout=40), SPECS)


def test_pairs_are_detected_by_name_only_when_unique():
    spec = lambda n: InputSpec(name=n, shape=[1, 4])  # noqa: E731
    assert stream.detect_pairs([spec("input"), spec("state"), InputSpec(name="sr", shape=[], dtype="int64")],
                               ["output", "stateN"]) == {"state": "stateN"}
    assert stream.detect_pairs([spec("x"), spec("h0"), spec("c0")], ["y", "hn", "cn"]) == {"h0": "hn", "c0": "cn"}
    assert stream.detect_pairs([spec("x"), spec("h_in")], ["y", "h_out"]) == {"h_in": "h_out"}
    assert stream.detect_pairs([spec("x"), spec("mask")], ["y", "logits"]) == {}
    assert stream.detect_pairs([spec("x")], ["xn"]) == {}  # the data input itself is never a state


def test_a_single_number_is_shared_by_every_sample(tmp_path):
    cs = _data(tmp_path)
    feed = cs.sample(5)
    assert feed["gain"].shape == () and feed["gain"].dtype == np.int64 and int(feed["gain"]) == 1
    assert any("shared by every sample" in n for n in cs.data.notes)


def test_stream_starts_from_the_data_or_from_zero_states(tmp_path):
    starts = np.zeros(120, bool)
    starts[::30] = True
    cs = _data(tmp_path, starts=starts)
    np.testing.assert_array_equal(stream.stream_starts(cs, {"h": "hn"}), starts)
    cs = _data(tmp_path)  # every stored state is zero: one stream
    assert stream.stream_starts(cs, {"h": "hn"}).sum() == 1
    np.savez(tmp_path / "bad.npz", x=np.zeros((20, 1, 3), np.float32), h=np.zeros((20, 1, 4), np.float32),
             gain=np.int64(1), stream_start=np.full(20, 0.5))
    with pytest.raises(CalibrationError, match="not one flag per sample"):
        load_calibration(CalibrationConfig(path=str(tmp_path / "bad.npz")), SPECS)


def test_calibration_sees_the_state_the_float_model_carries(tmp_path):
    starts = np.zeros(120, bool)
    starts[::30] = True
    cs = _data(tmp_path, starts=starts)
    stream.streaming_split(cs)
    np.testing.assert_array_equal(cs.holdout_idx, np.arange(80, 120))  # the last samples, in order
    assert not set(cs.calib_idx) & set(cs.holdout_idx)
    ref = Leaky()
    stream.carry_reference_state(cs, ref, {"h": "hn"}, lambda m: None)
    h = np.zeros((1, 4), np.float32)
    for i in range(120):  # the carried state is the reference's own, reset at each stream start
        if starts[i]:
            h = np.zeros((1, 4), np.float32)
        np.testing.assert_allclose(cs.sample(i)["h"], h, rtol=1e-6, atol=1e-7)
        h = ref.infer({**cs.sample(i), "h": h})["hn"]


def test_streamed_validation_shows_drift_that_the_float_state_hides(tmp_path):
    cs = _data(tmp_path)  # one stream of 120 steps
    stream.streaming_split(cs)
    ref, cand = Leaky(), Leaky(bias=2e-3)
    stream.carry_reference_state(cs, ref, {"h": "hn"}, lambda m: None)
    refs, outs, steps = stream.collect(ref, cand, cs, {"h": "hn"})
    assert steps == list(range(40))
    streamed = np.abs(np.concatenate(outs["hn"]) - np.concatenate(refs["hn"])).max()
    forced = max(np.abs(cand.infer(f)["hn"] - ref.infer(f)["hn"]).max() for f in cs.holdout())
    assert forced == pytest.approx(2e-3, rel=1e-3)  # fed the float state, the copy looks 2e-3 off
    assert streamed > 5 * forced  # fed its own, the error accumulates (to ~ bias / (1 - 0.9))
    d = stream.drift(refs, outs, steps)
    assert d["hn"][-1] > d["hn"][0] and len(d["by_part"]) == 4


def test_a_name_match_whose_shapes_differ_is_not_a_state_pair(tmp_path):
    """'mask' and 'mask_out' match by name; the output is [1, 2], the input [1, 4]: a detected pair is dropped with
    a note, a declared one is an error."""
    from edgeexport.errors import ConfigError

    class Masker:
        def infer(self, feed):
            return {"y": feed["x"], "hn": np.zeros((1, 2), np.float32)}

    cs = _data(tmp_path)
    notes = []
    assert stream.check_shapes({"h": "hn"}, Masker(), cs, declared=False, log=notes.append) == {}
    assert "not streamed" in notes[0] and "hn is float32 [1, 2] but h takes float32 [1, 4]" in notes[0]
    with pytest.raises(ConfigError, match="cannot be fed back"):
        stream.check_shapes({"h": "hn"}, Masker(), cs, declared=True, log=notes.append)
    assert stream.check_shapes({"h": "hn"}, Leaky(), cs, declared=False, log=notes.append) == {"h": "hn"}
