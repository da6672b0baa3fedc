"""PNG plots of the throughput bench's offered-load sweep (matplotlib, no display needed):
achieved against offered messages/s, and p50/p99 latency (post -> ack, post -> written) against
offered messages/s. `sealstream bench throughput` writes them to docs/img/ by default."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sealstream.bench.throughput_bench import SweepPoint

THROUGHPUT_PNG = "throughput_vs_offered.png"
LATENCY_PNG = "latency_vs_offered.png"


def write_plots(points: list[SweepPoint], sustained: float, out_dir: Path) -> list[Path]:
    """Write the two plots into `out_dir` (created if missing); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(points, key=lambda p: p.offered)
    offered = [p.offered for p in ordered]

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    top = max([*offered, *(p.achieved for p in ordered)]) * 1.1
    ax.plot([0, top], [0, top], ":", color="grey", label="achieved = offered")
    ax.plot(offered, [p.achieved for p in ordered], "o-", label="achieved (acknowledged)")
    ax.axvline(sustained, color="red", linestyle="--", label="sustained end to end")
    ax.set_xlabel("offered load, messages/s (single-message WebSocket clients)")
    ax.set_ylabel("messages/s")
    ax.set_title("Sealstream throughput against offered load")
    ax.legend()
    ax.grid(alpha=0.3)
    throughput = out_dir / THROUGHPUT_PNG
    fig.tight_layout()
    fig.savefig(throughput, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for values, style, label in (
        ([p.written_p50_ms for p in ordered], "o-", "post -> written p50"),
        ([p.written_p99_ms for p in ordered], "o--", "post -> written p99"),
        ([p.ack_p50_ms for p in ordered], "s-", "post -> ack p50"),
        ([p.ack_p99_ms for p in ordered], "s--", "post -> ack p99"),
    ):
        ax.plot(offered, values, style, label=label)
    ax.axhline(200, color="red", linestyle=":", label="target p99 written 200 ms")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())  # 200, not 2 x 10^2
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("offered load, messages/s (single-message WebSocket clients)")
    ax.set_ylabel("latency, ms (log scale)")
    ax.set_title("Sealstream latency against offered load")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")
    latency = out_dir / LATENCY_PNG
    fig.tight_layout()
    fig.savefig(latency, dpi=100)
    plt.close(fig)
    return [throughput, latency]
