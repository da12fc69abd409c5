"""The bench's report: a summary per workload and system, the terminal
table with ratios of C against A0 (llama-server's defaults), A (the same
flags as C's llama-server) and B, C's slot use and prediction error from
its query log, and an SVG chart written by hand. Everything here is
computed from the run's records; nothing is estimated."""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Any

NAMES = {"A0": "A0 llama defaults", "A": "A llama-server", "B": "B ContextPilot lib", "C": "C contextpilotd"}
COLORS = {"A0": "#d5dae0", "A": "#9aa5b1", "B": "#f0a35e", "C": "#2f7ed8"}
NONE = "–"  # no figure: e.g. a daemon that does not log slot decisions yet


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    pos = (len(values) - 1) * p
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def normalize(answer: str) -> str:
    text = unicodedata.normalize("NFKC", answer).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def query_log_figures(log: list[dict[str, Any]] | None) -> dict[str, Any]:
    """From C's query log: how many distinct slots its requests went to,
    and how far the daemon's predicted prompt time for its slot choice was
    from llama-server's measured one (median of |predicted - measured| /
    measured, over records with both and a measured time of at least 1 ms,
    below which the ratio is noise). None where the log has no such figure
    (no log, or a daemon that does not write `slot_decision`)."""
    if log is None:
        return {"slots_used": None, "predicted_ms_error_p50": None, "predicted_records": None}
    slots = {r["slot_id"] for r in log if r.get("slot_id") is not None}
    errors = [abs(r["predicted_ms"] - r["prompt_ms"]) / r["prompt_ms"] for r in log
              if isinstance(r.get("predicted_ms"), (int, float)) and isinstance(r.get("prompt_ms"), (int, float))
              and r["prompt_ms"] >= 1]
    return {"slots_used": len(slots) if slots else None,
            "predicted_ms_error_p50": percentile(errors, 0.5),
            "predicted_records": len(errors)}


