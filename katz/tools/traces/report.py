"""``katz trace report``: latency, throughput and SLO attainment of replay logs, side by side.

Each log (from ``katz trace replay``) is one run — e.g. a baseline and Katz on
the same trace. Printed per run: requests, successes, failures, throughput
(successful requests per second between the first send and the last answer),
p50/p95/p99/mean latency of the successful requests, SLO attainment (the share
of *all* requests answered successfully within ``--slo`` seconds) and the
largest number of requests in flight. Saved as PNG in ``--out-dir``:
``latency_cdf.png``, ``latency_over_time.png`` and ``queue_length.png`` (requests
sent but not answered, over time), every run in each plot.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Run:
    label: str
    sent: np.ndarray  # s since the start of the replay; NaN: never sent
    done: np.ndarray
    ok: np.ndarray  # bool
    errors: list[str]

    @property
    def latency(self) -> np.ndarray:
        return (self.done - self.sent)[self.ok]


def _float(text: str) -> float:
    try:
        return float(text) if text not in ("", None) else float("nan")
    except ValueError:
        return float("nan")


def load_log(path: Path, label: str | None = None) -> Run:
    sent, done, ok, errors = [], [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"sent_s", "done_s", "ok"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a replay log (no {', '.join(sorted(missing))} column)")
        for row in reader:
            sent.append(_float(row["sent_s"]))
            done.append(_float(row["done_s"]))
            good = row["ok"].strip() in ("1", "true", "True")
            ok.append(good and np.isfinite(sent[-1]) and np.isfinite(done[-1]))
            if not ok[-1]:
                errors.append(row.get("error") or "")
    return Run(label or Path(path).stem, np.array(sent, float), np.array(done, float), np.array(ok, bool), errors)


def summarize(run: Run, slo: float) -> dict:
    lat = run.latency
    n = len(run.ok)
    sent = run.sent[np.isfinite(run.sent)]
    done = run.done[run.ok]
    span = float(done.max() - sent.min()) if len(done) and len(sent) else 0.0
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    return {
        "requests": n,
        "ok": int(run.ok.sum()),
        "failed": int(n - run.ok.sum()),
        "throughput_rps": (len(done) / span) if span > 0 else float("nan"),
        "p50_s": pct(50),
        "p95_s": pct(95),
        "p99_s": pct(99),
        "mean_s": float(lat.mean()) if len(lat) else float("nan"),
        "slo_attainment": float((lat <= slo).sum() / n) if n else float("nan"),
        "max_in_flight": int(queue_length(run)[1].max()) if n else 0,
    }


def queue_length(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Step function of requests in flight: times and counts (after each event)."""
    sent = run.sent[np.isfinite(run.sent)]
    done = run.done[np.isfinite(run.sent) & np.isfinite(run.done)]
    times = np.concatenate([sent, done])
    delta = np.concatenate([np.ones(len(sent)), -np.ones(len(done))])
    order = np.lexsort((delta, times))  # at equal times, finish before start
    return np.concatenate([[0.0], times[order]]), np.concatenate([[0], np.cumsum(delta[order])])


ROWS = (
    ("requests", "requests", "{:d}"),
    ("ok", "succeeded", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("throughput_rps", "throughput (req/s)", "{:.3f}"),
    ("p50_s", "p50 latency (s)", "{:.3f}"),
    ("p95_s", "p95 latency (s)", "{:.3f}"),
    ("p99_s", "p99 latency (s)", "{:.3f}"),
    ("mean_s", "mean latency (s)", "{:.3f}"),
    ("slo_attainment", "SLO attainment", "{:.1%}"),
    ("max_in_flight", "max in flight", "{:d}"),
)


def format_summary(runs: list[Run], slo: float) -> str:
    stats = [summarize(r, slo) for r in runs]
    width = max(12, *(len(r.label) for r in runs))
    lines = [f"{'':<22}" + "".join(f"{r.label:>{width + 2}}" for r in runs)]
    for key, name, fmt in ROWS:
        label = f"{name} (<= {slo:g}s)" if key == "slo_attainment" else name
        cells = []
        for s in stats:
            v = s[key]
            cells.append("-" if isinstance(v, float) and not np.isfinite(v) else fmt.format(v))
        lines.append(f"{label:<22}" + "".join(f"{c:>{width + 2}}" for c in cells))
    for run in runs:
        if run.errors:
            common: dict[str, int] = {}
            for e in run.errors:
                key = (e or "unknown")[:100]
                common[key] = common.get(key, 0) + 1
            top = sorted(common.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"{run.label}: failures: " + "; ".join(f"{c}x {e}" for e, c in top))
    return "\n".join(lines)


def plot(runs: list[Run], slo: float, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        lat = np.sort(run.latency)
        if len(lat):
            # the CDF over all requests: failures never reach 1.0
            ax.step(lat, np.arange(1, len(lat) + 1) / len(run.ok), where="post", label=run.label)
    ax.axvline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:g}s")
    ax.set(xlabel="latency (s)", ylabel="fraction of requests", title="Latency CDF", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out_dir / "latency_cdf.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        color = f"C{i}"
        ax.scatter(run.sent[run.ok], run.latency, s=10, color=color, label=run.label)
        bad = ~run.ok & np.isfinite(run.done)
        if bad.any():
            ax.scatter(run.done[bad], np.zeros(bad.sum()), marker="x", color=color, label=f"{run.label} failed")
    ax.axhline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:g}s")
    ax.set(xlabel="time since start (s)", ylabel="latency (s)", title="Latency over time")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out_dir / "latency_over_time.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        t, q = queue_length(run)
        ax.step(t, q, where="post", label=run.label)
    ax.set(xlabel="time since start (s)", ylabel="requests in flight", title="Queue length")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out_dir / "queue_length.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def cmd_report(args) -> int:
    labels = args.labels.split(",") if args.labels else []
    if labels and len(labels) != len(args.logs):
        print("katz trace report: give one --labels entry per log", file=sys.stderr)
        return 2
    try:
        runs = [load_log(p, labels[i] if labels else None) for i, p in enumerate(args.logs)]
    except (OSError, ValueError) as exc:
        print(f"katz trace report: {exc}", file=sys.stderr)
        return 2
    print(format_summary(runs, args.slo))
    if not args.no_plots:
        out = args.out_dir or args.logs[0].with_name(args.logs[0].stem + "-report")
        for path in plot(runs, args.slo, out):
            print(f"wrote {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="latency/throughput/SLO of replay logs side by side, with plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", type=Path, nargs="+", help="replay logs (one per run)")
    p.add_argument("--labels", help="comma-separated run names (default: the logs' names)")
    p.add_argument("--slo", type=float, default=10.0, help="latency SLO in seconds")
    p.add_argument("--out-dir", type=Path, help="where the PNG plots go (default: <first log>-report/)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_report)
