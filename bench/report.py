"""The bench's results: one row per workload with its ratios, the issue's goals checked, markdown tables."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.stats import ratio


def workload_row(name: str, model: str, loads: dict[int, dict[str, Any]], raw: Sequence[dict[str, Any]],
                 flops_per_item: float | None = None, gemm_gflops: float | None = None) -> dict[str, Any]:
    """A workload's figures: the load runs by concurrency, raw ORT by batch, and what follows from them."""
    levels = sorted(loads)
    low, high = (loads[levels[0]], loads[levels[-1]]) if levels else ({}, {})
    best_raw = max(raw, key=lambda r: r["items_per_s"]) if raw else None
    row: dict[str, Any] = {
        "workload": name, "model": model,
        "unit": high.get("unit", ""), "units_per_item": high.get("mean_units"),
        "by_concurrency": {str(c): loads[c] for c in levels},
        "raw_ort": list(raw),
        "raw_ort_best": best_raw,
        "batching_gain": ratio(high.get("items_per_s"), low.get("items_per_s")),  # top concurrency / lowest
        "server_over_raw_best": ratio(high.get("items_per_s"), best_raw["items_per_s"] if best_raw else None),
    }
    # the same ratios per CPU-second: what a shared, noisy machine cannot skew
    cpu_raw = max((r["items_per_cpu_s"] for r in raw if r.get("items_per_cpu_s")), default=None)
    row["cpu_batching_gain"] = ratio(high.get("items_per_cpu_s"), low.get("items_per_cpu_s"))
    row["cpu_server_over_raw_best"] = ratio(high.get("items_per_cpu_s"), cpu_raw)
    if flops_per_item and high.get("items_per_s"):
        row["gflops_per_item"] = round(flops_per_item / 1e9, 3)
        row["model_gflops_per_s"] = round(flops_per_item * high["items_per_s"] / 1e9, 2)
    if flops_per_item and high.get("items_per_cpu_s"):
        # per CPU-second on both sides: the matmul peak and the server need not have run under the same load
        per_cpu = flops_per_item * high["items_per_cpu_s"] / 1e9
        row["model_gflops_per_cpu_s"] = round(per_cpu, 2)
        row["fraction_of_gemm_peak"] = round(per_cpu / gemm_gflops, 3) if gemm_gflops else None
    return row


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against this run's figures (met: None when the run lacks the figure)."""
    out = []

    def check(goal: str, value: float | None, target: float, above: bool = True) -> None:
        met = None if value is None or (isinstance(value, float) and math.isnan(value)) else (
            value >= target if above else value <= target)
        out.append({"goal": goal, "value": value, "target": target, "met": met})

    for row in results.get("workloads", []):
        check(f"{row['workload']}: top concurrency >= 0.95 x lowest", row.get("batching_gain"), 0.95)
        check(f"{row['workload']}: server >= 0.90 x raw ORT at its best batch", row.get("server_over_raw_best"), 0.90)
        if row["workload"] == "audio-mixed":
            top = row["by_concurrency"][max(row["by_concurrency"], key=int)]
            server = top.get("server", {})
            check("audio-mixed: padded fraction <= 0.10 at top concurrency",
                  server.get("padded_fraction", server.get("padded_fraction_per_batch")), 0.10, above=False)
    for e in results.get("engines", []):
        where = f"{e['modality']} {e['batch']}x{e['length']}, {e['threads']} thread(s)"
        check(f"ORT fp32 >= 1.3 x torch eager ({where})", e.get("ort_over_torch"), 1.3)
        if "int8_over_fp32" in e:
            check(f"int8 >= 3 x fp32 ({where})", e.get("int8_over_fp32"), 3.0)
            check(f"int8 pooled cosine >= 0.99 ({where})", e.get("int8_cosine"), 0.99)
    return out


def engine_row(modality: str, figures: dict[str, Any]) -> dict[str, Any]:
    """torch_vs_ort's figures with the speed ratios."""
    row = {"modality": modality, **figures, "ort_over_torch": ratio(figures["torch_s"], figures.get("fp32_s"))}
    if "int8_s" in figures:
        row["int8_over_fp32"] = ratio(figures["fp32_s"], figures["int8_s"])
    return row


