"""How long a chunk may work, and the SSM executionTimeout that only backs that up.

SSM starts a command's executionTimeout when the agent starts its process, but a chunk then waits for a free slot of
the instance (one GPU x one stream, each held with its own lock, see `script.render_sr_script`) while the chunks
ahead of it hold them all. A timeout counted from there would give each chunk whatever the chunks ahead left over. So
the chunk script enforces the operator's budget itself, counted from the moment it takes a slot (`ChunkLimits.budget`,
and `file_limit` for each file's ffmpeg), bounds its wait for a slot (`lock_wait`), and SSM gets a timeout
(`backstop`) that covers the wait, the budget and what a chunk still does after its budget: stop ffmpeg and finish
the uploads under way.

Kept free of botocore: the trigger form imports it at DAG parse time.
"""

from __future__ import annotations

from dataclasses import dataclass

from include.vod_sr.limits import MAX_EXECUTION_TIMEOUT

# Seconds ffmpeg gets to finish writing after SIGTERM (a limit reached) before SIGKILL.
KILL_GRACE = 30
# Seconds a chunk may still work after its budget: stop ffmpeg, measure and upload the outputs already made, store its
# results. Uploads of finished files are never cut by the budget.
AFTER_BUDGET = KILL_GRACE + 870
# The largest budget for which the chunk ahead's budget plus this one's (each with AFTER_BUDGET) fit in SSM's 48 h.
MAX_CHUNK_BUDGET = (MAX_EXECUTION_TIMEOUT - 2 * AFTER_BUDGET) // 2
MIN_CHUNK_BUDGET = 60
MIN_FILE_LIMIT = 10


@dataclass(frozen=True)
class ChunkLimits:
    """One chunk's time limits, in seconds.

    :param budget: from taking a slot of the instance: the chunk's downloads and ffmpeg runs; no file starts after it
        and the running ffmpeg is stopped at it.
    :param file_limit: one file's ffmpeg run (None: only the budget bounds it).
    :param lock_wait: the wait for a free slot; the chunk fails, starting no file, when every slot is still held
        after it.
    :param backstop: SSM's executionTimeout for the command: `lock_wait` + `budget` + `AFTER_BUDGET`. The script
        ends before it unless the instance misbehaves.
    """

    budget: int
    file_limit: int | None
    lock_wait: int
    backstop: int


def chunk_limits(budget: int, *, queued_ahead: int, file_limit: int | None = None) -> ChunkLimits:
    """The limits of a chunk with a `budget`, sent while up to `queued_ahead` other chunks may be ahead of it on the
    instance (with two commands in flight per instance: one).

    A chunk holds its slot for at most `budget + AFTER_BUDGET`, so it may wait that long for each chunk ahead. SSM
    allows 48 h at most: when the chunks ahead cannot all fit, the wait is what is left (the budget itself is never
    cut).
    """
    if budget < 1 or queued_ahead < 0 or (file_limit is not None and file_limit < 1):
        raise ValueError(f"bad limits: budget {budget}, queued_ahead {queued_ahead}, file_limit {file_limit}")
    held = budget + AFTER_BUDGET  # the longest one chunk holds its slot
    if held > MAX_EXECUTION_TIMEOUT:
        raise ValueError(f"a budget of {budget} s leaves no room in SSM's {MAX_EXECUTION_TIMEOUT} s limit")
    backstop = min(MAX_EXECUTION_TIMEOUT, (queued_ahead + 1) * held)
    return ChunkLimits(budget=budget, file_limit=file_limit, lock_wait=backstop - held, backstop=backstop)
