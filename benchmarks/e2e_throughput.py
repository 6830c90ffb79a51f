#!/usr/bin/env python
"""End-to-end throughput and latency: the full Faust pipeline vs a raw aiokafka pass-through.

Question: how many events/s does one worker sustain through the real broker, and what is the
event→prediction latency, compared with the ceiling of a bare consume→produce loop over the same
broker and the same data?

One run (all measurements see the same machine load, broker and data):

1. starts the embedded Apache Kafka broker on two free ports in a fresh data dir (or uses
   ``--broker kafka://host:port``), and pre-produces N events (synthetic, seeded; or the Taobao
   time slice with rebased times) into a fresh ``<run>.events`` topic;
2. **pass-through** (the ceiling): an aiokafka consumer→producer loop in this process reads each
   event (parses its JSON) and writes a small JSON record to ``<run>.passthrough``;
3. **pipeline** with the baseline predictor: a real ``faust worker`` subprocess (own app id,
   output topics and data dir) consumes the pre-produced topic from the start;
4. with ``--checkpoint DIR``: the same pipeline serving the Transformer (``NEXTACTION_CHECKPOINT``,
   ``NEXTACTION_DEVICE=cpu``);
5. with ``--rate R`` (events/s, or ``half``: half of each variant's measured maximum): a latency run
   per variant on a fresh topic, the worker already running and warm, events produced at rate R.

Definitions (all times are Kafka record CreateTimes, stamped by the producing client, ms):
  events/s   = outputs / (last output time − first output time)  (worker start-up excluded)
  e2e lat.   = output record time − input event record time. In the backlog runs (2–4) this
               includes the time the event waited in the topic, so it mostly measures the backlog;
               the ``--rate`` runs give the meaningful event→prediction latency.
  proc. lat. = the pipeline's own ``latency_ms`` (worker read → publish; in the pass-through: the
               output time − the time the loop read the event).
Every input event must give exactly one prediction or one DLQ record: the run counts missing,
duplicated and unexpected outputs by source (partition, offset).

Results go to stdout and (unless ``--no-write``) into ``benchmarks/RESULTS.md`` between
``<!-- BEGIN e2e -->`` and ``<!-- END e2e -->`` (other sections are kept).

This file is the entry point (options and main); the parts are in :mod:`benchmarks.e2e`: the
runner (broker, worker, phases), the measurements and the report. Runs as a script or as
``python -m benchmarks.e2e_throughput``.

Examples::

    .venv/bin/python benchmarks/e2e_throughput.py                       # N=100,000 synthetic
    .venv/bin/python benchmarks/e2e_throughput.py --source taobao-slice
    .venv/bin/python benchmarks/e2e_throughput.py --checkpoint var/model --rate half
    .venv/bin/python benchmarks/e2e_throughput.py -n 20000 --profile benchmarks/profiles/e2e_baseline.txt --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/e2e_throughput.py`
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, BenchError, command_line  # noqa: E402
from benchmarks.e2e.report import publish_report, report  # noqa: E402
from benchmarks.e2e.runner import Bench  # noqa: E402
from stream_app.errors import BrokerError  # noqa: E402

log = logging.getLogger("e2e")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--events", type=int, default=100_000, help="events to pre-produce (default 100,000)")
    p.add_argument("--users", type=int, default=10_000, help="synthetic users (default 10,000)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--source", choices=("synthetic", "taobao-slice"), default="synthetic")
    p.add_argument("--partitions", type=int, default=4, help="partitions of every topic (default 4)")
    p.add_argument("--workers", type=int, default=1, help="workers per pipeline run, one consumer group (default 1); "
                   "events/s and CPU ms/event are then the group's")
    p.add_argument("--broker", help="use this broker (kafka://host:port) instead of starting one")
    p.add_argument("--checkpoint", help="also run the pipeline serving this Transformer checkpoint on CPU")
    p.add_argument("--rate", help="latency runs at this many events/s, or 'half' (of each variant's max)")
    p.add_argument("--rate-events", type=int, default=0, help="events per rate run (default: rate × --rate-seconds)")
    p.add_argument("--rate-seconds", type=float, default=30.0)
    p.add_argument("--skip-passthrough", action="store_true")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--faust-floor", action="store_true",
                   help="also run the floor of Faust's per-message path (benchmarks/e2e/faust_floor.py): an agent "
                        "that only parses and produces one record per event, without and with one table write")
    p.add_argument("--profile", help="profile one worker into this file (pyinstrument text or py-spy raw)")
    p.add_argument("--profile-run", default="base", choices=("base", "tf", "rate-base", "rate-tf"),
                   help="which worker --profile samples: the baseline or Transformer pipeline, backlog or rate "
                        "run (default base); py-spy also samples the worker's inference process")
    p.add_argument("--profiler", choices=("pyinstrument", "py-spy"), default="py-spy",
                   help="py-spy (default; attached at the first prediction, all threads, written as a hot-spot "
                        "summary; binary from PATH or $PY_SPY) or pyinstrument (whole run, main thread, .pyisession)")
    p.add_argument("--worker-env", action="append", default=[], metavar="K=V",
                   help="extra environment for the worker (e.g. NEXTACTION_MAX_BATCH=1024); repeatable")
    p.add_argument("--worker-loglevel", default="info", choices=("crit", "error", "warn", "info", "debug"),
                   help="faust worker -l (default info; warn/error are slower: see Worker)")
    p.add_argument("--no-precreate-changelogs", action="store_true",
                   help="let Faust create its changelog topics (exposes a start-up race, see precreate_changelogs)")
    p.add_argument("--worker-cwd", help="run the worker from this directory (a patched copy of the code)")
    p.add_argument("--compare-cwd", help="also run the baseline pipeline from this directory (a patched copy of "
                                         "the code, found first on sys.path), in the same run")
    p.add_argument("--compare-loglevel", choices=("crit", "error", "warn", "info", "debug"),
                   help="faust -l for the comparison worker (e.g. warn, to measure Faust's spinner/DEBUG-root cost)")
    p.add_argument("--compare-env", action="append", default=[], metavar="K=V",
                   help="extra environment for the --compare-cwd worker only (e.g. to test a setting); repeatable")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per phase before giving up")
    p.add_argument("--stall", type=float, default=60.0, help="seconds without new output before giving up waiting")
    p.add_argument("--workdir", help="keep data here (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (broker data, worker logs)")
    p.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.relative_to(ROOT)}")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.events < 1:
        p.error("--events must be >= 1")
    if args.rate not in (None, "half"):
        try:
            if not float(args.rate) > 0:
                raise ValueError
        except ValueError:
            p.error(f"--rate must be a positive number or 'half' (got {args.rate!r})")
    for kv in args.worker_env:
        if "=" not in kv:
            p.error(f"--worker-env wants K=V (got {kv!r})")
    if args.checkpoint and not Path(args.checkpoint).exists():
        p.error(f"--checkpoint {args.checkpoint!r} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    command = command_line(argv)
    bench = Bench(args)
    interrupted = False

    def on_term(signum, frame):  # noqa: ARG001 - make SIGTERM run the finally: cleanup
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        bench.start_broker()
        asyncio.run(bench.main())
    except KeyboardInterrupt:
        interrupted = True
        log.error("interrupted")
    except (BenchError, BrokerError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        bench.cleanup()
    if not bench.phases:
        return 1
    print()
    publish_report(report(bench, command), write=not (args.no_write or interrupted))
    if interrupted:
        return 130
    bad = [p for p in bench.phases if p.missing or p.duplicates or p.unexpected]
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