# ---- text -----------------------------------------------------------------------------------------------------


def markdown_number(v: Any) -> str:
    """3 significant digits, no exponents: 1234.5 -> '1234', 12.34 -> '12.3', 0.01234 -> '0.0123'; None -> '-'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def met_label(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(markdown_number(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _latency(load: dict[str, Any] | None) -> str:
    if not load:
        return "-"
    return f"{load['p50_ms']:.0f} / {load['p99_ms']:.0f}"


def render(results: dict[str, Any]) -> str:
    """All tables of a run, markdown."""
    parts = []
    levels = results.get("concurrency", [])
    headers = ["workload", *[f"c{c} items/s" for c in levels]]
    if len(levels) > 1:
        headers.append(f"c{levels[-1]}/c{levels[0]}")
    headers += ["raw ORT best (batch)", "server/raw", "per CPU-s: gain, server/raw",
                *[f"p50/p99 ms c{c}" for c in levels],
                "mean batch", "padded", "units/s", "GFLOP per CPU-s (of matmul's)"]
    rows = []
    for w in results.get("workloads", []):
        by = w["by_concurrency"]
        top = by.get(str(levels[-1]), {}) if levels else {}
        server = top.get("server", {})
        best = w.get("raw_ort_best")
        row: list[Any] = [w["workload"], *[by.get(str(c), {}).get("items_per_s") for c in levels]]
        if len(levels) > 1:
            row.append(w.get("batching_gain"))
        row += [f"{markdown_number(best['items_per_s'])} (b{best['batch']})" if best else "-",
                w.get("server_over_raw_best"),
                f"{markdown_number(w.get('cpu_batching_gain'))}, {markdown_number(w.get('cpu_server_over_raw_best'))}",
                *[_latency(by.get(str(c))) for c in levels], server.get("mean_batch"),
                server.get("padded_fraction", server.get("padded_fraction_per_batch")),
                f"{markdown_number(top.get('units_per_s'))} {w.get('unit', '')}" if top else "-",
                f"{w['model_gflops_per_cpu_s']:.1f} ({w['fraction_of_gemm_peak']:.0%})"
                if w.get("fraction_of_gemm_peak") is not None else "-"]
        rows.append(row)
    if rows:
        parts.append(markdown_table(headers, rows))
    if results.get("servers"):
        parts.append(markdown_table(
            ["server (models)", "cold start s", "RSS MiB after load", "peak RSS MiB"],
            [[s["models"], s.get("cold_start_s"), s.get("rss_mb"), s.get("peak_rss_mb")] for s in results["servers"]]))
    if results.get("engines"):
        parts.append(markdown_table(
            ["engine batch", "threads", "torch eager s", "ORT fp32 s", "ORT/torch", "ORT int8 s", "int8/fp32",
             "int8 cosine"],
            [[f"{e['modality']} {e['batch']}x{e['length']}", e["threads"], e["torch_s"], e.get("fp32_s"),
              e.get("ort_over_torch"), e.get("int8_s"), e.get("int8_over_fp32"), e.get("int8_cosine")]
             for e in results["engines"]]))
    if results.get("gemm"):
        g = results["gemm"]
        parts.append(f"GEMM peak (numpy float32 {g['n']}x{g['n']}, {g['threads']} thread(s)): "
                     f"{g['gflops']:.1f} GFLOP/s, {g.get('gflops_per_cpu_s', float('nan')):.1f} GFLOP per CPU-second")
    if results.get("goals"):
        parts.append(markdown_table(["goal", "value", "target", "met"],
                                    [[g["goal"], g["value"], g["target"], met_label(g["met"])]
                                     for g in results["goals"]]))
    return "\n\n".join(parts) + "\n"


# ---- the docs' figures ----------------------------------------------------------------------------------------

BENCHMARKS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def doc_sections(text: str) -> list[str]:
    """The names of a page's bench-written sections, in order (`<!-- bench:NAME -->` ... `<!-- /bench:NAME -->`;
    NAME is the bench module that writes it, optionally `MODULE:PART`)."""
    return re.findall(r"^<!-- bench:([\w:-]+) -->$", text, flags=re.MULTILINE)


def replace_doc_section(text: str, name: str, body: str) -> str:
    """The page with one marked section's contents replaced by body; ValueError (one line) if its markers are not
    there once each, in order."""
    start, end = _markers(name)
    if text.count(start) != 1 or text.count(end) != 1 or text.index(end) < text.index(start):
        raise ValueError(f"no single '{start}' ... '{end}' section")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body.strip(chr(10))}\n{end}{tail}"


def check_doc_sections(names: Sequence[str], page: Path = BENCHMARKS_PAGE) -> None:
    """Before a long run with --write-docs: exit with one line if the page lacks a section the run will write."""
    text = page.read_text()
    for name in names:
        try:
            replace_doc_section(text, name, "")
        except ValueError as e:
            raise SystemExit(f"--write-docs: {page.name}: {e}") from None


def write_doc_sections(sections: dict[str, str], page: Path = BENCHMARKS_PAGE) -> None:
    """Replace each named section of the page with its markdown (the figures of the run just made)."""
    check_doc_sections(list(sections), page)
    text = page.read_text()
    for name, body in sections.items():
        text = replace_doc_section(text, name, body)
    page.write_text(text)
    print(f"wrote {', '.join(sections)} into {page}", file=sys.stderr)


def bulk_sections(results: dict[str, Any]) -> dict[str, str]:
    """bench.bulk's tables for docs/benchmarks.md: `bulk` (speed and Ray, when both ran) and `bulk:memory`."""
    sections = {}
    if "raw_ort" in results and "ray" in results:
        raw, ratios, ray = results["raw_ort"], results["ratios"], results["ray"]
        best = raw["best"]
        others = ", ".join(f"{r['batch']}: {r['items_per_cpu_s']:.0f}" for r in raw["batches"]
                           if r["batch"] != best["batch"])
        local, loop, via = results["local"], results["server_loop"], results["bulk_via_server"]
        counts = " / ".join(f"{n} replica{'s' if n != '1' else ''}" for n in ray)
        rows = [
            (f"raw ORT, best batch ({best['batch']}; {others})", f"{best['items_per_cpu_s']:.0f}",
             f"{best['items_per_s']:.0f}"),
            ("`d2v-bulk --engine local` (the whole job: read, tokenize, batch, run, pool, write Parquet)",
             f"{local['items_per_cpu_s']:.0f}", f"{local['job_items_per_s']:.0f}"),
            ("a loop of `Client.embed_stream` (1000 texts a call, 64 a message, vectors to Parquet) + `d2v-serve`",
             f"{loop['items_per_cpu_s']:.0f}", f"{loop['items_per_s']:.0f}"),
            ("`d2v-bulk --server` on the same server", f"{via['items_per_cpu_s']:.0f}",
             f"{via['job_items_per_s']:.0f}"),
            ("**local / raw ORT** (target >= 0.95)", f"**{ratios['local_vs_raw_ort']:.2f}x**", ""),
            ("**local / embed_stream loop** (target >= 1.2)", f"**{ratios['local_vs_server_loop']:.2f}x**", ""),
            (f"Ray, {counts} (`--threads 1` each), job items/s", "",
             " / ".join(f"{r['job_items_per_s']:.0f}" for r in ray.values())),
        ]
        if "ray_2_vs_1" in ratios:
            rows.append(("**Ray 2 replicas / 1** (target >= 1.6)", "", f"**{ratios['ray_2_vs_1']:.2f}x**"))
        sections["bulk"] = markdown_table(["contender", "items / CPU-s", "items/s (wall)"], rows)
    if results.get("memory"):
        sections["bulk:memory"] = markdown_table(
            ["texts", "peak RSS MiB", "wall s"],
            [(f"{int(n):,}", f"{m['peak_rss_mb']:.1f}", f"{m['job_wall_s']:.1f}")
             for n, m in results["memory"].items()])
    return sections

