"""``katz trace report``: latency, throughput and SLO attainment of replay logs, side by side.

Each log (from ``katz trace replay``) is one run — e.g. a baseline and Katz on
the same trace. Printed per run: requests, successes, failures, throughput
(successful requests per second over the run's span: from the first send to the
last answer, an error being an answer too), p50/p90/p95/p99/mean latency of the
successful requests, and for each SLO of ``--slo`` (one or several seconds,
``--slo 5,10``) the SLO attainment (the share of *all* requests answered
successfully within it) and the goodput (requests answered successfully within
it per second of the same span), and the largest number of requests in flight.
Saved as PNG in ``--out-dir``: ``latency_cdf.png``, ``latency_over_time.png``
and ``queue_length.png`` (requests sent but not answered, over time), every run
in each plot, the first SLO drawn in.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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


def span_s(run: Run) -> float:
    """The run's span: from the first request sent to the last one answered, successfully or not
    (a request that timed out was answered at its deadline), so failures at the end of a run do not
    shorten it. 0 when nothing was sent and answered."""
    sent = run.sent[np.isfinite(run.sent)]
    done = run.done[np.isfinite(run.sent) & np.isfinite(run.done)]
    return float(done.max() - sent.min()) if len(done) and len(sent) else 0.0


def summarize(run: Run, slo: float | Sequence[float]) -> dict:
    """The run's figures. ``slo``: one SLO or several (s). ``slo_attainment`` and ``goodput_rps``
    are the first SLO's; ``slos`` maps each (``f"{s:g}"``) to its ``attainment`` and ``goodput_rps``."""
    slos = [float(slo)] if np.isscalar(slo) else [float(s) for s in slo]
    lat = run.latency
    n = len(run.ok)
    span = span_s(run)
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    per_slo = {}
    for s in slos:
        within = int((lat <= s).sum())
        per_slo[f"{s:g}"] = {
            "attainment": within / n if n else float("nan"),
            "goodput_rps": within / span if span > 0 else float("nan"),
        }
    first = per_slo[f"{slos[0]:g}"]
    return {
        "requests": n,
        "ok": int(run.ok.sum()),
        "failed": int(n - run.ok.sum()),
        "span_s": span,
        "throughput_rps": (len(lat) / span) if span > 0 else float("nan"),
        "p50_s": pct(50),
        "p90_s": pct(90),
        "p95_s": pct(95),
        "p99_s": pct(99),
        "mean_s": float(lat.mean()) if len(lat) else float("nan"),
        "slo_attainment": first["attainment"],
        "goodput_rps": first["goodput_rps"],
        "slos": per_slo,
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
    ("p90_s", "p90 latency (s)", "{:.3f}"),
    ("p95_s", "p95 latency (s)", "{:.3f}"),
    ("p99_s", "p99 latency (s)", "{:.3f}"),
    ("mean_s", "mean latency (s)", "{:.3f}"),
    ("attainment", "SLO attainment", "{:.1%}"),  # one row per SLO
    ("goodput_rps", "goodput (req/s)", "{:.3f}"),  # one row per SLO
    ("max_in_flight", "max in flight", "{:d}"),
)


def format_summary(runs: list[Run], slo: float | Sequence[float]) -> str:
    stats = [summarize(r, slo) for r in runs]
    slos = list(stats[0]["slos"]) if stats else []
    width = max(12, *(len(r.label) for r in runs))
    lines = [f"{'':<26}" + "".join(f"{r.label:>{width + 2}}" for r in runs)]
    for key, name, fmt in ROWS:
        if key in ("attainment", "goodput_rps"):  # per SLO
            rows = [(f"{name} (<= {s}s)", [st["slos"][s][key] for st in stats]) for s in slos]
        else:
            rows = [(name, [st[key] for st in stats])]
        for label, values in rows:
            cells = ["-" if isinstance(v, float) and not np.isfinite(v) else fmt.format(v) for v in values]
            lines.append(f"{label:<26}" + "".join(f"{c:>{width + 2}}" for c in cells))
    for run in runs:
        if run.errors:
            common: dict[str, int] = {}
            for e in run.errors:
                key = (e or "unknown")[:100]
                common[key] = common.get(key, 0) + 1
            top = sorted(common.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"{run.label}: failures: " + "; ".join(f"{c}x {e}" for e, c in top))
    return "\n".join(lines)


def plot(runs: list[Run], slo: float, out_dir: Path, dpi: int = 110,
         size: tuple[float, float] = (7, 4.5)) -> list[Path]:
    """Save the three plots; ``dpi`` and ``size`` (inches) make them smaller where many are kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, ax, name: str) -> None:
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(out_dir / f"{name}.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=dpi)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=size)
    for run in runs:
        lat = np.sort(run.latency)
        if len(lat):
            # the CDF over all requests: failures never reach 1.0
            ax.step(lat, np.arange(1, len(lat) + 1) / len(run.ok), where="post", label=run.label)
    ax.axvline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:g}s")
    ax.set(xlabel="latency (s)", ylabel="fraction of requests", title="Latency CDF", ylim=(0, 1.02))
    save(fig, ax, "latency_cdf")

    fig, ax = plt.subplots(figsize=size)
    for i, run in enumerate(runs):
        color = f"C{i}"
        ax.scatter(run.sent[run.ok], run.latency, s=10, color=color, label=run.label)
        bad = ~run.ok & np.isfinite(run.done)
        if bad.any():
            ax.scatter(run.done[bad], np.zeros(bad.sum()), marker="x", color=color, label=f"{run.label} failed")
    ax.axhline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:g}s")
    ax.set(xlabel="time since start (s)", ylabel="latency (s)", title="Latency over time")
    save(fig, ax, "latency_over_time")

    fig, ax = plt.subplots(figsize=size)
    for run in runs:
        t, q = queue_length(run)
        ax.step(t, q, where="post", label=run.label)
    ax.set(xlabel="time since start (s)", ylabel="requests in flight", title="Queue length")
    save(fig, ax, "queue_length")
    return paths


def parse_slos(text: str) -> list[float]:
    """``"5,10"`` -> ``[5.0, 10.0]``: positive seconds."""
    try:
        slos = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, e.g. 10 or 5,10; got {text!r}") from None
    if not slos or any(not np.isfinite(s) or s <= 0 for s in slos):
        raise argparse.ArgumentTypeError(f"SLOs must be positive seconds; got {text!r}")
    return slos


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
        for path in plot(runs, args.slo[0], out):
            print(f"wrote {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="latency/throughput/SLO of replay logs side by side, with plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", type=Path, nargs="+", help="replay logs (one per run)")
    p.add_argument("--labels", help="comma-separated run names (default: the logs' names)")
    p.add_argument("--slo", type=parse_slos, default=[10.0],
                   help="latency SLO in seconds, or several comma-separated (5,10): attainment and goodput for each")
    p.add_argument("--out-dir", type=Path, help="where the PNG plots go (default: <first log>-report/)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_report)
