"""`edgeexport bench BUNDLE` on real bundles: the numbers, the protocol, a fresh process, and clear refusals."""

import json

import pytest
import torch

from tests.conftest import make_cfg, quiet_build

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows_bundle(rows_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "rows-int8"
    quiet_build(make_cfg(model="edgeexport.models.digit_rows:model", precision="int8", out=str(out),
                         calibration={"path": str(rows_npz)}))
    return out


def _flops_by_hooks(net, x) -> int:
    """An independent count from PyTorch itself: 2 x multiply-adds of every Linear and Conv2d call."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, torch.nn.Linear):
            total += 2 * out.numel() * mod.in_features
        elif isinstance(mod, torch.nn.Conv2d):
            total += 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return total


def test_manifest_flops_match_pytorch_hooks(digits_npz, tmp_path):
    from edgeexport.models.digits import train

    result = quiet_build(make_cfg(model="edgeexport.models.digits:model", out=str(tmp_path / "b"),
                                  calibration={"path": str(digits_npz)}))
    stats = json.loads((result.out / "manifest.json").read_text())["model_stats"]
    assert stats["flops_per_sample"] == _flops_by_hooks(train(), torch.zeros(1, 1, 8, 8)) > 0
    n = sum(p.numel() for p in train().parameters())
    assert 0.99 * n <= stats["params"] <= n  # the exporter folds BatchNorm's scale and shift into the convs


def test_bench_json_records_numbers_and_protocol(cli, rows_bundle):
    r = cli("bench", rows_bundle, "--runs", "30", "--warmup", "3", "--batch", "4", "--threads", "1",
            "--cold-runs", "2", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    lat, proto = res["latency"], res["protocol"]
    assert lat["runs"] == 30 and 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert res["throughput_per_s"] == pytest.approx(4 * 1000 / lat["mean_ms"])
    assert proto["batch"] == 4 and proto["feed_shapes"] == {"rows": [4, 8, 8]} and proto["threads"] == 1
    assert proto["warmup"] == 3 and "onnxruntime" in proto["versions"] and proto["machine"]["cpu_count"]
    fresh = res["fresh_process"]
    assert len(fresh["cold_start_ms_all"]) == 2
    assert fresh["cold_start_ms"] > fresh["load_ms"] > 0 and fresh["first_result_ms"] > 0
    assert 20 < fresh["peak_rss_mib"] < 2000  # a real process that imported onnxruntime, not this test's
    assert res["model_file_bytes"] == (rows_bundle / "model.onnx").stat().st_size < res["bundle_bytes"]
    assert res["gflops_per_s"] > 0


def test_bench_text_and_time_budget(cli, rows_bundle):
    r = cli("bench", rows_bundle, "--duration", "0.3", "--cold-runs", "0")
    assert r.exit_code == 0, r.stderr
    assert "latency:" in r.stdout and "p99" in r.stdout and "throughput:" in r.stdout and "cold start" not in r.stdout


def test_bench_refuses_tampered_bundles_and_fixed_batches(cli, digits_npz, rows_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(rows_bundle, bad)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"x")
    r = cli("bench", bad)
    assert r.exit_code == 1 and "cannot load bundle" in r.stderr and "checksum" in r.stderr
    assert "Traceback" not in r.stderr
    fixed = quiet_build(make_cfg(model="edgeexport.models.digits:model", out=str(tmp_path / "fixed"),
                                 calibration={"path": str(digits_npz)}, bench={"enabled": False})).out
    r = cli("bench", fixed, "--batch", "8", "--cold-runs", "0")
    assert r.exit_code == 2 and "fixed batch dimension" in r.stderr and "--batch 1" in r.stderr
    r = cli("bench", fixed, "--batch", "1", "--batch", "8", "--cold-runs", "0")  # refused before any timing
    assert r.exit_code == 2 and "fixed batch dimension" in r.stderr and "==> latency" not in r.stderr


def test_bench_table_over_batch_sizes_and_threads(cli, rows_bundle):
    args = ("bench", rows_bundle, "--runs", "20", "--warmup", "2", "--batch", "1", "--batch", "8", "--threads", "1",
            "--threads", "2", "--cold-runs", "1")
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.stderr
    grid = json.loads(r.stdout)["grid"]
    combos = [(g["protocol"]["threads"], g["protocol"]["batch"]) for g in grid]
    assert combos == [(1, 1), (1, 8), (2, 1), (2, 8)]
    for g in grid:
        b = g["protocol"]["batch"]
        assert g["protocol"]["feed_shapes"]["rows"][0] == b
        assert g["throughput_per_s"] == pytest.approx(b * 1e3 / g["latency"]["mean_ms"])
    assert "fresh_process" in grid[0] and all("fresh_process" not in g for g in grid[1:])  # cold start once
    r = cli(*args[:-1], "0")
    assert r.exit_code == 0, r.stderr
    table = r.stdout.split("threads x batch", 1)[1].splitlines()
    rows = [ln.split() for ln in table if ln.strip() and ln.split()[0] in ("1", "2")]
    assert [(int(x[0]), int(x[1])) for x in rows] == combos
