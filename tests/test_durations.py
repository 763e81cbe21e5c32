"""test-artifacts/durations.txt: what `make test` leaves for the next person to read (scripts/durations.py)."""

from __future__ import annotations

from scripts.durations import main


def write_tier(folder, tier: str, wall: float, tests: dict[str, float]) -> None:
    lines = [f"# tier\t{tier}\twall\t{wall}"] + [f"{s}\tpassed\t{nodeid}" for nodeid, s in tests.items()]
    (folder / f"{tier}.tsv").write_text("\n".join(lines) + "\n")


def test_tiers_in_run_order_with_wall_and_summed_time_then_the_slowest_first(tmp_path):
    write_tier(tmp_path, "stack", 300.0, {"tests/e2e/test_a.py::test_slow": 250.0})
    write_tier(tmp_path, "fast", 100.0, {"tests/test_x.py::test_one": 1.5, "tests/test_x.py::test_two": 0.5})
    target = tmp_path / "durations.txt"

    assert main(str(tmp_path), str(target)) == 0

    lines = target.read_text().splitlines()
    assert lines[1].split() == ["fast", "100", "2", "2"]
    assert lines[2].split() == ["stack", "300", "1", "250"]
    assert lines[3].split() == ["all", "400", "3", "252"]
    slowest = lines[lines.index("Slowest 30:") + 1 :]
    assert slowest[0].split() == ["250.0", "stack", "tests/e2e/test_a.py::test_slow"]
    assert slowest[1].split() == ["1.5", "fast", "tests/test_x.py::test_one"]


def test_no_tier_file_is_an_error_not_an_empty_summary(tmp_path):
    assert main(str(tmp_path), str(tmp_path / "durations.txt")) == 1
    assert not (tmp_path / "durations.txt").exists()
