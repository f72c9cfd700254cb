"""The comparison as one self-contained HTML page: the table, a latency-vs-accuracy scatter, a size chart, error
histograms of the recommended bundle, the protocol and the command that reproduces it.

Plots are matplotlib PNGs embedded as data: URIs, and the style is inline, so the page needs no network to view.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgeexport.compare import Comparison, speedup_cell, recommendation, table_lines, table_rows
from edgeexport.errors import BundleError, missing_extra

_STATUS_COLOURS = {"passed": "#2e7d32", "failed": "#c62828", "error": "#6a1b9a", "skipped": "#757575"}
_METRIC_LABELS = {"task_accuracy": "task accuracy (labelled held-out samples)",
                  "top1": "top-1 agreement with the reference", "cosine": "cosine similarity to the reference",
                  "next_token_top1": "next-token top-1 agreement (decisive positions)"}
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
tr.chosen td { background: #e8f5e9; font-weight: 600; }
.status { font-weight: 600; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.9em; color: #555; max-width: 560px; }
.rec { font-size: 1.1em; padding: 0.6em 1em; background: #e8f5e9; border-left: 4px solid #2e7d32; }
"""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise missing_extra("matplotlib", "report", "--report (the HTML report's plots)") from None


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(png: str, alt: str, caption: str) -> str:
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def scatter(c: Comparison) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ref = c.reference
    ref_y = next((r.metrics.get("reference_accuracy") for r in c.rows if r.metrics.get("reference_accuracy")), None) \
        if c.accuracy_metric == "task_accuracy" else 1.0
    if ref_y is not None:
        ax.scatter([ref["latency"]["p50_ms"]], [ref_y], marker="*", s=180, color="black", zorder=3)
        ax.annotate(ref["kind"], (ref["latency"]["p50_ms"], ref_y), textcoords="offset points", xytext=(6, -12),
                    fontsize=8)
    colours = plt.get_cmap("tab10")
    for n, r in enumerate(c.rows):
        y = r.metrics.get(c.accuracy_metric)
        if r.latency is None or y is None:
            continue
        chosen = r is c.chosen
        ax.scatter([r.latency["p50_ms"]], [y], s=110 if chosen else 55, color=colours(n % 10),
                   marker="o" if r.status == "passed" else "X", edgecolor="black" if chosen else "none", zorder=4,
                   label=r.key + (" (recommended)" if chosen else "") + ("" if r.status == "passed" else " FAILED"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("decode latency p50 (ms per token, log scale; left is faster)" if c.kind == "decoder" else
                  "latency p50 (ms, log scale; left is faster)")
    ax.set_ylabel(_METRIC_LABELS[c.accuracy_metric])
    ax.grid(True, alpha=0.3)
    ax.set_title("Latency vs accuracy")
    return _png(fig)


def size_chart(c: Comparison) -> str:
    import matplotlib.pyplot as plt

    labels, sizes, colours = [], [], []
    if c.reference.get("size_bytes"):
        labels.append(f"reference ({c.reference['kind']})")
        sizes.append(c.reference["size_bytes"] / 1024)
        colours.append("black")
    for r in c.rows:
        if r.size_bytes:
            labels.append(r.key)
            sizes.append(r.size_bytes / 1024)
            colours.append(_STATUS_COLOURS.get(r.status, "gray"))
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(labels) + 1.2))
    ax.barh(labels, sizes, color=colours)
    ax.invert_yaxis()
    for y, s in enumerate(sizes):
        ax.annotate(f"{s:,.1f} KiB", (s, y), textcoords="offset points", xytext=(4, -3), fontsize=8)
    ax.set_xlabel("model file size (KiB)")
    ax.set_xlim(0, max(sizes) * 1.25 if sizes else 1)
    ax.set_title("Size")
    return _png(fig)


