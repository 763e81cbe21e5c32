"""Merges the per-tier duration files `make test` writes into test-artifacts/durations.txt:
`python -m scripts.durations test-artifacts/durations test-artifacts/durations.txt`.

Each tier's file (tests/conftest.py, DurationsRecorder) holds its wall time and each test's seconds (setup + call +
teardown). The summary gives each tier's wall time, test count and summed test time (more than the wall time where the
tier runs on both cores), the slowest 30 tests, then every test, slowest first.
"""

from __future__ import annotations

import sys
from pathlib import Path

SLOWEST = 30
TIER_ORDER = ("fast", "e2e", "stack")  # as `make test` runs them


def read_tier(path: Path) -> tuple[str, float, list[tuple[float, str, str]]]:
    lines = path.read_text().splitlines()
    _, tier, _, wall = lines[0].lstrip("# ").split("\t")
    tests = []
    for line in lines[1:]:
        seconds, outcome, nodeid = line.split("\t", 2)
        tests.append((float(seconds), outcome, nodeid))
    return tier, float(wall), tests


def summary(tiers: list[tuple[str, float, list[tuple[float, str, str]]]]) -> str:
    out = [f"{'tier':<10} {'wall s':>8} {'tests':>6} {'test s':>8}"]
    every = []
    for tier, wall, tests in tiers:
        out.append(f"{tier:<10} {wall:>8.0f} {len(tests):>6} {sum(t[0] for t in tests):>8.0f}")
        every += [(seconds, tier, outcome, nodeid) for seconds, outcome, nodeid in tests]
    out.append(f"{'all':<10} {sum(t[1] for t in tiers):>8.0f} {len(every):>6} {sum(t[0] for t in every):>8.0f}")
    every.sort(reverse=True)
    out += ["", f"Slowest {SLOWEST}:"]
    out += [f"{seconds:8.1f}  {tier:<8} {nodeid}" for seconds, tier, _, nodeid in every[:SLOWEST]]
    out += ["", "Every test:"]
    out += [f"{seconds:8.2f}  {tier:<8} {outcome:<8} {nodeid}" for seconds, tier, outcome, nodeid in every]
    return "\n".join(out) + "\n"


def main(folder: str, target: str) -> int:
    paths = sorted(Path(folder).glob("*.tsv"), key=lambda p: (*TIER_ORDER, p.stem).index(p.stem))
    if not paths:
        print(f"No duration files in {folder}", file=sys.stderr)
        return 1
    text = summary([read_tier(path) for path in paths])
    Path(target).write_text(text)
    print(text.split("\nEvery test:")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
