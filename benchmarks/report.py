"""Turn pytest-benchmark JSON into a CSV, PNG plots and a markdown summary.

    python -m pytest benchmarks --benchmark-json=bench.json
    python -m benchmarks.report bench.json            # -> benchmarks/results/<device>/

Plots: per op, one figure per swept dimension (time and memory against size, one line per
provider, p25-p75 bars). Summary: per op and shape, the full forward+backward time and memory
of every provider, and its speed-up and memory ratio against the eager reference.
"""
import argparse
import csv
import json
import os
from collections import defaultdict
from typing import Dict, List

SHAPE_KEYS = ("N", "B", "M", "K", "P", "d")
COLUMNS = ["op", "provider", "mode", "dtype", "shape", *SHAPE_KEYS, "device", "median_ms", "q1_ms", "q3_ms",
           "rounds", "saved_bytes", "saved_bytes_beyond_inputs", "peak_cuda_bytes", "tflops", "gbps",
           "fraction_of_peak_flops", "fraction_of_peak_bandwidth", "max_error_output", "reference_error_output"]


def load_rows(path: str) -> List[Dict]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "provider" not in info or "mode" not in info:
            continue
        stats = bench["stats"]
        row = {key: info.get(key) for key in COLUMNS}
        row.update(median_ms=stats["median"] * 1e3, q1_ms=stats["q1"] * 1e3, q3_ms=stats["q3"] * 1e3,
                   rounds=stats["rounds"], device=info.get("device", data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "cpu")))
        rows.append(row)
    return rows


def write_csv(rows: List[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _shape(row) -> Dict[str, int]:
    return {key: row[key] for key in SHAPE_KEYS if row.get(key) is not None}


def _memory(row):
    return row["peak_cuda_bytes"] if row.get("peak_cuda_bytes") else row["saved_bytes"]


def base_shapes(rows: List[Dict]) -> Dict[str, Dict[str, int]]:
    """Per op, the shape measured in every mode: the centre of the one-dimension sweeps."""
    modes = defaultdict(set)
    for row in rows:
        modes[(row["op"], row["shape"])].add(row["mode"])
    bases = {}
    for (op, shape), seen in modes.items():
        if {"forward", "backward", "full"} <= seen:
            bases[op] = next(_shape(r) for r in rows if r["op"] == op and r["shape"] == shape)
    return bases


def sweeps(rows: List[Dict], op: str, base: Dict[str, int], dtype: str):
    """{dimension: rows of mode full, dtype, that differ from the base in that dimension only (base included)}."""
    out = {}
    full = [r for r in rows if r["op"] == op and r["mode"] == "full" and r["dtype"] == dtype]
    for key in base:
        points = [r for r in full if all(r[k] == v for k, v in base.items() if k != key)]
        if len({r[key] for r in points}) > 1:
            out[key] = points
    return out


def plot(rows: List[Dict], out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for op, base in base_shapes(rows).items():
        dtype = next(r["dtype"] for r in rows if r["op"] == op and r["shape"] == "-".join(f"{k}{v}" for k, v in base.items()))
        for key, points in sweeps(rows, op, base, dtype).items():
            fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
            for provider in sorted({r["provider"] for r in points}):
                line = sorted((r for r in points if r["provider"] == provider), key=lambda r: r[key])
                xs = [r[key] for r in line]
                medians = [r["median_ms"] for r in line]
                errors = [[m - r["q1_ms"] for m, r in zip(medians, line)], [r["q3_ms"] - m for m, r in zip(medians, line)]]
                ax_time.errorbar(xs, medians, yerr=errors, marker="o", capsize=3, label=provider)
                ax_mem.plot(xs, [_memory(r) / 2**20 for r in line], marker="o", label=provider)
            others = ", ".join(f"{k}={v}" for k, v in base.items() if k != key)
            ax_time.set(xlabel=key, ylabel="forward+backward time (ms)", xscale="log", yscale="log",
                        title=f"{op} ({dtype}; {others})")
            memory_label = "peak CUDA memory (MiB)" if any(r.get("peak_cuda_bytes") for r in points) else "saved for backward (MiB)"
            ax_mem.set(xlabel=key, ylabel=memory_label, xscale="log", yscale="log", title=points[0]["device"])
            ax_time.legend()
            ax_time.grid(True, which="both", alpha=0.3)
            ax_mem.grid(True, which="both", alpha=0.3)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{op}_{key}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def summary(rows: List[Dict]) -> str:
    """Markdown: full forward+backward per op, shape and dtype; ratios against the eager reference."""
    lines = ["| op | dtype | shape | provider | time (ms) | speed-up vs reference | memory (MiB) | memory vs reference | TFLOP/s | of peak |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    full = [r for r in rows if r["mode"] == "full"]
    groups = defaultdict(list)
    for row in full:
        groups[(row["op"], row["dtype"], row["shape"])].append(row)
    for (op, dtype, shape), group in sorted(groups.items()):
        reference = next((r for r in group if r["provider"] == "reference"), None)
        for row in sorted(group, key=lambda r: r["median_ms"]):
            speed = f"{reference['median_ms'] / row['median_ms']:.2f}x" if reference else "-"
            memory = f"{_memory(reference) / _memory(row):.1f}x less" if reference and _memory(row) else "-"
            peak = f"{row['fraction_of_peak_flops']:.1%}" if row.get("fraction_of_peak_flops") else "-"
            lines.append(f"| {op} | {dtype} | {shape} | {row['provider']} | {row['median_ms']:.3f} | {speed} | "
                         f"{_memory(row) / 2**20:.2f} | {memory} | {row['tflops']:.3f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (pytest benchmarks --benchmark-json=PATH)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    rows = load_rows(args.json)
    if not rows:
        raise SystemExit(f"{args.json} holds no op benchmark rows")
    device = rows[0]["device"]
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    out_dir = args.out or os.path.join(os.path.dirname(__file__), "results", slug)
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(f"# Benchmark summary: {device}\n\nForward+backward (mode full), median of the rounds.\n\n")
        f.write(summary(rows))
    plots = plot(rows, out_dir)
    print(f"{len(rows)} rows -> {out_dir}: results.csv, summary.md, {len(plots)} plots")


if __name__ == "__main__":
    main()
