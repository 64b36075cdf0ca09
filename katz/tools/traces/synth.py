"""``katz trace synth``: a CSV trace from a model of production text-to-image traffic.

The model, each part a flag:

* arrivals: Poisson at ``--rate`` req/s, or bursty — Gamma-distributed gaps with
  the same mean and coefficient of variation ``--cv`` (> 1 is burstier than
  Poisson; ``--cv 1`` is Poisson again); ``--exact-rate`` scales the drawn
  arrival times so that the trace's own mean rate is ``--rate`` (its span is
  ``(requests - 1) / rate``): a short bursty trace otherwise offers a rate far
  from the one asked (12 requests with ``--cv 2.5`` spanned 9 s at 0.05 req/s);
* LoRAs: ``--loras-per-request`` (a distribution, e.g. ``0:0.2,1:0.5,2:0.2,3:0.1``)
  distinct adapters per request, drawn by Zipf popularity (exponent ``--zipf``)
  over ``--num-loras`` adapters named ``<prefix>000`` …, or over ``--lora-names``
  in popularity order; scales uniform in ``--lora-scale LOW:HIGH``;
* ControlNets: a ``--controlnet-share`` of the requests carries 1..``--max-controlnets``
  of ``--controlnets``;
* resolution and steps: weighted choices (``1024x1024:0.6,832x1216:0.2,...``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from katz.tools.traces.trace import TraceRow, write_trace


def parse_weighted(text: str, parse=str) -> tuple[list, np.ndarray]:
    """``"a:0.5,b:0.3,c"`` -> values and normalized weights (a missing weight is 1)."""
    values, weights = [], []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        value, sep, weight = item.rpartition(":")
        if not sep:
            value, weight = item, "1"
        try:
            values.append(parse(value))
            weights.append(float(weight))
        except ValueError:
            raise SystemExit(f"katz trace synth: bad weighted choice {item!r}") from None
    w = np.array(weights, dtype=float)
    if not values or (w < 0).any() or w.sum() <= 0:
        raise SystemExit(f"katz trace synth: bad weighted choices {text!r}")
    return values, w / w.sum()


def _resolution(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def zipf_weights(n: int, s: float) -> np.ndarray:
    ranks = np.arange(1, n + 1, dtype=float)
    w = ranks ** -s
    return w / w.sum()


def arrivals(rng: np.random.Generator, rate: float, count: int, kind: str, cv: float,
             exact: bool = False) -> np.ndarray:
    """``count`` arrival times (s) with mean gap ``1/rate``; first at 0. ``exact``: scaled so the
    last one is at ``(count - 1) / rate`` (the gaps keep their proportions, so the bursts stay)."""
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, count)
    else:  # gamma: shape k = 1/cv^2, scale = mean / k
        k = 1.0 / (cv * cv)
        gaps = rng.gamma(k, 1.0 / (rate * k), count)
    times = np.cumsum(gaps)
    times = times - times[0]
    if exact and count > 1 and times[-1] > 0:
        times = times * ((count - 1) / rate / times[-1])
    return times


def synthesize(args) -> list[TraceRow]:
    rng = np.random.default_rng(args.seed)
    if args.lora_names:
        lora_names = [n for n in args.lora_names.split(",") if n]
    else:
        lora_names = [f"{args.lora_prefix}{i:03d}" for i in range(args.num_loras)]
    popularity = zipf_weights(len(lora_names), args.zipf) if lora_names else None
    per_req, per_req_w = parse_weighted(args.loras_per_request, int)
    resolutions, res_w = parse_weighted(args.resolutions, _resolution)
    steps, steps_w = parse_weighted(args.steps, int)
    cn_names = [n for n in args.controlnets.split(",") if n]
    lo, _, hi = args.lora_scale.partition(":")
    scale_lo, scale_hi = float(lo), float(hi or lo)

    count = args.requests or max(1, int(round(args.duration * args.rate)))
    times = arrivals(rng, args.rate, count, args.arrivals, args.cv, getattr(args, "exact_rate", False))
    rows = []
    for i, t in enumerate(times):
        w, h = resolutions[rng.choice(len(resolutions), p=res_w)]
        n_lora = min(int(per_req[rng.choice(len(per_req), p=per_req_w)]), len(lora_names))
        loras = []
        if n_lora:
            picks = rng.choice(len(lora_names), size=n_lora, replace=False, p=popularity)
            loras = [(lora_names[j], float(rng.uniform(scale_lo, scale_hi))) for j in picks]
        controls = []
        if cn_names and rng.random() < args.controlnet_share:
            n_cn = int(rng.integers(1, min(args.max_controlnets, len(cn_names)) + 1))
            controls = [(cn_names[j], 1.0) for j in rng.choice(len(cn_names), size=n_cn, replace=False)]
        rows.append(TraceRow(id=i, arrival_s=float(t), width=w, height=h,
                             steps=int(steps[rng.choice(len(steps), p=steps_w)]),
                             controlnets=controls, loras=loras))
    return rows


def cmd_synth(args) -> int:
    if args.rate <= 0 or args.cv <= 0:
        print("katz trace synth: --rate and --cv must be > 0", file=sys.stderr)
        return 2
    rows = synthesize(args)
    write_trace(args.out, rows)
    span = rows[-1].arrival_s if rows else 0.0
    with_lora = sum(1 for r in rows if r.loras)
    with_cn = sum(1 for r in rows if r.controlnets)
    print(f"wrote {args.out}: {len(rows)} requests over {span:.1f}s ({args.arrivals}), "
          f"{with_lora} with LoRAs, {with_cn} with ControlNets")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="write a CSV trace from a model of production traffic",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="trace CSV to write")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    size.add_argument("--requests", type=int, help="number of requests instead of --duration")
    p.add_argument("--rate", type=float, default=1.0, help="mean arrival rate, req/s")
    p.add_argument("--arrivals", choices=("poisson", "gamma"), default="poisson")
    p.add_argument("--cv", type=float, default=3.0, help="gamma: coefficient of variation of the gaps")
    p.add_argument("--exact-rate", action="store_true",
                   help="scale the arrival times so the trace's mean rate is exactly --rate (short traces)")
    p.add_argument("--num-loras", type=int, default=100, help="adapters in the Zipf population")
    p.add_argument("--lora-prefix", default="lora-")
    p.add_argument("--lora-names", help="comma-separated adapter names, most popular first (instead of --num-loras)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    p.add_argument("--loras-per-request", default="0:0.2,1:0.5,2:0.2,3:0.1", help="distribution N:WEIGHT,...")
    p.add_argument("--lora-scale", default="0.5:1.0", help="LOW:HIGH, uniform")
    p.add_argument("--controlnets", default="canny", help="comma-separated ControlNet names")
    p.add_argument("--controlnet-share", type=float, default=0.4, help="fraction of requests with ControlNets")
    p.add_argument("--max-controlnets", type=int, default=1)
    p.add_argument("--resolutions", default="1024x1024:0.6,832x1216:0.2,1216x832:0.2", help="WxH:WEIGHT,...")
    p.add_argument("--steps", default="30:0.8,20:0.1,50:0.1", help="STEPS:WEIGHT,...")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