def summarize(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (workload, system, concurrency)."""
    runs = doc["runs"]
    baseline = {(r["workload"], r["concurrency"]): r for r in runs if r["system"] == "A"}
    out = []
    for r in runs:
        recs = [x for x in r["requests"] if x["ok"]]
        cached = sum(x["cache_n"] for x in recs)
        computed = sum(x["prompt_n"] for x in recs)
        entry = {
            "workload": r["workload"], "system": r["system"], "concurrency": r["concurrency"],
            "requests": len(r["requests"]), "failed": len(r["requests"]) - len(recs),
            "cache_share": cached / (cached + computed) if cached + computed else None,
            "prompt_tokens": cached + computed,
            "prompt_tokens_computed": computed,
            "prompt_ms_sum": sum(x["prompt_ms"] for x in recs),
            "ttft_ms_p50": percentile([x["ttft_ms"] for x in recs], 0.5),
            "ttft_ms_p95": percentile([x["ttft_ms"] for x in recs], 0.95),
            "latency_ms_p50": percentile([x["latency_ms"] for x in recs], 0.5),
            "latency_ms_p95": percentile([x["latency_ms"] for x in recs], 0.95),
            "prepare_ms_p50": percentile([x["prepare_ms"] for x in recs], 0.5),
            "wall_s": r["wall_s"],
            "requests_per_s": len(recs) / r["wall_s"] if r["wall_s"] else None,
            "same_answer_as_A": None,
            **query_log_figures(r.get("query_log")),
        }
        base = baseline.get((r["workload"], r["concurrency"]))
        if base is not None:
            pairs = list(zip(base["requests"], r["requests"]))
            same = sum(1 for a, b in pairs if a["ok"] and b["ok"] and normalize(a["answer"]) == normalize(b["answer"]))
            entry["same_answer_as_A"] = same / len(pairs) if pairs else None
        out.append(entry)
    return out


def _get(summary, workload, system, concurrency):
    for e in summary:
        if (e["workload"], e["system"], e["concurrency"]) == (workload, system, concurrency):
            return e
    return None


def _fmt(v, spec, suffix=""):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _ratio(num, den):
    return None if num is None or den in (None, 0) else num / den


# The ratio rows: (first, other, label). C against llama-server at its own
# defaults (what a user who runs it by hand has) and against the same flags
# as C's child (what the daemon's requests alone buy), then the library.
PAIRS = [("C", "A0", "C vs A0 defaults"), ("C", "A", "C vs A same flags"), ("C", "B", "C vs B"), ("B", "A", "B vs A")]


def table(doc: dict[str, Any]) -> str:
    summary = doc["summary"]
    levels = doc["concurrency_levels"]
    hi = levels[-1]
    workloads = list(dict.fromkeys(e["workload"] for e in summary))
    systems = list(doc["systems"])
    ran = [s for s in systems if s not in doc["unavailable"]]
    lines = []
    hw = doc["hardware"]
    lines.append(f"model {doc['model']} | {doc['slots']} slot(s) | {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB | "
                 f"load avg at start {', '.join(f'{x:.1f}' for x in hw['load_avg_at_start'] or [])}")
    ls = doc["llama_server"]
    if ls.get("argv"):
        lines.append(f"llama-server flags ({', '.join(s for s in ran if s != 'A0')}): {' '.join(ls['argv'][1:])}")
    if ls.get("argv_A0"):
        lines.append(f"llama-server flags (A0, the rest at its defaults): {' '.join(ls['argv_A0'][1:])}")
    lines.append("")
    two = hi != 1
    head = (f"{'workload':<7} {'system':<19} {'reqs':>4} {'cached':>7} {'computed':>9} {'TTFT p50':>9} {'p95':>7} "
            f"{'lat p50':>8} {'p95':>7} {'req/s c1':>9} " + (f"{f'req/s c{hi}':>9} " if two else "") + f"{'=A':>5}")
    lines.append(head)
    lines.append("-" * len(head))
    for w in workloads:
        for s in systems:
            if s in doc["unavailable"]:
                lines.append(f"{w:<7} {NAMES[s]:<19} unavailable: {doc['unavailable'][s][:80]}")
                continue
            e1 = _get(summary, w, s, 1)
            eh = _get(summary, w, s, hi)
            if e1 is None:
                continue
            fail = f"  ({e1['failed']} failed)" if e1["failed"] else ""
            lines.append(
                f"{w:<7} {NAMES[s]:<19} {e1['requests']:>4} {_fmt(e1['cache_share'] and e1['cache_share'] * 100, '6.1f', '%'):>7} "
                f"{e1['prompt_tokens_computed']:>9} {_fmt(e1['ttft_ms_p50'], '7.0f', 'ms'):>9} {_fmt(e1['ttft_ms_p95'], '5.0f', 'ms'):>7} "
                f"{_fmt(e1['latency_ms_p50'], '6.0f', 'ms'):>8} {_fmt(e1['latency_ms_p95'], '5.0f', 'ms'):>7} "
                f"{_fmt(e1['requests_per_s'], '9.2f'):>9} " + (f"{_fmt(eh and eh['requests_per_s'], '9.2f'):>9} " if two else "") +
                f"{_fmt(e1['same_answer_as_A'] and e1['same_answer_as_A'] * 100, '4.0f', '%'):>5}{fail}"
            )
        lines.append("")
    # Ratios: how many times fewer prompt tokens computed, how many times faster.
    pairs = [(x, y, label) for x, y, label in PAIRS if x in ran and y in ran]
    if pairs:
        lines.append("ratios (>1 means the first is better): prompt tokens computed, TTFT and latency at c1 (the other's / this one's), "
                     "req/s (this one's / the other's)")
        head = (f"{'workload':<7} {'':<17} {'computed':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'lat p50':>8} {'req/s c1':>9}"
                + (f" {f'req/s c{hi}':>9}" if two else ""))
        lines.append(head)
        lines.append("-" * len(head))
        for w in workloads:
            for x, y, label in pairs:
                a1, b1 = _get(summary, w, x, 1), _get(summary, w, y, 1)
                ah, bh = _get(summary, w, x, hi), _get(summary, w, y, hi)
                if not a1 or not b1:
                    continue
                cells = [
                    _ratio(b1["prompt_tokens_computed"], a1["prompt_tokens_computed"]),
                    _ratio(b1["ttft_ms_p50"], a1["ttft_ms_p50"]),
                    _ratio(b1["ttft_ms_p95"], a1["ttft_ms_p95"]),
                    _ratio(b1["latency_ms_p50"], a1["latency_ms_p50"]),
                    _ratio(a1["requests_per_s"], b1["requests_per_s"]),
                    _ratio(ah and ah["requests_per_s"], bh and bh["requests_per_s"]),
                ][: 6 if two else 5]
                lines.append(f"{w:<7} {label:<17} " + " ".join(
                    f"{_fmt(c, '.2f', 'x'):>{width}}" for c, width in zip(cells, (9, 9, 9, 8, 9, 9))))
        lines.append("")
    if "C" in ran:
        lines.append("C's query log: slots used = distinct slot_id; predicted-ms error p50 = median |predicted_ms - prompt_ms| / prompt_ms "
                     "(slot_decision.predicted_ms against cache_reuse.prompt_eval_ms)")
        head = f"{'workload':<7} " + " ".join(f"{f'slots used c{c}':>14} {f'predicted-ms error p50 c{c}':>27}" for c in levels)
        lines.append(head)
        lines.append("-" * len(head))
        for w in workloads:
            cells = []
            for c in levels:
                e = _get(summary, w, "C", c) or {}
                used = NONE if e.get("slots_used") is None else str(e["slots_used"])
                err = e.get("predicted_ms_error_p50")
                # The share, and over how many records it is the median.
                err = NONE if err is None else f"{err * 100:.0f}% (n={e['predicted_records']})"
                cells.append(f"{used:>14} {err:>27}")
            lines.append(f"{w:<7} " + " ".join(cells))
        lines.append("")
    lines.append("cached = share of prompt tokens llama.cpp served from its KV cache (sum cache_n / sum of cache_n + prompt_n);")
    lines.append("computed = prompt tokens it had to compute (sum prompt_n); TTFT = time to the first streamed token;")
    lines.append("latency = whole request; TTFT, latency, cached and =A at concurrency 1; =A = same normalised answer as A at temperature 0")
    if "A0" in ran:
        lines.append("A0 = llama-server with only the model, slots, context, -ngl, -t and --metrics (its host-RAM prompt cache on), A's requests")
    if doc.get("interleaved_at_concurrency_1"):
        lines.append("at concurrency 1 the systems ran side by side on their own fresh llama-servers, each request to every system in turn;")
        lines.append("req/s c1 = requests / the sum of their latencies")
    if not two:
        lines.append(f"llama-server has {doc['slots']} slot(s) here and contextpilotd runs one request at a time: one run per system and workload")
    return "\n".join(lines)


# --- the chart ------------------------------------------------------------------


def svg(doc: dict[str, Any]) -> str:
    """Four panels (cache share, prompt tokens computed, TTFT p50, req/s at
    the higher concurrency), each with one group of bars per workload and one
    bar per system."""
    summary = doc["summary"]
    levels = doc["concurrency_levels"]
    hi = levels[-1]
    workloads = list(dict.fromkeys(e["workload"] for e in summary))
    systems = [s for s in doc["systems"] if s not in doc["unavailable"]]
    panels = [
        ("Prompt tokens served from cache", lambda e: e and e["cache_share"] and e["cache_share"] * 100, "{:.0f}%", 1, "higher is better"),
        ("Prompt tokens computed", lambda e: e and e["prompt_tokens_computed"], "{:.0f}", 1, "lower is better"),
        ("Time to first token, p50 (ms)", lambda e: e and e["ttft_ms_p50"], "{:.0f}", 1, "lower is better"),
        (f"Requests per second at concurrency {hi}", lambda e: e and e["requests_per_s"], "{:.2f}", hi, "higher is better"),
    ]
    pw, ph, margin = 430, 250, 30
    width = margin + 2 * (pw + margin)
    height = 90 + 2 * (ph + 60) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{margin}" y="28" font-size="18" font-weight="bold">What contextpilotd buys: {html.escape(doc["model"])}</text>',
           f'<text x="{margin}" y="48" fill="#555">{html.escape(doc["hardware"]["cpu"])}, {doc["hardware"]["cores"]} cores, '
           f'{doc["slots"]} slot(s); {html.escape(doc["started"])}</text>']
    lx = margin
    for s in systems:
        out.append(f'<rect x="{lx}" y="60" width="12" height="12" fill="{COLORS[s]}"/>'
                   f'<text x="{lx + 18}" y="71">{html.escape(NAMES[s])}</text>')
        lx += 165
    for i, (title, get, fmt, level, hint) in enumerate(panels):
        x0 = margin + (i % 2) * (pw + margin)
        y0 = 90 + (i // 2) * (ph + 60)
        out.append(f'<text x="{x0}" y="{y0 + 14}" font-size="14" font-weight="bold">{html.escape(title)}</text>'
                   f'<text x="{x0 + pw}" y="{y0 + 14}" text-anchor="end" fill="#777">{hint}</text>')
        values = {(w, s): get(_get(summary, w, s, level)) for w in workloads for s in systems}
        top = max([v for v in values.values() if v] or [1])
        base_y, plot_h = y0 + ph, ph - 50
        out.append(f'<line x1="{x0}" y1="{base_y}" x2="{x0 + pw}" y2="{base_y}" stroke="#333"/>')
        group_w = pw / max(1, len(workloads))
        bar_w = min(40, (group_w - 20) / max(1, len(systems)))
        for g, w in enumerate(workloads):
            gx = x0 + g * group_w + (group_w - bar_w * len(systems)) / 2
            for j, s in enumerate(systems):
                v = values[(w, s)]
                if v is None:
                    continue
                h = plot_h * v / top
                bx = gx + j * bar_w
                out.append(f'<rect x="{bx + 2:.1f}" y="{base_y - h:.1f}" width="{bar_w - 4:.1f}" height="{h:.1f}" fill="{COLORS[s]}">'
                           f'<title>{html.escape(NAMES[s])}, {w}: {fmt.format(v)}</title></rect>'
                           f'<text x="{bx + bar_w / 2:.1f}" y="{base_y - h - 4:.1f}" text-anchor="middle" font-size="10">{fmt.format(v)}</text>')
            out.append(f'<text x="{x0 + g * group_w + group_w / 2:.1f}" y="{base_y + 16}" text-anchor="middle">{w}</text>')
    out.append(f'<text x="{margin}" y="{height - 32}" fill="#777">Same llama-server binary, model and requests for every system; '
               f'{"A0 at llama-server&#8217;s defaults, the others " if "A0" in systems else ""}with the flags contextpilotd plans.</text>')
    out.append(f'<text x="{margin}" y="{height - 14}" fill="#777">Every figure is read from llama-server timings or the bench client\'s '
               f'clock in this run ({html.escape(doc["command"])}).</text>')
    out.append("</svg>")
    return "\n".join(out)
