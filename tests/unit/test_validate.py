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
