"""``katz trace replay``: send a trace's requests open-loop and log every one.

Each request is sent at its ``arrival_s`` (divided by ``--speed``) whether or
not earlier ones have finished — open loop, as production traffic arrives —
with tritonclient's asyncio gRPC client. Every request gets one line in the
log CSV (:data:`LOG_COLUMNS`), written as it finishes, and the run ends with
the report of :mod:`katz.tools.traces.report`.

Faults end in the log, never in a hang: each request has a deadline
(``--timeout``); once ``--max-consecutive-failures`` requests in a row find the
server unreachable, the rest are logged as not sent and the replay stops; and
the whole run is bounded by the last arrival plus the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from katz.tools.traces.trace import TraceError, TraceRow, format_pairs, read_trace

LOG_COLUMNS = ("id", "arrival_s", "sent_s", "done_s", "latency_s", "ok", "error", "inflight",
               "width", "height", "steps", "controlnets", "loras")

PROMPTS = (
    "a photo of a red house on a mountain",
    "a watercolor painting of a fox in the snow",
    "a futuristic city at night, neon lights, rain",
    "portrait of an old sailor, dramatic light",
)


@dataclass
class Record:
    row: TraceRow
    sent_s: float | None = None
    done_s: float | None = None
    ok: bool = False
    error: str = ""
    inflight: int = 0
    logged: bool = False

    def to_csv(self) -> dict:
        latency = "" if self.sent_s is None or self.done_s is None else f"{self.done_s - self.sent_s:.6f}"
        return {
            "id": self.row.id,
            "arrival_s": f"{self.row.arrival_s:.6f}",
            "sent_s": "" if self.sent_s is None else f"{self.sent_s:.6f}",
            "done_s": "" if self.done_s is None else f"{self.done_s:.6f}",
            "latency_s": latency,
            "ok": int(self.ok),
            "error": self.error.replace("\n", " ")[:500],
            "inflight": self.inflight,
            "width": self.row.width,
            "height": self.row.height,
            "steps": self.row.steps,
            "controlnets": format_pairs(self.row.controlnets),
            "loras": format_pairs(self.row.loras),
        }


def _control_png(width: int, height: int) -> bytes:
    from katz.tools.perf import control_image_png

    return control_image_png(width, height)


class Replayer:
    def __init__(self, url: str, rows: list[TraceRow], log_path: Path, *, speed: float = 1.0,
                 timeout: float = 120.0, max_consecutive_failures: int = 20, model: str = "katz",
                 lora_k: int | None = None, quiet: bool = False):
        self.url, self.rows, self.log_path = url, rows, Path(log_path)
        self.speed, self.timeout, self.model = speed, timeout, model
        self.max_failures, self.lora_k, self.quiet = max_consecutive_failures, lora_k, quiet
        self.records: list[Record] = []
        self.inflight = 0
        self.consecutive_unreachable = 0
        self.gave_up = False
        self._images: dict[tuple[int, int], bytes] = {}
        self._writer = None
        self._logged = 0

    # ---------------------------------------------------------------- requests
    def _inputs(self, row: TraceRow):
        import tritonclient.grpc.aio as grpcaio
        from tritonclient.utils import np_to_triton_dtype

        from katz.client import Generation

        images = []
        if row.controlnets:
            key = (row.width, row.height)
            if key not in self._images:
                self._images[key] = _control_png(row.width, row.height)
            images = [self._images[key]] * len(row.controlnets)
        gen = Generation(
            prompt=PROMPTS[row.id % len(PROMPTS)],
            seed=row.id,
            steps=row.steps,
            width=row.width,
            height=row.height,
            controlnets=[n for n, _ in row.controlnets],
            control_images=images,
            controlnet_scales=[s for _, s in row.controlnets] or None,
            loras=[n for n, _ in row.loras],
            lora_scales=[s for _, s in row.loras] or None,
            lora_k=self.lora_k,
        )
        inputs = []
        for name, arr in gen.tensors().items():
            inp = grpcaio.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        outputs = [grpcaio.InferRequestedOutput(n) for n in ("png", "seed")]
        return inputs, outputs

    def _log(self, rec: Record) -> None:
        rec.logged = True
        self._logged += 1
        self._writer.writerow(rec.to_csv())
        self._file.flush()
        if not self.quiet:
            done = self._logged
            state = "ok" if rec.ok else f"FAILED {rec.error[:80]}"
            lat = f"{rec.done_s - rec.sent_s:6.2f}s" if rec.sent_s is not None and rec.done_s is not None else "     -"
            print(f"[{done}/{len(self.rows)}] request {rec.row.id}: {lat} in flight {rec.inflight:3d} {state}",
                  file=sys.stderr, flush=True)

    async def _one(self, client, rec: Record, t0: float) -> None:
        from tritonclient.utils import InferenceServerException

        loop = asyncio.get_running_loop()
        delay = t0 + rec.row.arrival_s / self.speed - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.gave_up:
            rec.error = "not sent: the server was unreachable"
            self._log(rec)
            return
        try:
            inputs, outputs = self._inputs(rec.row)
        except Exception as exc:  # e.g. an unreadable control image size
            rec.error = f"bad request: {exc}"
            self._log(rec)
            return
        rec.sent_s = loop.time() - t0
        self.inflight += 1
        rec.inflight = self.inflight
        try:
            await client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout)
            rec.ok = True
            self.consecutive_unreachable = 0
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            rec.error = f"{status}: {exc.message()}" if status else str(exc.message())
            if "UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status:
                self.consecutive_unreachable += 1
            else:
                self.consecutive_unreachable = 0
        except asyncio.CancelledError:
            rec.error = "cancelled: replay deadline"
            raise
        except Exception as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
            self.consecutive_unreachable += 1
        finally:
            self.inflight -= 1
            rec.done_s = loop.time() - t0
            if self.max_failures and self.consecutive_unreachable >= self.max_failures and not self.gave_up:
                self.gave_up = True
                print(f"katz trace replay: {self.consecutive_unreachable} requests in a row found {self.url} "
                      "unreachable; logging the rest as not sent", file=sys.stderr, flush=True)
            self._log(rec)

    async def run(self) -> list[Record]:
        import tritonclient.grpc.aio as grpcaio

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=LOG_COLUMNS)
        self._writer.writeheader()
        client = grpcaio.InferenceServerClient(self.url)
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time() + 0.05
            self.records = [Record(row) for row in self.rows]
            tasks = [asyncio.create_task(self._one(client, rec, t0)) for rec in self.records]
            last = max((r.arrival_s for r in self.rows), default=0.0) / self.speed
            deadline = last + self.timeout + 30.0
            done, pending = await asyncio.wait(tasks, timeout=deadline) if tasks else (set(), set())
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                for rec in self.records:
                    if not rec.logged:
                        rec.error = rec.error or "not sent: replay deadline"
                        self._log(rec)
            return self.records
        finally:
            try:
                await client.close()
            except Exception:
                pass
            self._file.close()


def replay(url: str, rows: list[TraceRow], log_path: Path, **kw) -> list[Record]:
    return asyncio.run(Replayer(url, rows, log_path, **kw).run())


def cmd_replay(args) -> int:
    from katz.tools.traces import report

    try:
        rows, errors = read_trace(args.trace, strict=args.strict)
    except (TraceError, OSError) as exc:
        print(f"katz trace replay: {exc}", file=sys.stderr)
        return 2
    for line, msg in errors:
        print(f"katz trace replay: {args.trace}:{line}: {msg} (row skipped)", file=sys.stderr)
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        print(f"katz trace replay: {args.trace} has no usable rows", file=sys.stderr)
        return 2
    log = args.log or args.trace.with_name(args.trace.stem + "-replay.csv")
    print(f"katz trace replay: {len(rows)} requests to {args.url} over "
          f"{rows[-1].arrival_s / args.speed:.1f}s (speed x{args.speed:g}); log {log}", file=sys.stderr, flush=True)
    start = time.monotonic()
    records = replay(args.url, rows, log, speed=args.speed, timeout=args.timeout,
                     max_consecutive_failures=args.max_consecutive_failures, model=args.model,
                     lora_k=args.lora_k, quiet=args.quiet)
    print(f"katz trace replay: done in {time.monotonic() - start:.1f}s; log {log}", file=sys.stderr)
    runs = [report.load_log(log, args.label or log.stem)]
    print(report.format_summary(runs, args.slo))
    failed = sum(1 for r in records if not r.ok)
    return 1 if failed == len(records) else 0


def add_parser(sub) -> None:
    from katz.tools.traces import report

    p = sub.add_parser("replay", help="replay a trace open-loop (asyncio gRPC) and log every request",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path)
    p.add_argument("--url", required=True, help="HOST:PORT of the server's gRPC endpoint")
    p.add_argument("--log", type=Path, help="per-request log CSV (default: <trace>-replay.csv)")
    p.add_argument("--label", help="name of this run in reports (default: the log's name)")
    p.add_argument("--model", default="katz")
    p.add_argument("--speed", type=float, default=1.0, help="time compression: 2 replays twice as fast")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--limit", type=int, help="only the first N requests")
    p.add_argument("--strict", action="store_true", help="reject a trace with any malformed row (default: skip them)")
    p.add_argument("--max-consecutive-failures", type=int, default=20,
                   help="stop sending after this many unreachable-server failures in a row (0: never)")
    p.add_argument("--lora-k", type=int, help="BAL bound sent with every request (default: the server's)")
    p.add_argument("--slo", type=report.parse_slos, default=[10.0],
                   help="latency SLO in seconds for the summary, or several comma-separated (5,10)")
    p.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    p.set_defaults(func=cmd_replay)