def error_histograms(errors: dict[str, np.ndarray], title: str, limit: int = 4) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    pngs = []
    for name, err in list(errors.items())[:limit]:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        err = np.asarray(err, dtype=np.float64)
        span = float(np.max(np.abs(err))) if err.size else 0.0
        ax.hist(err, bins=80, range=(-span, span) if span > 0 else (-1, 1), color="#1565c0")
        ax.set_yscale("log")
        ax.set_xlabel(f"{name}: built - reference")
        ax.set_ylabel("count (log)")
        ax.set_title(f"{title}: {name}", fontsize=10)
        caption = (f"{name}: {err.size:,} sampled elementwise errors on held-out inputs; mean abs "
                   f"{np.mean(np.abs(err)):.3g}, max abs {span:.3g}")
        pngs.append((_png(fig), caption))
    return pngs


def _table(c: Comparison) -> str:
    if c.kind == "decoder":  # the text table's columns: time to first token, decode tokens/s, generation metrics
        head, body = table_rows(c)
        cells = ["<tr>" + "".join(f'<th class="l">{h}</th>' if i < 3 else f"<th>{h}</th>" for i, h in enumerate(head))
                 + "</tr>"]
        for n, row in enumerate(body):
            r = c.rows[n - 1] if n else None
            colour = _STATUS_COLOURS.get(r.status, "gray") if r else "inherit"
            cells.append(f'<tr{" class=chosen" if r is not None and r is c.chosen else ""}>' + "".join(
                f'<td class="l{" status" if i == 2 else ""}"' + (f' style="color:{colour}"' if i == 2 else "")
                + f">{html.escape(v)}</td>" if i < 3 else
                (f"<td{_noisy_title(r.speedup_noise)}>" if i == 6 and r is not None else "<td>") + f"{html.escape(v)}</td>"
                for i, v in enumerate(row)) + "</tr>")
        return '<table id="comparison">' + "".join(cells) + "</table>"
    head = ["target", "precision", "status", "size KiB", "p50 ms", "p90 ms", "p99 ms", "speed-up", "cosine", "top-1",
            "task accuracy", "task drop (pts)", "GFLOP/s"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    ref = c.reference
    rows = ["<tr>" + "".join(f'<th class="l">{h}</th>' if i in (0, 1, 2) else f"<th>{h}</th>"
                             for i, h in enumerate(head)) + "</tr>",
            f'<tr><td class="l">reference</td><td class="l">{html.escape(ref["kind"])}</td><td class="l">-</td>'
            f'<td>{fmt(ref["size_bytes"] and ref["size_bytes"] / 1024, ",.1f")}</td>'
            f'<td>{fmt(ref["latency"]["p50_ms"], ".4g")}</td><td>{fmt(ref["latency"]["p90_ms"], ".4g")}</td>'
            f'<td>{fmt(ref["latency"]["p99_ms"], ".4g")}</td><td>1.00x</td><td>-</td><td>-</td><td>-</td><td>-</td>'
            f'<td>{fmt(ref.get("gflops_per_s"), ".3g")}</td></tr>']
    for r in c.rows:
        m, lat = r.metrics, r.latency or {}
        colour = _STATUS_COLOURS.get(r.status, "gray")
        rows.append(
            f'<tr{" class=chosen" if r is c.chosen else ""}><td class="l">{r.target}</td><td class="l">{r.precision}</td>'
            f'<td class="l status" style="color:{colour}">{r.status}</td>'
            f'<td>{fmt(r.size_bytes and r.size_bytes / 1024, ",.1f")}</td><td>{fmt(lat.get("p50_ms"), ".4g")}</td>'
            f'<td>{fmt(lat.get("p90_ms"), ".4g")}</td><td>{fmt(lat.get("p99_ms"), ".4g")}</td>'
            f'<td{_noisy_title(r.speedup_noise)}>{speedup_cell(r)}</td><td>{fmt(m.get("cosine"), ".5f")}</td>'
            f'<td>{fmt(m.get("top1"), ".3f")}</td><td>{fmt(m.get("task_accuracy"), ".2%")}</td>'
            f'<td>{fmt(m.get("task_drop_points"), "+.2f")}</td><td>{fmt(r.gflops_per_s, ".3g")}</td></tr>')
    return '<table id="comparison">' + "".join(rows) + "</table>"


def _noisy_title(noise: Optional[str]) -> str:
    return f' class="noisy" title="{html.escape(noise)}"' if noise else ""


def render(c: Comparison) -> str:
    """The whole page as one string."""
    p, m = c.protocol, c.protocol["machine"]
    figures = [_figure(scatter(c), "latency vs accuracy scatter",
                       "Each timed combination at its median latency and its accuracy against the reference; the "
                       "star is the reference itself. Circles passed validation; crosses failed it (timed with "
                       "--time-failed). TensorRT rows without an engine are not timed, so not shown."),
               _figure(size_chart(c), "model size bar chart",
                       "Model file size of each built combination (green passed validation, red failed it).")]
    hist = ""
    focus = c.focus or c.chosen
    if focus is not None and focus.errors:
        what = "recommended" if focus is c.chosen else focus.status
        hist = (f"<h2>Error distribution of {html.escape(focus.key)} ({what})</h2>"
                + "".join(_figure(png, f"error histogram {focus.key}", cap)
                          for png, cap in error_histograms(focus.errors, focus.key)))
    stats = c.model_stats or {}
    flops = (f"{stats['params'] / 1e6:.3g} M parameters, {stats['flops_per_sample'] / 1e9:.3g} GFLOP per sample "
             f"({html.escape(stats['counted'])})") if stats.get("flops_per_sample") else "not counted"
    data = c.data
    if c.kind == "decoder":
        model_line = f"Model: <code>{html.escape(c.model)}</code> (a causal LM with its KV cache)."
        data_line = (f"Data: {html.escape(str(data.get('source')))}: {data.get('windows')} held-out windows of "
                     f"{data.get('window_tokens')} tokens ({data.get('tokens'):,} tokens), teacher-forced against "
                     f"PyTorch, and {data.get('prompts')} greedy prompts; the decoder precisions use no calibration.")
    else:
        model_line = f"Model: <code>{html.escape(c.model)}</code>; {flops}."
        data_line = (f"Data: {html.escape(str(data.get('source')))}: {data.get('calibration_samples')} calibration "
                     f"samples, {data.get('holdout_samples')} held-out samples for validation (never used for "
                     "calibration)" + (" &mdash; <b>SYNTHETIC random data</b>" if data.get("synthetic") else "") + ".")
    protocol = [
        model_line, data_line,
        f"Timing: batch {p['batch']}, {p['warmup']} warm-up calls then {p['runs_per_round']} timed runs per variant "
        f"per round, {p['rounds']} interleaved rounds, threads {p['threads'] or 'runtime default'}; "
        f"{html.escape(p['timed'])}.",
        f"Machine: {html.escape(str(m.get('cpu', m.get('machine'))))}, {m.get('cpu_count')} cores, "
        f"{html.escape(m.get('platform', ''))}; measured {p['measured']}.",
        "Versions: " + html.escape(", ".join(f"{k} {v}" for k, v in p["versions"].items())) + ".",
    ]
    notes = [f"<li><b>{html.escape(r.key)}</b>: {html.escape(r.reason)}</li>" for r in c.rows if r.reason]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>edgeexport compare: {html.escape(c.model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>edgeexport compare: {html.escape(c.model)}</h1>",
        f'<p class="rec">{html.escape(recommendation(c))}</p>',
        _table(c),
        "<h3>Notes</h3><ul>" + "".join(notes) + "</ul>" if notes else "",
        "<h2>Latency, accuracy and size</h2>", *figures, hist,
        "<h2>Protocol</h2><ul>" + "".join(f"<li>{x}</li>" for x in protocol) + "</ul>",
        "<h2>Reproduce</h2>", f"<pre>{html.escape(c.command)}</pre>",
        "<h2>The same table as text</h2>", f"<pre>{html.escape(chr(10).join(table_lines(c)))}</pre>",
        "</body></html>", ""])


def write_report(c: Comparison, path: Path) -> Path:
    """Write the page atomically (a temp file in the same folder, then a rename)."""
    import matplotlib

    matplotlib.use("Agg")
    page = render(c)
    path = Path(path).absolute()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a normal file, not mkstemp's private 0600
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise BundleError(f"cannot write the report {str(path)!r}", str(e), "choose another --report path") from None
    return path
