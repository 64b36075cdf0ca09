"""``katz trace``: production-like traffic for a Katz server.

* ``katz trace synth`` writes a CSV trace from a model of production traffic
  (:mod:`katz.tools.traces.synth`);
* ``katz trace replay`` replays it open-loop against a server and logs every
  request (:mod:`katz.tools.traces.replay`);
* ``katz trace report`` summarizes one or more replay logs side by side and
  saves plots (:mod:`katz.tools.traces.report`).
"""

from __future__ import annotations


def add_parsers(sub) -> None:
    from katz.tools.traces import replay, report, synth

    p = sub.add_parser("trace", help="synthesize, replay and report production-like traces")
    tsub = p.add_subparsers(dest="trace_command", required=True)
    synth.add_parser(tsub)
    replay.add_parser(tsub)
    report.add_parser(tsub)
