"""Draw docs/benchmarks.png from the JSON isthmus-bench writes.

Usage: chart.py RESULTS_JSON OUTPUT_PNG
"""
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def med(values):
    return statistics.median(values) if values else float("nan")


def main(src, dst):
    r = json.load(open(src))
    paths = r["paths"]
    direct = next(p for p in paths if p["name"] == "direct")
    others = [p for p in paths if p["name"] != "direct"]
    fig, (lat, bulk, cpu) = plt.subplots(1, 3, figsize=(15, 4.8))

    # Added latency by percentile, each the median over rounds of the
    # same-round difference to the direct path.
    width = 0.8 / max(len(others), 1)
    names = ["p50", "p90", "p99"]
    for k, p in enumerate(others):
        added = [
            med([(a["latency_us"][i] - d["latency_us"][i]) / 1000 for a, d in zip(p["rounds"], direct["rounds"])])
            for i in range(3)
        ]
        xs = [i + (k - (len(others) - 1) / 2) * width for i in range(3)]
        lat.bar(xs, added, width, label=p["label"])
    lat.axhline(0.5, color="tab:orange", ls="--", lw=1, label="intra target (p99)")
    lat.axhline(1.0, color="tab:red", ls="--", lw=1, label="cross target (p99)")
    lat.set_xticks(range(3), names)
    lat.set_ylabel("added latency, ms")
    lat.set_title(f"Added latency at {r['args']['rate']} req/s, {r['args']['body']} B")
    lat.legend(fontsize=8)

    labels = [p["label"] for p in paths]
    mibs = [med([x["bulk_bytes_per_sec"] for x in p["rounds"]]) / 2**20 for p in paths]
    bulk.bar(labels, mibs, color="tab:green")
    bulk.set_ylabel("MiB/s")
    bulk.set_title("Bulk throughput, one connection")
    bulk.tick_params(axis="x", rotation=20)

    # CPU per 1000 requests, stacked by process on the path.
    bottoms = [0.0] * len(paths)
    for i, p in enumerate(paths):
        for j, proc in enumerate(p["procs"]):
            v = med([x["cpu"][j] / (x["achieved_rate"] / 1000) for x in p["rounds"]])
            cpu.bar(i, v, bottom=bottoms[i], edgecolor="white")
            if v > 0.01:
                cpu.text(i, bottoms[i] + v / 2, proc, ha="center", va="center", fontsize=7)
            bottoms[i] += v
    cpu.axhline(0.05, color="tab:red", ls="--", lw=1, label="sidecar target (each)")
    cpu.set_xticks(range(len(paths)), labels, rotation=20)
    cpu.set_ylabel("CPU seconds per 1000 requests")
    cpu.set_title("CPU by process")
    cpu.legend(fontsize=8)

    fig.suptitle(f"Isthmus data path, {r['started']}, {r['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
