"""Run the local AWS emulator: `python -m include.local_aws [--host H] [--port P] [--state-dir D]`.

Prints `local-aws ready at <endpoint url>` once it serves, and stops cleanly on SIGTERM or SIGINT.

`--synthetic-sr-seconds S` replaces the SR model run of every chunk command by a synthetic STAND-IN that takes S
seconds of model time per file (see synthetic_sr.py), for benchmarks of the orchestration at scale.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from include.local_aws.faults import InstanceFaults
from include.local_aws.server import LocalAws
from include.local_aws.synthetic_sr import SyntheticSr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m include.local_aws", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5055, help="0 picks a free port")
    parser.add_argument("--state-dir", type=Path, default=None, help="instance sandboxes; a temp dir by default")
    defaults = InstanceFaults()
    parser.add_argument("--pending-seconds", type=float, default=defaults.pending_seconds)
    parser.add_argument("--stopping-seconds", type=float, default=defaults.stopping_seconds)
    parser.add_argument("--agent-registration-seconds", type=float, default=defaults.agent_registration_seconds)
    parser.add_argument("--verbose", action="store_true", help="log every HTTP request")
    stand_in = parser.add_argument_group("synthetic SR stand-in (off unless --synthetic-sr-seconds is given)")
    stand_in.add_argument(
        "--synthetic-sr-seconds",
        type=float,
        default=None,
        help="play chunk commands in process: this many seconds of model time per file, no ffmpeg",
    )
    stand_in.add_argument("--synthetic-sr-scale", type=float, default=2.0, help="outputs' size over the sources'")
    stand_in.add_argument(
        "--synthetic-sr-jitter", type=float, default=0.0, help="each file takes the seconds x (1 +/- this), uniformly"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("werkzeug").setLevel(logging.INFO if args.verbose else logging.WARNING)

    emulator = LocalAws(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        defaults=InstanceFaults(
            pending_seconds=args.pending_seconds,
            stopping_seconds=args.stopping_seconds,
            agent_registration_seconds=args.agent_registration_seconds,
        ),
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    emulator.start()
    if args.synthetic_sr_seconds is not None:
        assert emulator.extension is not None and emulator.extension.agent is not None
        emulator.extension.agent.use_synthetic_sr(
            SyntheticSr(args.synthetic_sr_seconds, scale=args.synthetic_sr_scale, jitter=args.synthetic_sr_jitter),
            record_call=emulator.extension.record_call,
        )
        print(f"local-aws: synthetic SR stand-in, {args.synthetic_sr_seconds:g} s per file", file=sys.stderr)
    print(f"local-aws ready at {emulator.endpoint_url}", flush=True)
    stopping.wait()
    emulator.stop()
    print("local-aws stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
