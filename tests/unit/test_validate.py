import numpy as np
import pytest

from edgeexport.validate import compare, is_classifier_like, output_metrics


def _split(a):
    return [a[i : i + 1] for i in range(len(a))]


def test_identical_outputs_are_perfect():
    a = np.random.default_rng(0).standard_normal((20, 10)).astype(np.float32)
    m = output_metrics(_split(a), _split(a.copy()))
    assert m["max_abs"] == 0 and m["cosine"] == pytest.approx(1.0) and m["snr_db"] == 200.0 and m["top1"] == 1.0


def test_snr_and_cosine_match_their_definitions():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((50, 8))
    noise = 0.1 * rng.standard_normal((50, 8))
    m = output_metrics(_split(ref), _split(ref + noise))
    assert m["snr_db"] == pytest.approx(10 * np.log10((ref**2).sum() / (noise**2).sum()), rel=1e-6)
    cos = np.mean([r @ o / np.linalg.norm(r) / np.linalg.norm(o) for r, o in zip(ref, ref + noise)])
    assert m["cosine"] == pytest.approx(cos, rel=1e-9)
    assert m["max_abs"] == pytest.approx(np.abs(noise).max())


def test_top1_agreement_counts_flips():
    ref = np.eye(4, dtype=np.float32)
    out = ref.copy()
    out[0] = [0, 1, 0, 0]  # sample 0 now predicts class 1
    assert output_metrics(_split(ref), _split(out))["top1"] == 0.75
    assert not is_classifier_like(np.zeros((1, 4, 4), np.float32))


def test_gate_fails_when_any_output_is_out_of_tolerance_and_reports_all():
    rng = np.random.default_rng(2)
    good = rng.standard_normal((10, 5))
    refs = {"a": _split(good), "b": _split(good)}
    outs = {"a": _split(good), "b": _split(good + rng.standard_normal((10, 5)))}
    report = compare(refs, outs, {"cosine": 0.99, "snr_db": 20})
    assert not report.passed and not bool(report)
    assert {c.output for c in report.failures()} == {"b"}
    assert set(report.outputs) == {"a", "b"}  # every output's metrics collected before deciding
    assert "FAIL" in report.table() and report.to_dict()["passed"] is False


def test_task_accuracy_with_labels():
    ref = np.eye(4, dtype=np.float32)
    out = ref.copy()
    out[3] = [1, 0, 0, 0]
    labels = np.array([0, 1, 2, 3])
    report = compare({"y": _split(ref)}, {"y": _split(out)}, {"accuracy_drop": 10.0}, labels)
    assert report.task["reference_accuracy"] == 1.0 and report.task["accuracy"] == 0.75
    assert report.task["drop_points"] == pytest.approx(25.0)
    assert not report.passed


# --- output kinds: metrics that mean something for what each output is -------------------------------------------

from edgeexport.validate import infer_kind, output_kinds  # noqa: E402


def _unit_rows(rng, n, d):
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("make, kind", [
    (lambda r: 1 / (1 + np.exp(-r.standard_normal((30, 1)))), "probability"),  # a detector's one sigmoid
    (lambda r: r.standard_normal((30, 1)) * 5, "regression"),  # one value per sample, any sign
    (lambda r: (lambda e: e / e.sum(1, keepdims=True))(np.exp(r.standard_normal((30, 6)))), "probability"),  # softmax
    (lambda r: 1 / (1 + np.exp(-r.standard_normal((30, 5)))), "probability"),  # multi-label sigmoids
    (lambda r: _unit_rows(r, 30, 256), "embedding"),  # an L2-normalized speaker embedding
    (lambda r: np.abs(_unit_rows(r, 30, 256)), "embedding"),  # ReLU then L2 norm: in [0, 1], still an embedding
    (lambda r: r.standard_normal((30, 10)) * 3, "logits"),
    (lambda r: r.standard_normal((30, 4, 7)), "regression"),
])
def test_output_kind_is_inferred_from_shape_and_values(make, kind):
    ref = make(np.random.default_rng(0)).astype(np.float32)
    assert infer_kind("out", _split(ref))[0] == kind


def test_kind_from_name_task_declaration_and_state():
    ref = np.random.default_rng(1).standard_normal((20, 64)).astype(np.float32)
    assert infer_kind("speaker_embedding", _split(ref))[0] == "embedding"
    assert infer_kind("y", _split(ref), task="feature-extraction")[0] == "embedding"
    kinds = output_kinds({"a": _split(ref), "b": _split(ref), "c": _split(ref)}, {"a": "regression"}, None, ["c"])
    assert kinds["a"] == ("regression", "declared with --output") and kinds["b"][0] == "logits"
    assert kinds["c"][0] == "state"


def test_one_value_per_sample_has_no_cosine_and_a_flipped_probability_fails():
    """A one-element output's cosine is always 1: the detector's int8 passed on it while wrong by up to 0.97. Its
    decisions are checked instead; here SNR stays high while 4 of 40 decisions flip."""
    rng = np.random.default_rng(3)
    ref = rng.uniform(0.0, 1.0, (40, 1))
    out = ref.copy()
    near = np.argsort(np.abs(ref[:, 0] - 0.5))[:4]  # the four closest to the threshold cross it
    out[near, 0] = 1.0 - ref[near, 0] + np.sign(0.5 - ref[near, 0]) * 1e-3
    report = compare({"p": _split(ref)}, {"p": _split(out)}, {"cosine": 0.98, "snr_db": 12, "prob_mean_abs": 0.02,
                                                               "flip_rate": 0.03})
    m = report.outputs["p"]
    assert "cosine" not in m and m["kind"] == "probability" and m["snr_db"] > 12
    assert m["flip_rate"] == pytest.approx(0.1)
    assert [c.metric for c in report.failures()] == ["flip_rate"]
    assert {c.metric for c in report.checks} == {"prob_mean_abs", "flip_rate"}  # no cosine/SNR on a probability


def test_an_embedding_is_not_refused_on_top1():
    """The LSTM speaker encoder was refused on top-1 at cosine 0.9994: an embedding's argmax means nothing."""
    rng = np.random.default_rng(4)
    ref = _unit_rows(rng, 40, 256)
    out = ref + 0.01 * rng.standard_normal(ref.shape)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    report = compare({"emb": _split(ref)}, {"emb": _split(out)}, {"cosine": 0.98, "snr_db": 12, "top1": 0.95})
    assert report.outputs["emb"]["kind"] == "embedding" and "top1" not in report.outputs["emb"]
    assert report.passed and {c.metric for c in report.checks} == {"cosine", "snr_db"}
