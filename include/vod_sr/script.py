"""The bash scripts that run on the instance through SSM `AWS-RunShellScript`.

Every value that comes from a user (keys, buckets) or an operator (model arguments) reaches bash through
`shlex.quote`, so any key S3 accepts is passed to the AWS CLI literally. The scripts never contain credentials:
the instance role gives the on-instance `aws` CLI its S3 rights.
"""

from __future__ import annotations

import re
import shlex

from include.vod_sr.catalog import SrModel
from include.vod_sr.plan import Chunk

RESULT_MARKER = "VODSR-RESULT"
_VAR_REFERENCE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")

INSTALL_CLI_SCRIPT = """\
set -euo pipefail
if command -v aws >/dev/null 2>&1 && aws --version; then
    echo "vod-sr: AWS CLI already installed; nothing to do"
    exit 0
fi
workdir=$(mktemp -d "${TMPDIR:-/var/tmp}/vod-sr-cli.XXXXXXXX")
trap 'rm -rf -- "$workdir"' EXIT
cd "$workdir"
export DEBIAN_FRONTEND=noninteractive
sudo apt-get update -q
sudo apt-get install -y -q unzip curl
curl -fsSL "https://awscli.amazonaws.com/awscli-exe-linux-$(uname -m).zip" -o awscliv2.zip
unzip -q awscliv2.zip
sudo ./aws/install --update
aws --version
"""


def as_run_shell_command(body: str) -> str:
    """Wrap a bash script for AWS-RunShellScript, whose agent runs commands with `sh`, not bash."""
    return f"exec /bin/bash -c {shlex.quote(body)} vod-sr"


def _export_line(name: str, value: str) -> str:
    # `${NAME:-}` keeps `set -u` from failing when the instance's environment lacks a referenced variable.
    expanded = _VAR_REFERENCE.sub(r"${\1:-}", value)
    return f'export {name}="{expanded}"'


def _bash_array(name: str, values: list[str]) -> str:
    return f"{name}=({' '.join(shlex.quote(v) for v in values)})"


def render_sr_script(chunk: Chunk, model: SrModel, run_token: str) -> str:
    """The bash script that runs `model` over every file of `chunk` and uploads each output.

    The script goes on past a failed file, prints one tab-separated result line per file
    (`VODSR-RESULT index status bytes seconds`) and exits non-zero if any file failed.
    """
    files = chunk.files
    lines = [
        f"# vod-sr run {run_token} chunk {chunk.index}: model {model.name}, {len(files)} file(s)",
        "set -euo pipefail",
        *(_export_line(name, value) for name, value in model.env),
        f"run_token={shlex.quote(run_token)}",
        "# shellcheck disable=SC2016  # keys are data: single quotes keep $ and ` literal on purpose",
        _bash_array("sources", [f.source.uri for f in files]),
        "# shellcheck disable=SC2016",
        _bash_array("outputs", [f.output.uri for f in files]),
        _bash_array("indexes", [str(f.index) for f in files]),
        _bash_array("output_exts", [_extension(f.output.key) for f in files]),
        f"video_filter={shlex.quote(model.video_filter)}",
        _bash_array("output_args", list(model.output_args)),
        SR_LOOP,
    ]
    return "\n".join(lines)


def _extension(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    return name[name.rfind(".") :] if "." in name else ""


SR_LOOP = r"""
workdir=$(mktemp -d "${TMPDIR:-/var/tmp}/vod-sr.XXXXXXXX")
trap 'rm -rf -- "$workdir"' EXIT
trap 'exit 143' TERM INT
# One chunk at a time per instance: every command sent to the instance shares its GPU.
exec 9>"${TMPDIR:-/var/tmp}/vod-sr.lock"
flock 9

failed=0
for n in "${!sources[@]}"; do
    index=${indexes[n]}
    input="$workdir/input-$index"
    output="$workdir/output-$index${output_exts[n]}"
    started=$SECONDS
    if ! aws s3 cp --only-show-errors "${sources[n]}" "$input" 2>"$workdir/download.log"; then
        echo "vod-sr: download of ${sources[n]} failed:" >&2
        tail -n 5 "$workdir/download.log" >&2
        printf '%s\t%s\tfailed\t0\t%s\tdownload\n' "VODSR-RESULT" "$index" "$((SECONDS - started))"
        failed=$((failed + 1))
        continue
    fi
    if ! ffmpeg -y -i "$input" -vf "$video_filter" "${output_args[@]}" "$output" \
            </dev/null >"$workdir/ffmpeg.log" 2>&1; then
        echo "vod-sr: ffmpeg failed for ${sources[n]}:" >&2
        tail -n 20 "$workdir/ffmpeg.log" >&2
        printf '%s\t%s\tfailed\t0\t%s\tffmpeg\n' "VODSR-RESULT" "$index" "$((SECONDS - started))"
        failed=$((failed + 1))
        rm -f -- "$input" "$output"
        continue
    fi
    bytes=$(stat -c %s "$output")
    if ! aws s3 cp --only-show-errors --metadata "vod-sr-run=$run_token" "$output" "${outputs[n]}" \
            2>"$workdir/upload.log"; then
        echo "vod-sr: upload to ${outputs[n]} failed:" >&2
        tail -n 5 "$workdir/upload.log" >&2
        printf '%s\t%s\tfailed\t%s\t%s\tupload\n' "VODSR-RESULT" "$index" "$bytes" "$((SECONDS - started))"
        failed=$((failed + 1))
    else
        printf '%s\t%s\tok\t%s\t%s\t\n' "VODSR-RESULT" "$index" "$bytes" "$((SECONDS - started))"
    fi
    rm -f -- "$input" "$output"
done
if [ "$failed" -gt 0 ]; then
    echo "vod-sr: $failed of ${#sources[@]} file(s) failed" >&2
    exit 1
fi
"""


def parse_result_lines(stdout: str) -> dict[int, dict[str, object]]:
    """The per-file result lines a chunk script printed, keyed by file index."""
    results: dict[int, dict[str, object]] = {}
    for line in stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 6 and parts[0] == RESULT_MARKER and parts[1].isdigit():
            results[int(parts[1])] = {
                "status": parts[2],
                "bytes": int(parts[3]) if parts[3].isdigit() else 0,
                "seconds": int(parts[4]) if parts[4].isdigit() else 0,
                "stage": parts[5],
            }
    return results
