"""``guidekit quickstart``: every registered quickstart step on the built-in data, then one
self-contained ``report.html`` (images inlined, no server needed) and ``summary.json``."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from guidekit.checkpoint import atomic_write_bytes
from guidekit.lookup import quickstart_steps
from guidekit.specs import QuickstartContext, StepReport


def run_quickstart(
    out: str | Path, *, fast: bool = False, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Run the steps in order; returns the summary written to ``summary.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = quickstart_steps()
    ctx = QuickstartContext(out=out, seed=seed, fast=fast, progress=progress)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for step in steps:
        t0 = time.perf_counter()
        ctx.results[step.name] = step.run(ctx)
        timings[step.name] = round(time.perf_counter() - t0, 1)
    summary = {
        "out": str(out),
        "fast": fast,
        "seconds": round(time.perf_counter() - t_all, 1),
        "step_seconds": timings,
        "steps": {
            name: {"title": r.title, "images": [str(p) for p in r.images], "tables": r.tables,
                   "metrics": r.metrics}
            for name, r in ctx.results.items()
        },
    }
    report = out / "report.html"
    atomic_write_bytes(report, render_report(ctx.results, timings).encode())
    summary["report"] = str(report)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def render_report(results: dict[str, StepReport], timings: dict[str, float]) -> str:
    """One HTML page with every step's text, figures, tables and inlined PNGs."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>guidekit quickstart</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}"
        "img{image-rendering:pixelated;max-width:100%;margin:4px;border:1px solid #ccc}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}</style></head><body><h1>guidekit quickstart</h1>",
    ]
    for name, r in results.items():
        parts.append(f"<h2>{html.escape(r.title)} <small>({timings.get(name, 0)} s)</small></h2>")
        if r.text:
            parts.append(f"<p>{html.escape(r.text)}</p>")
        if r.metrics:
            parts.append(_table([{k: v for k, v in r.metrics.items()}]))
        for title, rows in r.tables.items():
            parts.append(f"<h3>{html.escape(title)}</h3>{_table(rows)}")
        for img in r.images:
            data = base64.b64encode(Path(img).read_bytes()).decode()
            parts.append(
                f"<figure><img src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(Path(img).name)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
