"""`edgeexport compare` end to end on the digits CNN, and its HTML report rendered in headless Chromium."""

import json
import os
import shutil
from pathlib import Path

import pytest

from edgeexport.bundle import loader

MODEL = "edgeexport.models.digits:model"
pytestmark = pytest.mark.slow


def render_in_chromium(page_path: Path, screenshot: Path) -> dict:
    """Open the page in Debian's chromium (driven by playwright) with no network; return what it shows."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: 'make test' installs it with apt-get")
        pytest.skip("Debian's chromium is not installed ('make test' installs it when apt-get can run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
            page = context.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri(), wait_until="load")
            shown = page.evaluate("""() => ({
                rows: [...document.querySelectorAll('#comparison tr')].map(
                    tr => [...tr.children].map(td => td.innerText.trim())),
                images: [...document.images].map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0,
                    width: i.getBoundingClientRect().width, height: i.getBoundingClientRect().height})),
                text: document.body.innerText})""")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    shown["requests"] = [u for u in requests if not u.startswith(("file:", "data:"))]
    return shown


def test_compare_every_target_table_json_bundles_and_report(cli, digits_npz, tmp_path):
    out, report = tmp_path / "bundles", tmp_path / "report.html"
    r = cli("compare", "--model", MODEL, "--calib", digits_npz, "--targets", "ort,tflite,trt",
            "--precisions", "fp32,int8-dynamic,int8", "--runs", "20", "--rounds", "2", "--warmup", "2",
            "--threads", "1", "--out", out, "--report", report, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    rows = {f"{x['target']}/{x['precision']}": x for x in res["rows"]}
    assert list(rows) == ["ort/fp32", "ort/int8-dynamic", "ort/int8", "tflite/fp32", "tflite/dynamic-range",
                          "tflite/int8", "trt/fp32", "trt/int8-dynamic", "trt/int8"]
    # progress: every combination announced with its place in the run
    for i, key in enumerate(k for k, x in rows.items() if x["status"] != "skipped" or "precision" not in x["reason"]):
        assert f"[{i + 1}/8] {key}: building and validating" in r.stderr
    assert "asked for int8-dynamic" in rows["tflite/dynamic-range"]["reason"]
    assert rows["trt/int8-dynamic"]["status"] == "skipped" and "no int8-dynamic" in rows["trt/int8-dynamic"]["reason"]
    ref = res["reference"]
    assert ref["kind"] == "PyTorch eager fp32" and ref["latency"]["p50_ms"] > 0 and ref["size_bytes"] > 0
    for key, row in rows.items():
        if row["status"] == "skipped":
            continue
        assert row["status"] == "passed", (key, row["reason"])
        runtime = "onnxruntime" if key.startswith("trt/") else None
        assert Path(row["bundle"]).parent == out and loader.load(row["bundle"], runtime=runtime).selftest(verbose=False)
        assert row["size_bytes"] == (Path(row["bundle"]) / loader.read_manifest(row["bundle"])["model_file"]).stat().st_size
        m = row["metrics"]
        assert m["cosine"] > 0.999 and m["top1"] >= 0.99 and m["task_accuracy"] > 0.9 and abs(m["task_drop_points"]) <= 1
        if key.startswith("trt/"):  # no engine here: validated on onnxruntime, and not timed on the CPU
            assert row["latency"] is None and "latency not measured" in row["reason"] and "onnxruntime" in row["reason"]
        else:
            lat = row["latency"]
            assert lat["runs"] == 40 and lat["p50_ms"] <= lat["p90_ms"]
            assert row["speedup_vs_reference"] == pytest.approx(ref["latency"]["p50_ms"] / lat["p50_ms"])
            assert row["gflops_per_s"] > 0
    assert rows["ort/int8"]["size_bytes"] < 0.4 * rows["ort/fp32"]["size_bytes"]
    timed = {k: x for k, x in rows.items() if x["latency"]}
    assert res["recommended"] in timed
    fastest = min(x["latency"]["p50_ms"] for x in timed.values())
    assert timed[res["recommended"]]["latency"]["p50_ms"] <= fastest * 1.05
    assert res["protocol"]["rounds"] == 2 and res["protocol"]["threads"] == 1 and res["model_stats"]["flops"] > 0

    shown = render_in_chromium(report, tmp_path / "report.png")
    table = shown["rows"]
    assert table[0][:3] == ["target", "precision", "status"] and len(table) == 1 + 1 + 9  # header, reference, rows
    assert [row[:3] for row in table[2:]][0] == ["ort", "fp32", "passed"]
    assert any(row[:3] == ["trt", "int8-dynamic", "skipped"] for row in table)
    alts = [i["alt"] for i in shown["images"]]
    assert "latency vs accuracy scatter" in alts and "model size bar chart" in alts
    assert any(a.startswith("error histogram") for a in alts)
    assert all(i["loaded"] and i["width"] > 200 and i["height"] > 100 for i in shown["images"]), shown["images"]
    assert shown["requests"] == []  # self-contained: nothing fetched
    assert "Recommended: " + res["recommended"] in shown["text"]
    command = next(line for line in shown["text"].splitlines() if line.startswith("edgeexport compare --"))
    assert "--targets ort,tflite,trt --precisions fp32,int8-dynamic,int8 --model " + MODEL in command  # reproduces it
    assert f"--calib {digits_npz}" in command and "--runs 20 --rounds 2 --warmup 2 --threads 1" in command
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_failed_error_and_skipped_rows_do_not_stop_the_comparison(digits_npz, tmp_path, monkeypatch):
    from edgeexport import compare
    from edgeexport.config import make_config
    from edgeexport.targets.fake import FakeTarget

    def broken(self, *a, **k):
        raise RuntimeError("converter crashed\nsecond line")

    monkeypatch.setattr(FakeTarget, "build", broken)
    config = make_config({"model": MODEL, "calibration": {"path": str(digits_npz)},
                          "tolerance": {"cosine": 0.9999999}})
    lines = []
    result = compare.run(config, ["ort", "fake"], ["fp32", "int8"],
                         compare.Settings(warmup=1, runs=5, rounds=1, time_failed=True), log=lines.append,
                         focus="ort/int8")
    rows = {r.key: r for r in result.rows}
    assert rows["ort/fp32"].status == "passed" and rows["ort/fp32"].latency
    failed = rows["ort/int8"]
    assert failed.status == "failed" and "cosine" in failed.reason and failed.metrics["cosine"] < 0.9999999
    # timed anyway (rebuilt with the limits lifted), but no refused bundle is ever handed out
    assert failed.latency["runs"] == 5 and failed.speedup > 0 and failed.out is None and "timed anyway" in failed.reason
    assert rows["fake/fp32"].status == "error" and rows["fake/fp32"].reason == "RuntimeError: converter crashed"
    assert rows["fake/int8"].status == "skipped"
    assert result.chosen is rows["ort/fp32"]
    text = result.table()
    assert "FAILED" in text and "ERROR" in text and "SKIPPED" in text and "Recommended: ort/fp32" in text
    assert "[1/3] ort/fp32: building and validating" in lines and any("[3/3] fake/fp32: error" in x for x in lines)
    # --focus on the refused combination: the report plots its errors (the ones the gate refused)
    from edgeexport.htmlreport import render

    assert result.focus is failed and set(failed.errors) == {"output"} and failed.errors["output"].size > 100
    assert "Error distribution of ort/int8 (failed)" in render(result)


def test_compare_refuses_bad_requests_clearly(cli, digits_npz, tmp_path):
    r = cli("compare", "--model", MODEL, "--calib", digits_npz, "--targets", "ort,nope")
    assert r.exit_code == 2 and "unknown target 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = cli("compare", "--model", MODEL, "--calib", digits_npz, "--targets", "trt", "--precisions", "int8-dynamic")
    assert r.exit_code == 1 and "No combination passed validation" in r.stdout
    r = cli("compare", "--model", MODEL, "--calib", digits_npz, "--targets", "ort", "--focus", "ort/int4")
    assert r.exit_code == 2 and "--focus 'ort/int4'" in r.stderr and "ort/int8-dynamic" in r.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    r = cli("compare", "--model", MODEL, "--calib", digits_npz, "--out", tmp_path / "taken")
    assert r.exit_code == 2 and "--force" in r.stderr and (tmp_path / "taken" / "x").read_text() == "keep me"
