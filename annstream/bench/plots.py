"""PNG plots for `annstream tune` and the benchmarks: recall vs cost, freshness CDF, ingest.

matplotlib is the optional `plot` extra: it is imported only when a plot is asked for, with the
headless Agg backend, and its absence is reported with the install command.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from annstream.errors import ConfigError

__all__ = ["plot_freshness_cdf", "plot_ingest", "plot_recall_cost", "pyplot"]

logger = logging.getLogger(__name__)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; ConfigError saying how to install it if missing."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "plots need matplotlib: pip install 'annstream[plot]' (or drop --plot)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    pyplot().close(fig)
    logger.info("wrote %s", p)
    return p


def plot_recall_cost(
    sweep: Sequence[Mapping[str, Any]],
    target: float,
    path: str | Path,
    chosen: Mapping[str, Any] | None = None,
    k: int | None = None,
) -> Path:
    """Recall@k against search time per query, one line per nlist, nprobe on each point."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for nlist in sorted({int(r["nlist"]) for r in sweep}):
        rows = sorted((r for r in sweep if int(r["nlist"]) == nlist), key=lambda r: r["nprobe"])
        x = [float(r["ms_per_query"]) for r in rows]
        y = [float(r["recall"]) for r in rows]
        ax.plot(x, y, marker="o", label=f"nlist {nlist}")
        for r, xi, yi in zip(rows, x, y, strict=True):
            ax.annotate(str(r["nprobe"]), (xi, yi), textcoords="offset points", xytext=(3, -10))
    ax.axhline(target, color="grey", linestyle="--", label=f"target {target:g}")
    if chosen is not None:
        ax.plot(
            [float(chosen["ms_per_query"])],
            [float(chosen["recall"])],
            marker="*",
            markersize=16,
            color="red",
            linestyle="none",
            label=f"chosen nlist {chosen['nlist']} nprobe {chosen['nprobe']}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("search time per query (ms, log)")
    ax.set_ylabel(f"recall@{k}" if k else "recall")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_freshness_cdf(
    series: Mapping[str, npt.ArrayLike] | npt.ArrayLike, path: str | Path
) -> Path:
    """Empirical CDF of ad event -> stored delays (seconds), one curve per named series."""
    named = series if isinstance(series, Mapping) else {"freshness": series}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in named.items():
        v = np.sort(np.asarray(values, dtype="float64").reshape(-1))
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=str(name))
    for q in (0.5, 0.99):
        ax.axhline(q, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("ad event to stored (s, log)")
    ax.set_ylabel("fraction of ad events")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_ingest(
    times_s: npt.ArrayLike,
    events: npt.ArrayLike,
    path: str | Path,
    label: str = "events/s",
) -> Path:
    """Ingest rate over time from cumulative event counts sampled at `times_s`."""
    t = np.asarray(times_s, dtype="float64").reshape(-1)
    n = np.asarray(events, dtype="float64").reshape(-1)
    if t.shape != n.shape or t.size < 2:
        raise ValueError(
            f"times_s and events need the same length of at least 2, got {t.size} and {n.size}"
        )
    rate = np.diff(n) / np.maximum(np.diff(t), 1e-9)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(t[1:] - t[0], rate, label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)
