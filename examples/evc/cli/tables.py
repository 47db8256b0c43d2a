"""Markdown tables of saved ``evc bench --json`` results, one row per file (the tables of docs/performance.md).

    python -m maskdecay_examples.evc.cli.tables A.json [B.json ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ...hostinfo import cpu_label

__all__ = ["markdown_table", "record_cpu_label", "main"]


_MD_STAGES = (
    ("forward", "networks only, one forward"),
    ("codec_networks", "codec networks, enc + dec (float synthesis)"),
    ("encode", "encode wall (incl. entropy coding)"),
    ("decode", "decode wall, float synthesis"),
    ("decode-exact", "decode wall, exact synthesis (CLI default)"),
)


def _md_cell(res: dict[str, Any], key: str) -> str:
    r = res["results"]
    if key not in r.get("fast", {}):
        return "–"
    fast = r["fast"][key]["median_s"] * 1000
    if key not in r.get("reference", {}):
        return f"{fast:,.0f}"
    return f"{r['reference'][key]['median_s'] * 1000:,.0f} → {fast:,.0f} ({res['speedup'][key]:.2f}×)"


def record_cpu_label(machine: dict[str, Any]) -> str:
    """The record's CPU name with its vector extensions (JSON files from before they were recorded: the name)."""
    return cpu_label(machine["cpu"], machine.get("cpu_features") or [])


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One markdown row per :func:`run_bench` result (the tables of docs/performance.md): ``ref → fast`` medians in
    ms with the speed-up, the fast path's FPS, the machine's state, and whether the two streams were identical."""
    head = (["variant", "size", "device", "threads", "runs", "load before → after", "sgemm GFLOP/s before / after"]
            + [label + ": ms" for _, label in _MD_STAGES]
            + ["fast FPS: networks only / encode / decode (exact)", "streams identical", "peak RSS, GB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        c, m, fast = res["config"], res["machine"], res["results"]["fast"]
        fps = " / ".join(f"{1 / fast[k]['median_s']:.2f}" if k in fast else "–"
                         for k in ("forward", "encode", "decode-exact"))
        probe = (f"{m['sgemm_gflops_before']:.0f} / {m['sgemm_gflops_after']:.0f}"
                 if m.get("sgemm_gflops_before") else "–")
        if "streams_identical" not in res:
            same = "–"
        elif res["streams_identical"]:
            same = "yes"
        else:
            same = f"no ({res['latents_differing']:,} of {res['latents_total']:,} latents)"
        device = m.get("gpu") or (record_cpu_label(m) if m.get("cpu") else c["device"])
        path = c["dtype"] + (" + CUDA graphs" if c["cuda_graphs"] else "") + (" + compile" if c["compile"] else "")
        row = ([c["arch"], c["padded"], f"{device} ({path})", str(c["threads"]), str(c["runs"]),
                f"{m['loadavg_before'][0]:.1f} → {m['loadavg_after'][0]:.1f}", probe]
               + [_md_cell(res, k) for k, _ in _MD_STAGES]
               + [fps, same, f"{m['peak_rss_mb'] / 1024:.1f}" if m.get("peak_rss_mb") else "–"])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the markdown table of the saved ``evc bench --json`` files given on the command line."""
    ap = argparse.ArgumentParser(prog="python -m maskdecay_examples.evc.cli.tables",
                                 description="markdown table of evc bench --json files, one row each")
    ap.add_argument("files", nargs="+", help="JSON files written by evc bench --json")
    args = ap.parse_args(argv)
    results = []
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as f:
                res = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f"{path}: {e}")
        if not isinstance(res, dict) or not {"config", "machine", "results"} <= res.keys():
            ap.error(f"{path}: not an evc bench JSON (no config/machine/results)")
        results.append(res)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
