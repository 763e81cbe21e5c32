"""A STAND-IN for the super-resolution model run, for measuring the orchestration at scale ("a simulated night").

Off by default. With `python -m include.local_aws --synthetic-sr-seconds S`, the emulated SSM agent does not run a
chunk command with bash: it plays the chunk in process instead, with no ffmpeg, no AWS CLI and no process per chunk,
so a few hundred GPU slots fit on a 2-core machine and what is measured is the orchestration, not the machine. A chunk
command is recognised by its first line (`script.script_header`: `# vod-sr run <token> chunk <i>: ...`); every other
command (install_cli, the GPU count, anything a test sends) still runs for real.

What the stand-in does with a chunk, reading only the script's header and its variable assignments (`files_uri=`,
`results_uri=`, `run_token=`, and `slots=`, `streams_per_gpu=`, `lock_wait=` when present):

- reads the chunk's NUL-separated file list (`script.chunk_list`) from S3;
- takes a free slot of the instance: `slots=` of them (else the GPUs of its type, or 1), shared by every chunk of the
  instance as the real script's slot locks are; a chunk waits for one at most `lock_wait=` seconds from its start,
  else every file fails "not started", as in the script;
- per file, in order: looks the source up (a missing one fails at "download"), holds the slot's GPU (slot //
  streams_per_gpu) for S seconds (times 1 +/- `jitter`, uniformly), writes the output object (`output_bytes` bytes,
  metadata `vod-sr-run=<run token>`), appends a `VODSR-RESULT` line to the results object (rewritten whole, as the
  script does) and to the command's stdout;
- ends like the script: Success, or Failed with exit code 1 when a file failed.

The bytes are no video, so the media figures are claimed: every source is taken to be `source_media` (640x480, 10 s,
one audio stream) and its output that, upscaled `scale` times: what verify checks (resolution, duration, audio). No
contact sheet is made: each result's qc field says so (`QC_FIELD`).

It records what the emulator's other records hold for a real chunk: each model run in the instance's GPU busy log (the
same file and format as the ffmpeg stand-in's, see gpus.py, so the timeline shows it), and in the call log each S3
call the real script's AWS CLI makes (caller "instance", `"synthetic": true`): the file list's GET per chunk; the
source's HEAD and GET, the output's PUT and the results' PUT per file. The real script also PUTs a QC contact sheet
per file, which the stand-in does not make: one S3 PUT a file fewer than the real thing.

CancelCommand, SSM's executionTimeout and the instance stopping end it as they end a real command: SSM's status changes
at once and the stand-in writes nothing more (a file in progress gets no output). Not played: the chunk's budget and
per-file limit (`budget=`, `file_limit=`), and the downloads, measurements and uploads around the model runs (the real
script overlaps them with the model runs; they take no GPU time here nor there).

One scheduler thread plays every chunk from a heap of timed events: 100 instances x 4 slots need no 400 threads.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import re
import shlex
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from include.local_aws.gpus import GPU_BUSY_LOG

if TYPE_CHECKING:
    from include.local_aws.ssm_agent import Invocation

log = logging.getLogger(__name__)

_HEADER = re.compile(r"# vod-sr run (\S+) chunk (\d+):")
_ASSIGNED = ("run_token", "files_uri", "results_uri", "slots", "streams_per_gpu", "lock_wait")
RESULT_MARKER = "VODSR-RESULT"  # script.RESULT_MARKER, not imported: the emulator does not depend on vod_sr
QC_FIELD = "-synthetic SR stand-in: no contact sheet"
USER_AGENT = "vod-sr-synthetic-sr-stand-in"
SWEEP_SECONDS = 1.0  # how often chunks waiting for a slot are checked for a cancel


@dataclass(frozen=True)
class SyntheticSr:
    """How the stand-in plays a chunk. `seconds_per_file`: model time per file (a night compressed K times: the real
    model's seconds per file / K)."""

    seconds_per_file: float
    scale: float = 2.0
    jitter: float = 0.0
    output_bytes: int = 4096
    source_media: tuple[int, int, float, int] = (640, 480, 10.0, 1)  # width, height, seconds, audio streams

    def __post_init__(self) -> None:
        if not self.seconds_per_file >= 0:
            raise ValueError(f"seconds_per_file must be 0 or more, got {self.seconds_per_file!r}")
        if not 0 < self.scale <= 16:
            raise ValueError(f"scale must be above 0 and at most 16, got {self.scale!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.output_bytes < 1:
            raise ValueError(f"output_bytes must be at least 1, got {self.output_bytes!r}")

    def media(self) -> tuple[str, str]:
        """The source's and the output's figures as the script prints them: `WIDTHxHEIGHT SECONDS AUDIO-STREAMS`."""
        width, height, seconds, audio = self.source_media
        source = f"{width}x{height} {seconds:.2f} {audio}"
        return source, f"{round(width * self.scale)}x{round(height * self.scale)} {seconds:.2f} {audio}"


@dataclass(frozen=True)
class ChunkScript:
    """What the stand-in reads of a chunk's script."""

    run_token: str
    chunk_index: int
    files_uri: str
    results_uri: str
    slots: int | None = None
    streams_per_gpu: int = 1
    lock_wait: int | None = None  # seconds; None: no bound


def _script_body(commands: str) -> str:
    """The bash script inside an AWS-RunShellScript command (`script.as_run_shell_command` wraps it as
    `exec /bin/bash -c '<script>' vod-sr`); the command itself when it is not wrapped."""
    try:
        words = shlex.split(commands)
    except ValueError:
        return commands
    if len(words) >= 4 and words[0] == "exec" and words[1].endswith("bash") and words[2] == "-c":
        return words[3]
    return commands


def _whole(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def chunk_script(commands: str) -> ChunkScript | None:
    """The chunk script in a command's text, or None when the command is not a chunk (it then runs for real)."""
    body = _script_body(commands)
    first, _, rest = body.lstrip("\n").partition("\n")
    header = _HEADER.match(first)
    if header is None:
        return None
    values: dict[str, str] = {}
    for line in rest.splitlines():
        name, equals, value = line.partition("=")
        if equals and name in _ASSIGNED and name not in values:
            try:
                words = shlex.split(value)
            except ValueError:
                continue
            values[name] = words[0] if words else ""
    if not values.get("files_uri", "").startswith("s3://") or not values.get("results_uri", "").startswith("s3://"):
        return None
    return ChunkScript(
        run_token=values.get("run_token") or header.group(1),
        chunk_index=int(header.group(2)),
        files_uri=values["files_uri"],
        results_uri=values["results_uri"],
        slots=_whole(values.get("slots")),
        streams_per_gpu=_whole(values.get("streams_per_gpu")) or 1,
        lock_wait=_whole(values.get("lock_wait")),
    )


def _split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _s3_backend() -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def _s3_get(bucket: str, key: str) -> bytes | None:
    try:
        stored = _s3_backend().get_object(bucket, key)
    except Exception:  # moto raises its own error for a missing bucket
        return None
    return None if stored is None else stored.value


def _s3_exists(bucket: str, key: str) -> bool:
    try:
        return _s3_backend().get_object(bucket, key) is not None
    except Exception:
        return False


def _s3_put(bucket: str, key: str, body: bytes, metadata: dict[str, str] | None = None) -> bool:
    try:
        stored = _s3_backend().put_object(bucket, key, body)
    except Exception as error:
        log.warning("synthetic SR stand-in: cannot write s3://%s/%s: %s", bucket, key, error)
        return False
    if metadata:
        stored.set_metadata({f"x-amz-meta-{name}": value for name, value in metadata.items()})
    return True


@dataclass
class _Chunk:
    invocation: Invocation
    script: ChunkScript
    sandbox: Path
    slots: int
    started: float  # time.monotonic() at delivery
    deadline: float  # time.monotonic() of SSM's executionTimeout
    files: list[list[str]] = field(default_factory=list)  # index, source bucket, source key, output URI, extension
    position: int = 0
    slot: int | None = None
    file_started: float = 0.0  # wall clock
    in_file: bool = False  # a model run is under way
    lines: list[str] = field(default_factory=list)
    failed: int = 0
    done: bool = False
    run: int = 0  # the invocation's `runs` when this play of it began

    @property
    def instance_id(self) -> str:
        return self.invocation.instance_id

    @property
    def live(self) -> bool:
        """Still this run of its command: not ended, its instance not gone down, not run again by a new boot."""
        invocation = self.invocation
        return invocation.status == "InProgress" and not invocation.interrupted and invocation.runs == self.run


class SyntheticSrRunner:
    """Plays chunk commands (see the module docstring) for an SSM agent, on one scheduler thread.

    `finish(invocation, exit_code)` ends a command the way the agent ends a process (it stores the output and sets
    the status unless the command already ended); `timed_out(invocation)` ends it as SSM's executionTimeout does;
    `record_call(call)` adds an entry to the emulator's call log."""

    def __init__(
        self,
        config: SyntheticSr,
        *,
        finish: Callable[[Invocation, int], None],
        timed_out: Callable[[Invocation], None],
        record_call: Callable[[dict[str, Any]], None] | None = None,
        seed: int = 0,
    ) -> None:
        self.config = config
        self._finish = finish
        self._timed_out = timed_out
        self._record = record_call or (lambda call: None)
        self._random = random.Random(seed)
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        # Per instance: who holds each slot (None: free) and the chunks waiting for one, in arrival order.
        self._slots: dict[str, list[_Chunk | None]] = {}
        self._waiting: dict[str, deque[_Chunk]] = {}
        self._thread = threading.Thread(target=self._loop, name="synthetic-sr", daemon=True)
        self._thread.start()
        self._at(time.monotonic() + SWEEP_SECONDS, self._sweep)

    # --- the agent's side --------------------------------------------------------------------------------------

    def start(self, invocation: Invocation, script: ChunkScript, sandbox: Path, gpus: int) -> None:
        """Play `invocation`, already InProgress, whose script is `script`; `gpus`: its instance type's count."""
        slots = script.slots or max(1, gpus) * script.streams_per_gpu
        now = time.monotonic()
        chunk = _Chunk(invocation, script, sandbox, slots, now, now + invocation.execution_timeout, run=invocation.runs)
        self._at(now, lambda: self._begin(chunk))
        self._at(chunk.deadline, lambda: self._check_deadline(chunk))

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    # --- the scheduler -------------------------------------------------------------------------------------------

    def _at(self, when: float, action: Callable[[], None]) -> None:
        with self._wake:
            heapq.heappush(self._events, (when, next(self._order), action))
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and (not self._events or self._events[0][0] > time.monotonic()):
                    self._wake.wait(None if not self._events else max(0.0, self._events[0][0] - time.monotonic()))
                if self._stopped:
                    return
                _, _, action = heapq.heappop(self._events)
            try:
                action()
            except Exception:  # one chunk's surprise must not stop every other chunk
                log.exception("synthetic SR stand-in: an event failed")

    # --- a chunk -------------------------------------------------------------------------------------------------

    def _call(self, chunk: _Chunk, method: str, uri_or_bucket: str, key: str | None = None) -> None:
        bucket, key = (uri_or_bucket, key) if key is not None else _split_uri(uri_or_bucket)
        kind = "object" if key else "bucket"
        self._record(
            {
                "service": "s3",
                "action": f"{method} {kind}",
                "time": time.time(),
                "caller": "instance",
                "user_agent": USER_AGENT,
                "bucket": bucket,
                "key": key,
                "query": [],
                "synthetic": True,
                "instance_id": chunk.instance_id,
            }
        )

    def _write(self, chunk: _Chunk, stream: str, text: str) -> None:
        workdir = chunk.invocation.workdir
        if workdir is not None:
            with open(workdir / stream, "a", encoding="utf-8") as out:
                out.write(text)

    def _begin(self, chunk: _Chunk) -> None:
        if not chunk.live:
            return self._abandon(chunk)
        self._call(chunk, "GET", chunk.script.files_uri)
        listing = _s3_get(*_split_uri(chunk.script.files_uri))
        if listing is None:
            self._write(chunk, "stderr", f"vod-sr: cannot read the chunk's file list {chunk.script.files_uri}\n")
            return self._end(chunk, 255)
        fields = [part.decode("utf-8", errors="replace") for part in listing.split(b"\0")[:-1]]
        chunk.files = [fields[n : n + 5] for n in range(0, len(fields) - len(fields) % 5, 5)]
        slots = self._slots.setdefault(chunk.instance_id, [])
        slots.extend([None] * (chunk.slots - len(slots)))
        if not self._take_slot(chunk):
            self._waiting.setdefault(chunk.instance_id, deque()).append(chunk)
            if chunk.script.lock_wait is not None:
                self._at(chunk.started + chunk.script.lock_wait, lambda: self._give_up_waiting(chunk))

    def _take_slot(self, chunk: _Chunk) -> bool:
        slots = self._slots[chunk.instance_id]
        free = next((k for k in range(min(chunk.slots, len(slots))) if slots[k] is None), None)
        if free is None:
            return False
        slots[free] = chunk
        chunk.slot = free
        gpu = free // chunk.script.streams_per_gpu
        self._write(
            chunk,
            "stderr",
            f"vod-sr: took slot {free} of {chunk.slots}: GPU {gpu} (CUDA_VISIBLE_DEVICES={gpu}) "
            "[synthetic SR stand-in]\n",
        )
        self._at(time.monotonic(), lambda: self._next_file(chunk))
        return True

    def _release_slot(self, chunk: _Chunk) -> None:
        if chunk.slot is None:
            return
        slots = self._slots[chunk.instance_id]
        slots[chunk.slot] = None
        chunk.slot = None
        waiting = self._waiting.get(chunk.instance_id) or deque()
        while waiting:
            candidate = waiting.popleft()
            if not candidate.live:
                self._abandon(candidate)
            elif self._take_slot(candidate):
                return
            else:  # a chunk that counts fewer slots than the one freed: keep its place
                waiting.appendleft(candidate)
                return

    def _give_up_waiting(self, chunk: _Chunk) -> None:
        waiting = self._waiting.get(chunk.instance_id) or deque()
        if chunk.done or chunk not in waiting:
            return
        waiting.remove(chunk)
        if not chunk.live:
            return self._abandon(chunk)
        self._write(
            chunk,
            "stderr",
            f"vod-sr: gave up waiting for a free slot after {chunk.script.lock_wait} s: all {chunk.slots} slot(s) "
            "are held by the chunks ahead; no file was started\n",
        )
        stage = f"ffmpeg (not started: waited {chunk.script.lock_wait} s for a free slot)"
        for fields in chunk.files:
            self._result(chunk, fields[0], "failed", 0, 0, stage, "", "", "", store=False)
        self._store_results(chunk)
        self._end(chunk, 1)

    def _sweep(self) -> None:
        """Chunks cancelled (or whose instance stopped) while waiting for a slot: stop waiting."""
        for waiting in self._waiting.values():
            for chunk in [c for c in waiting if not c.live]:
                waiting.remove(chunk)
                self._abandon(chunk)
        self._at(time.monotonic() + SWEEP_SECONDS, self._sweep)

    def _check_deadline(self, chunk: _Chunk) -> None:
        if not chunk.done and chunk.live:
            self._timed_out(chunk.invocation)  # SSM kills the command: a file in progress gets no output
            self._abandon(chunk)

    def _next_file(self, chunk: _Chunk) -> None:
        while True:
            if not chunk.live:
                return self._abandon(chunk)
            if chunk.position >= len(chunk.files):
                self._release_slot(chunk)
                if chunk.failed:
                    self._write(chunk, "stderr", f"vod-sr: {chunk.failed} of {len(chunk.files)} file(s) failed\n")
                return self._end(chunk, 1 if chunk.failed else 0)
            index, source_bucket, source_key, _, _ = chunk.files[chunk.position]
            self._call(chunk, "HEAD", source_bucket, source_key)
            if not _s3_exists(source_bucket, source_key):
                self._write(chunk, "stderr", f"vod-sr: download of s3://{source_bucket}/{source_key} failed\n")
                self._result(chunk, index, "failed", 0, 0, "download")
                chunk.position += 1
                continue
            self._call(chunk, "GET", source_bucket, source_key)
            seconds = self.config.seconds_per_file * (1 + self.config.jitter * self._random.uniform(-1, 1))
            chunk.file_started, chunk.in_file = time.time(), True
            self._at(time.monotonic() + seconds, lambda: self._file_done(chunk))
            return

    def _file_done(self, chunk: _Chunk) -> None:
        if chunk.done:
            return
        if not chunk.live:
            return self._abandon(chunk)
        end = self._model_run_ended(chunk)
        index, _, _, output_uri, _ = chunk.files[chunk.position]
        seconds = round(end - chunk.file_started)
        source_media, output_media = self.config.media()
        bucket, key = _split_uri(output_uri)
        self._call(chunk, "PUT", bucket, key)
        body = b"\0" * self.config.output_bytes
        if _s3_put(bucket, key, body, {"vod-sr-run": chunk.script.run_token}):
            self._result(chunk, index, "ok", len(body), seconds, "", source_media, output_media, QC_FIELD)
        else:
            self._write(chunk, "stderr", f"vod-sr: upload to {output_uri} failed\n")
            self._result(chunk, index, "failed", len(body), seconds, "upload", source_media, output_media, "")
        chunk.position += 1
        self._next_file(chunk)

    def _model_run_ended(self, chunk: _Chunk) -> float:
        """Record the model run under way in the GPU busy log (up to when the command ended, if it did); its end."""
        ended = chunk.invocation.ended
        end = min(time.time(), ended.timestamp()) if ended is not None else time.time()
        if chunk.in_file and chunk.slot is not None:
            gpu = chunk.slot // chunk.script.streams_per_gpu
            with open(chunk.sandbox / GPU_BUSY_LOG, "a", encoding="utf-8") as busy:
                busy.write(f"{gpu} {chunk.file_started:.6f} {end:.6f}\n")
        chunk.in_file = False
        return end

    def _result(self, chunk: _Chunk, index: str, status: str, size: int, seconds: int, *rest: str, store=True) -> None:
        fields = [index, status, str(size), str(seconds), *rest]
        fields += [""] * (8 - len(fields))
        line = "\t".join([RESULT_MARKER, *fields]) + "\n"
        chunk.lines.append(line)
        if status == "failed":
            chunk.failed += 1
        self._write(chunk, "stdout", line)
        if store:
            self._store_results(chunk)

    def _store_results(self, chunk: _Chunk) -> None:
        bucket, key = _split_uri(chunk.script.results_uri)
        self._call(chunk, "PUT", bucket, key)
        _s3_put(bucket, key, "".join(chunk.lines).encode())

    def _end(self, chunk: _Chunk, code: int) -> None:
        if chunk.done:
            return
        chunk.done = True
        self._release_slot(chunk)
        self._report_end(chunk, code)

    def _abandon(self, chunk: _Chunk) -> None:
        """The command ended under the chunk (cancel, timeout, instance stopped): free its slot, keep its output."""
        if chunk.done:
            return
        chunk.done = True
        self._model_run_ended(chunk)
        self._release_slot(chunk)
        self._report_end(chunk, -9)

    def _report_end(self, chunk: _Chunk, code: int) -> None:
        """Tell the agent the chunk's command ended, unless a new boot's agent runs it again meanwhile."""
        if chunk.invocation.runs == chunk.run:
            self._finish(chunk.invocation, code)
