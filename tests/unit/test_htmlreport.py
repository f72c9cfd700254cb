"""The HTML report renders whatever the comparison holds: nothing passed, odd names, no network references."""

import re
import warnings

from edgeexport.compare import Comparison, Row


def _comparison(model: str, rows: list[Row]) -> Comparison:
    return Comparison(
        model, rows, {"kind": "PyTorch eager fp32", "latency": {"p50_ms": 1.0, "p90_ms": 1.2, "p99_ms": 1.5},
                      "size_bytes": None, "gflops_per_s": None},
        {"source": "data.npz", "calibration_samples": 8, "holdout_samples": 2},
        {"warmup": 1, "runs_per_round": 1, "rounds": 1, "threads": None, "batch": 1, "timed": "runtime call",
         "machine": {"machine": "x86_64", "cpu_count": 2}, "versions": {"numpy": "2"}, "measured": "now"},
        "cosine", command="edgeexport compare --model 'a b'")


def test_nothing_passed_still_renders_a_complete_page(tmp_path):
    from edgeexport.htmlreport import write_report

    c = _comparison("m:f", [Row("trt", "int8-dynamic", status="skipped", reason="trt has no int8-dynamic")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = write_report(c, tmp_path / "sub" / "r.html").read_text()
    assert "No combination passed validation" in page and "trt has no int8-dynamic" in page
    assert page.count("<img ") == 2 and "error histogram" not in page  # scatter + sizes; no bundle to plot
    assert (tmp_path / "sub" / "r.html").stat().st_mode & 0o044  # readable like any file, not mkstemp's 0600
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.html"]  # no temp file left behind


def test_names_are_escaped_and_nothing_is_fetched(tmp_path):
    import numpy as np

    from edgeexport.htmlreport import render

    row = Row("ort", "fp32", status="passed", reason="<b>note</b>", size_bytes=1000,
              latency={"p50_ms": 0.5, "p90_ms": 0.6, "p99_ms": 0.7}, speedup=2.0, metrics={"cosine": 1.0},
              errors={"out<1>": np.linspace(-1e-6, 1e-6, 100, dtype=np.float32)})
    c = _comparison("<script>alert(1)</script>", [row])
    c.chosen = row
    page = render(c)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;note" in page
    assert "error histogram ort/fp32" in page and page.count("<img ") == 3
    # every image is inline and nothing points at the network
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert "http://" not in page and "https://" not in page
