"""Fails when a test run left a process behind: `python -m scripts.leftover_processes <tag>`.

`make test` gives pytest a tag in `VOD_SR_PROCESS_TAG`; every process started by a test (Airflow components, Celery
workers, PostgreSQL, Redis, the emulator and its agents, Chromium, ffmpeg) inherits it. Whatever still carries it
a few seconds after pytest has exited was leaked: it is listed, killed (so it cannot disturb what runs next) and the
exit status is 1.
"""

from __future__ import annotations

import sys
import time

import psutil

from include.local_aws.services import tagged_processes

GRACE_SECONDS = 10  # processes already told to stop may take a moment to exit


def main(tag: str) -> int:
    deadline = time.monotonic() + GRACE_SECONDS
    left = tagged_processes(tag)
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = tagged_processes(tag)
    if not left:
        print(f"No process of the test run ({tag}) is left running.")
        return 0
    print(f"{len(left)} process(es) of the test run ({tag}) were left running:", file=sys.stderr)
    for process in left:
        try:
            started = time.strftime("%H:%M:%S", time.localtime(process.create_time()))
            print(
                f"  {process.pid} (since {started}, in {process.cwd()}) {' '.join(process.cmdline())[:200]}",
                file=sys.stderr,
            )
            process.kill()
        except psutil.Error:
            continue
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
