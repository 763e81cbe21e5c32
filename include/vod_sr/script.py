"""The bash scripts that run on the instance through SSM `AWS-RunShellScript`.

Every value that comes from a user (keys, buckets) or an operator (model arguments) reaches bash through
`shlex.quote` or the chunk's NUL-separated file list, never through bash parsing. Keys also need care with the
AWS CLI itself: an option value is parsed as an option when it starts with `-` (`--key -x.mp4` fails) and read
from a file when it starts with `file://` or `fileb://` (and fetched by CLI v1 when it starts with `http(s)://`).
So user keys reach the CLI only inside `s3://bucket/key` arguments of `aws s3 cp`, taken literally after the
bucket's `/` (which also gives parallel ranged downloads and multipart uploads for large files; `s3 cp` would append
the file name to an output URI ending in `/`, which the plan never names). `s3api` calls (reading the chunk's file
list, writing its results as each file ends) use the `--key=VALUE` form and only the script's own `vod-sr-runs/`
keys. The scripts never contain credentials: the instance role gives the on-instance `aws` CLI its S3 rights.
"""

from __future__ import annotations

import re
import shlex

from include.vod_sr.budget import KILL_GRACE, ChunkLimits
from include.vod_sr.catalog import SrModel
from include.vod_sr.plan import Chunk

RESULT_MARKER = "VODSR-RESULT"
RUNS_PREFIX = "vod-sr-runs/"  # in the output bucket: each chunk's file list and results
_VAR_REFERENCE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")

# install_cli: seconds apt may wait in all for its locks, and between two tries (see `install_cli_script`).
APT_LOCK_WAIT = 600
APT_RETRY_DELAY = 10

_INSTALL_CLI_BODY = r"""
if command -v aws >/dev/null 2>&1 && aws --version; then
    echo "vod-sr: AWS CLI already installed; nothing to do"
    exit 0
fi
workdir=$(mktemp -d "${TMPDIR:-/var/tmp}/vod-sr-cli.XXXXXXXX")
trap 'rm -rf -- "$workdir"' EXIT
cd "$workdir"
lock_deadline=$((SECONDS + lock_wait))

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Right after a boot apt-daily and unattended-upgrades hold apt's locks, often for minutes. apt >= 1.9.11 waits for
# the dpkg lock itself (DPkg::Lock::Timeout); the package lists' lock (apt-get update) and older apt fail at once
# with "Could not get lock", so those tries are repeated here, all within lock_wait seconds.
apt_get() {
    local status left repaired=0
    while true; do
        left=$((lock_deadline - SECONDS))
        if [ "$left" -lt 0 ]; then left=0; fi
        status=0
        as_root env LC_ALL=C DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout="$left" "$@" \
            2>"$workdir/apt.err" || status=$?
        if [ "$status" -ne 0 ] && [ "$repaired" -eq 0 ] && grep -q 'dpkg was interrupted' "$workdir/apt.err"; then
            # An earlier attempt was killed mid-install (a retry of install_cli cancels it): finish dpkg's work.
            echo "vod-sr: an earlier dpkg run was interrupted; running dpkg --configure -a"
            repaired=1
            as_root env LC_ALL=C DEBIAN_FRONTEND=noninteractive dpkg --configure -a || true
            continue
        fi
        if [ "$status" -eq 0 ] || ! grep -q 'Could not get lock' "$workdir/apt.err"; then
            cat "$workdir/apt.err" >&2
            return "$status"
        fi
        if [ "$SECONDS" -ge "$lock_deadline" ]; then
            cat "$workdir/apt.err" >&2
            echo "vod-sr: gave up after waiting ${lock_wait} s for apt's lock: another apt or dpkg run (usually" \
                "apt-daily or unattended-upgrades right after a boot) still holds it. Retry install_cli when it is" \
                "done, or bake the AWS CLI into the AMI and set VOD_SR_SKIP_CLI_INSTALL=true." >&2
            return "$status"
        fi
        echo "vod-sr: apt's lock is busy ($(grep -m 1 -o 'held by process.*' "$workdir/apt.err" || echo 'held by' \
            'another apt or dpkg run')); waiting, $((lock_deadline - SECONDS)) s left"
        sleep "$retry_delay"
    done
}

if command -v unzip >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; then
    echo "vod-sr: unzip and curl are installed; apt is not needed"
else
    apt_get update
    apt_get install -y unzip curl
fi
curl -fsSL --retry 3 "https://awscli.amazonaws.com/awscli-exe-linux-$(uname -m).zip" -o awscliv2.zip
unzip -q awscliv2.zip
as_root ./aws/install --update
aws --version
"""


def install_cli_script(
    lock_wait: int = APT_LOCK_WAIT, retry_delay: int = APT_RETRY_DELAY, *, count_gpus: bool = False
) -> str:
    """The script install_cli sends: AWS CLI v2 the seed's way, unless `aws --version` already works.

    apt runs only when `unzip` or `curl` is missing. It waits up to `lock_wait` seconds in all for apt's locks
    (trying again every `retry_delay` seconds), then fails saying which process holds them; keep `lock_wait` below
    the command's execution timeout so that message, not SSM's kill, ends the wait. A dpkg run that an earlier,
    cancelled attempt interrupted is finished first (`dpkg --configure -a`).

    `count_gpus`: first print the instance's GPU count (`gpu_count_script`, read by `parse_gpu_count`), before the
    install (which ends the script early when the CLI is already there).
    """
    count = _GPU_COUNT_BODY if count_gpus else ""
    return f"set -euo pipefail\n{count}lock_wait={int(lock_wait)}\nretry_delay={int(retry_delay)}{_INSTALL_CLI_BODY}"


INSTALL_CLI_SCRIPT = install_cli_script()

# install_cli with VOD_SR_SKIP_CLI_INSTALL: the AMI has the CLI baked in; only check that it runs.
_CHECK_CLI_BODY = """\
if ! command -v aws >/dev/null 2>&1; then
    echo "vod-sr: no AWS CLI on this instance's PATH, and VOD_SR_SKIP_CLI_INSTALL=true tells vod-sr not to install" \\
        "it: bake the AWS CLI into the AMI, or set VOD_SR_SKIP_CLI_INSTALL=false" >&2
    exit 1
fi
aws --version
"""


def check_cli_script(*, count_gpus: bool = False) -> str:
    """install_cli's script with VOD_SR_SKIP_CLI_INSTALL; `count_gpus` as in `install_cli_script`."""
    return f"set -euo pipefail\n{_GPU_COUNT_BODY if count_gpus else ''}{_CHECK_CLI_BODY}"


CHECK_CLI_SCRIPT = check_cli_script()


GPU_COUNT_MARKER = "vod-sr: gpus="
_GPU_COUNT_LINE = re.compile(r"^vod-sr: gpus=([0-9]+)\s*$", re.MULTILINE)

# Counts the instance's GPUs as `nvidia-smi -L` lists them ("GPU 0: NVIDIA L40S (UUID: GPU-...)"; MIG devices are
# indented under their GPU) and prints `vod-sr: gpus=N`. No GPU (no nvidia-smi, no driver, an empty list) prints
# gpus=1 and a warning: a CPU-only instance still runs one stream. Runs under `set -euo pipefail` and never fails.
_GPU_COUNT_BODY = """\
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    why="nvidia-smi -L lists no GPU"
    gpu_list=$(timeout 60 nvidia-smi -L 2>&1) || why="nvidia-smi -L failed: $(head -n 1 <<<"$gpu_list")"
    gpus=$(grep -c '^GPU ' <<<"$gpu_list" || true)
else
    why="no nvidia-smi on this instance's PATH"
fi
if [ "${gpus:-0}" -lt 1 ]; then
    echo "vod-sr: warning: $why; counting 1 slot (a CPU-only instance still runs one stream)" >&2
    gpus=1
fi
echo "vod-sr: gpus=$gpus"
"""


def gpu_count_script() -> str:
    """A script that prints the instance's GPU count as `vod-sr: gpus=N` (N >= 1; read it with `parse_gpu_count`).

    Counts the lines of `nvidia-smi -L` that start with `GPU `. Without nvidia-smi, or when it fails or lists none,
    it prints `gpus=1` and a warning on stderr: a CPU-only instance still runs one stream. It always exits 0. To count
    in the same command as install_cli, pass `count_gpus=True` to `install_cli_script` or `check_cli_script`.
    """
    return f"set -euo pipefail\n{_GPU_COUNT_BODY}"


GPU_COUNT_SCRIPT = gpu_count_script()


def parse_gpu_count(stdout: str) -> int:
    """The GPU count a command's output gives in its `vod-sr: gpus=N` line (the last one, if several; at least 1).

    Raises ValueError when there is none: a script that does not count them, or output cut before the line.
    """
    counts = _GPU_COUNT_LINE.findall(stdout)
    if not counts:
        raise ValueError(f"no {GPU_COUNT_MARKER}N line in the command's output: {stdout[-300:]!r}")
    return max(1, int(counts[-1]))


def as_run_shell_command(body: str) -> str:
    """Wrap a bash script for AWS-RunShellScript, whose agent runs commands with `sh`, not bash."""
    return f"exec /bin/bash -c {shlex.quote(body)} vod-sr"


def _export_line(name: str, value: str) -> str:
    # `${NAME:-}` keeps `set -u` from failing when the instance's environment lacks a referenced variable.
    expanded = _VAR_REFERENCE.sub(r"${\1:-}", value)
    return f'export {name}="{expanded}"'


def _bash_array(name: str, values: list[str]) -> str:
    return f"{name}=({' '.join(shlex.quote(v) for v in values)})"


def chunk_keys(run_token: str, chunk_index: int) -> tuple[str, str]:
    """Keys of a chunk's file list (written before its command is sent) and results (written by the script)."""
    base = f"{RUNS_PREFIX}{run_token}/chunk-{chunk_index:05d}"
    return f"{base}.files", f"{base}.results"


def script_header(run_token: str, chunk_index: int) -> str:
    """The first line of a chunk's script: verify finds the chunk's SSM command by it in ListCommands."""
    return f"# vod-sr run {run_token} chunk {chunk_index}:"


def chunk_list(chunk: Chunk) -> bytes:
    """The chunk's files for the script, NUL-separated (no key can contain NUL): index, source bucket, source key,
    output URI, output extension."""
    fields = []
    for job in chunk.files:
        fields += [str(job.index), job.source.bucket, job.source.key, job.output.uri, _extension(job.output.key)]
    return b"".join(f.encode() + b"\0" for f in fields)


def render_sr_script(
    model: SrModel,
    run_token: str,
    chunk_index: int,
    files_uri: str,
    results_uri: str,
    limits: ChunkLimits | None = None,
    *,
    gpus: int = 1,
    streams_per_gpu: int = 1,
) -> str:
    """The bash script that runs `model` over the files listed at `files_uri` (see `chunk_list`), within `limits`
    (None: no limit but SSM's), in one slot of an instance with `gpus` GPUs each running `streams_per_gpu` streams.

    Slots: the instance has `gpus * streams_per_gpu` of them; the chunk takes any free one, slot k held with the lock
    `$TMPDIR/vod-sr.slot-<k>.lock` (flock) from its first model run to the end of its last, and its ffmpeg sees only
    GPU `k // streams_per_gpu` (`CUDA_VISIBLE_DEVICES`). The chunk's file list and first download come before the
    slot, its last measurements, contact sheet and upload after it: a chunk waiting with its input ready starts its
    model run within 0.25 s of a slot freeing, so with more chunks out than slots no GPU waits on S3 or on the
    orchestration. As many model runs go at once as there are slots (see `limits.lock_wait` for the wait). Every chunk
    sent to an instance must be rendered with the same `gpus` and `streams_per_gpu`: chunks that count the slots
    differently would share them wrongly.

    The payload stays small for any chunk size: the file list is read from S3. While ffmpeg runs on one file the
    next is downloaded and the previous uploaded, so the GPU does not wait on S3. The script goes on past a failed
    file, prints one tab-separated result line per file (`VODSR-RESULT index status bytes seconds stage
    source-media output-media qc`, see `parse_result_lines`) and exits non-zero if any file failed.

    Cancel and timeout kill the command's whole process group with SIGKILL, so nothing may wait for the end: the
    results at `results_uri` are rewritten as each file ends (an upload ends it), and the work directories killed
    chunks left behind are removed by the next chunk to take a slot (each live chunk holds a lock on its own
    `vod-sr.chunk.XXXXXXXX`, made and locked under `vod-sr.dirs.lock`; one whose lock is free is stale).

    Each output and its source are measured right after ffmpeg, with ffmpeg itself (every instance that runs a
    model has it; ffprobe is not always there): the first video stream's resolution, that stream's duration (read
    to its end by a stream copy, no decoding: the container's duration is its longest stream's, so a picture cut
    short under full-length copied audio would look whole) and the number of audio streams.

    Each uploaded output also gets a QC contact sheet, made in the same background step while the source is still
    on disk: one JPEG of the frame at the middle of the source's video, the source scaled plainly (bicubic) to the
    output's size beside the output, each as its 1:1 centre crop of at most 640x360 px (so the JPEG is 2 x min(640,
    output width) px wide and a few tens of KB). It goes to `s3://<results bucket>/vod-sr-runs/<run token>/qc/<file
    index>.jpg`. It never fails the file: each of its two steps (ffmpeg, upload) may take 60 s at most and no more
    than what is left of the budget, and where it could not be made or uploaded the result's qc field says why.

    Time limits (`budget.ChunkLimits`) are enforced here, not by SSM, whose clock starts before the chunk waits for
    a slot: the wait is bounded, from the script's start (on expiry every file not yet run fails, not started); the
    budget counts from taking the slot (before it, from the start: it bounds the first download too); each
    download and ffmpeg run is stopped at the budget's end (`timeout`, TERM then KILL), ffmpeg also at the per-file
    limit; no file starts once the budget is spent. Each file stopped or not started says which limit it
    met in its result's stage. Uploads of finished outputs are never cut.
    """
    for name, value in (("gpus", gpus), ("streams_per_gpu", streams_per_gpu)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    lines = [
        f"{script_header(run_token, chunk_index)} model {model.name}",
        "set -euo pipefail",
        *(_export_line(name, value) for name, value in model.env),
        f"run_token={shlex.quote(run_token)}",
        f"files_uri={shlex.quote(files_uri)}",
        f"results_uri={shlex.quote(results_uri)}",
        f"video_filter={shlex.quote(model.video_filter)}",
        _bash_array("output_args", list(model.output_args)),
        # Seconds; empty: no limit.
        f"lock_wait={_seconds(limits and limits.lock_wait)}",
        f"budget={_seconds(limits and limits.budget)}",
        f"file_limit={_seconds(limits and limits.file_limit)}",
        f"kill_grace={KILL_GRACE}",
        f"slots={gpus * streams_per_gpu}",
        f"streams_per_gpu={streams_per_gpu}",
        SR_LOOP,
    ]
    return "\n".join(lines)


def _seconds(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _extension(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    return name[name.rfind(".") :] if "." in name else ""


SR_LOOP = r"""
tmp=${TMPDIR:-/var/tmp}
trap 'exit 143' TERM INT
now_ms() { date +%s%3N; }
wait_end=$(($(now_ms) + ${lock_wait:-0} * 1000))
# Until a slot is taken, the budget counts from the start (it bounds the first download); then from taking it.
budget_end=$((SECONDS + ${budget:-0}))

# Cancel and timeout send SIGKILL, which runs no trap: the work directories killed chunks left are removed by the next
# chunk to take a slot (`sweep`). Each live chunk holds a lock on its own directory (fd 6); making and locking one, and
# sweeping, each happen under $tmp/vod-sr.dirs.lock, so a sweep never sees a directory not yet locked.
{
    flock 5
    workdir=$(mktemp -d "$tmp/vod-sr.chunk.XXXXXXXX")
    exec 6<"$workdir"
    flock -n 6
} 5>>"$tmp/vod-sr.dirs.lock"
sweep() {
    local stale k
    {
        flock 5
        for stale in "$tmp"/vod-sr.chunk.*/; do
            [ -d "$stale" ] || continue
            flock -n "$stale" rm -rf -- "$stale" 2>/dev/null || true
        done
        # Left by the scripts from before, which held a slot's lock (or, before the slots, vod-sr.lock) for their
        # whole run and worked in vod-sr.slot-<k>.XXXXXXXX (vod-sr.XXXXXXXX): once nothing holds that lock, stale.
        for ((k = 0; k < slots; k++)); do
            if [ "$k" = "$slot" ]; then  # held by this chunk now: no script from before is in it
                find "$tmp" -mindepth 1 -maxdepth 1 -type d -name "vod-sr.slot-$k.*" -exec rm -rf -- {} + || true
                continue
            fi
            { flock -n 7 && find "$tmp" -mindepth 1 -maxdepth 1 -type d -name "vod-sr.slot-$k.*" \
                -exec rm -rf -- {} +; } 7>>"$tmp/vod-sr.slot-$k.lock" || true
        done
        if [ -e "$tmp/vod-sr.lock" ]; then
            { flock -n 7 && find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'vod-sr.*' ! -name 'vod-sr.slot-*' \
                ! -name 'vod-sr.chunk.*' -exec rm -rf -- {} +; } 7>"$tmp/vod-sr.lock" || true
        fi
    } 5>>"$tmp/vod-sr.dirs.lock"
}
trap 'rm -rf -- "$workdir"' EXIT

# A slot is one GPU x one stream, slot k on GPU k / streams_per_gpu, held with the lock $tmp/vod-sr.slot-<k>.lock
# (fd 9) only while this chunk's model runs: from its first model run to the end of its last. Downloads before it,
# and the measurements, contact sheet and upload after it, run outside the slot, so another chunk's model runs there
# meanwhile. SSM's clock already runs while a chunk waits, so the wait is bounded (lock_wait, from the start).
slot_state=none  # none, held, released
take_slot() {  # returns non-zero when every slot is still held at the end of the wait
    local k left_ms
    while true; do
        for ((k = 0; k < slots; k++)); do
            exec 9>>"$tmp/vod-sr.slot-$k.lock"
            if flock -n 9; then
                slot=$k
                slot_state=held
                budget_end=$((SECONDS + ${budget:-0}))
                gpu=$((slot / streams_per_gpu))
                export CUDA_VISIBLE_DEVICES=$gpu
                echo "vod-sr: took slot $slot of $slots ($tmp/vod-sr.slot-$slot.lock): GPU $gpu" \
                    "(CUDA_VISIBLE_DEVICES=$gpu), stream $((slot % streams_per_gpu + 1)) of $streams_per_gpu" >&2
                sweep  # a chunk killed in a slot left its directory: the next one to take a slot removes it
                return 0
            fi
        done
        exec 9>&-
        if [ -n "$lock_wait" ]; then
            left_ms=$((wait_end - $(now_ms)))
            if [ "$left_ms" -le 0 ]; then
                echo "vod-sr: gave up waiting for a free slot after $lock_wait s: all $slots slot lock(s)" \
                    "$tmp/vod-sr.slot-{0..$((slots - 1))}.lock are held by the chunks ahead; no file was started" >&2
                return 1
            fi
        fi
        sleep 0.25  # a freed slot is taken within a quarter of a second, at a few flock runs per waiting chunk
    done
}

release_slot() {
    if [ "$slot_state" = held ]; then
        flock -u 9  # unlocks it also for the background steps that inherited fd 9
        exec 9>&-
        slot_state=released
    fi
}

files_path=${files_uri#s3://}
results_path=${results_uri#s3://}
aws s3api get-object --bucket="${files_path%%/*}" --key="${files_path#*/}" "$workdir/files" >/dev/null
mapfile -d '' fields <"$workdir/files"
count=$((${#fields[@]} / 5))
: >"$workdir/results"

save() {
    aws s3api put-object --bucket="${results_path%%/*}" --key="${results_path#*/}" --body "$workdir/results" >/dev/null
}

line() {  # index status bytes seconds stage source-media output-media qc (fields not given print empty)
    printf 'VODSR-RESULT\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" | tee -a "$workdir/results"
}

result() {
    line "$@"
    # Stored as each file ends, so a killed chunk still credits the files it finished.
    { flock 8 && save; } 8>"$workdir/results.lock" || touch "$workdir/unsaved"
}

remaining() {  # seconds left of the chunk's budget; empty: no budget
    [ -z "$budget" ] || echo $((budget_end - SECONDS))
}

limited() {  # seconds command...: TERM the command after `seconds`, KILL it after the grace; empty: no limit
    if [ -z "$1" ]; then
        shift
        "$@"
        return
    fi
    [ "$1" -gt 0 ] || return 124
    # --foreground keeps timeout and the command in this process group, which SSM's cancel and timeout kill whole.
    timeout --foreground --kill-after="$kill_grace" "$@"
}

probe() {  # file: WIDTHxHEIGHT VIDEO-SECONDS AUDIO-STREAMS ("-" where ffmpeg reports none)
    { ffmpeg -hide_banner -i "$1" -map 0:v:0 -c copy -f null -progress pipe:1 - </dev/null 2>&1 || true; } | awk '
        /^Output #/ { o = 1 }
        !o && !v && / Stream #.*: Video: / && match($0, /, [0-9]+x[0-9]+/) { v = substr($0, RSTART + 2, RLENGTH - 2) }
        !o && / Stream #.*: Audio: / { a++ }
        /^out_time=[0-9]/ { split(substr($0, 10), t, ":"); s = sprintf("%.2f", t[1] * 3600 + t[2] * 60 + t[3]) }
        END { printf "%s %s %d", v ? v : "-", s ? s : "-", a }'
}

fetch() {  # file number: download its source next to the work in progress, within the budget
    # User keys reach the CLI only inside s3:// URIs, never as option values.
    local base=$(($1 * 5))
    limited "$(remaining)" aws s3 cp --only-show-errors "s3://${fields[base + 1]}/${fields[base + 2]}" \
        "$workdir/input-$1" >"$workdir/download-$1.log" 2>&1 9>&-
}

qc_limit() {  # seconds one QC step may take: at most 60, and no more than what is left of the chunk's budget
    local left
    left=$(remaining)
    if [ -n "$left" ] && [ "$left" -lt 60 ]; then echo "$left"; else echo 60; fi
}

contact_sheet() {  # file number, source media, output media: make $workdir/qc-N.jpg; prints "" or "-" and why not
    # The middle frame of the source, scaled plainly (bicubic) to the output's size, beside the output's same frame:
    # the 1:1 centre crop (at most 640x360 px) of each, so the picture shows detail at output pixels in a few tens of
    # KB. Only for a person to look at: it never fails the file (every path prints a field and returns 0).
    local size seconds at width height crop code=0
    read -r size _ _ <<<"$3"
    if ! [[ $size =~ ^([0-9]+)x([0-9]+)$ ]]; then
        echo "-the output has no video stream"
        return 0
    fi
    width=${BASH_REMATCH[1]} height=${BASH_REMATCH[2]}
    crop="crop=$((width < 640 ? width : 640)):$((height < 360 ? height : 360))"
    read -r _ seconds _ <<<"$2"
    at=$(awk -v s="$seconds" 'BEGIN { printf "%.2f", s / 2 }')  # awk reads an unknown duration ("-") as 0
    limited "$(qc_limit)" ffmpeg -nostdin -hide_banner -loglevel error -ss "$at" -i "$workdir/input-$1" \
        -ss "$at" -i "$workdir/output-$1${fields[$1 * 5 + 4]}" -filter_complex \
        "[0:v:0]scale=$width:$height:flags=bicubic,setsar=1,${crop}[s];[1:v:0]setsar=1,${crop}[o];[s][o]hstack[v]" \
        -map '[v]' -frames:v 1 -q:v 5 -update 1 -y "$workdir/qc-$1.jpg" </dev/null >"$workdir/qc-$1.log" 2>&1 ||
        code=$?
    if [ "$code" -eq 0 ] && [ -s "$workdir/qc-$1.jpg" ]; then
        echo ""
    elif [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
        echo "-ffmpeg reached the time limit"
    else
        echo "vod-sr: no contact sheet for s3://${fields[$1 * 5 + 1]}/${fields[$1 * 5 + 2]}:" >&2
        tail -n 5 "$workdir/qc-$1.log" >&2
        echo "-ffmpeg could not make the frame"
    fi
    return 0
}

upload_sheet() {  # file number: upload $workdir/qc-N.jpg; prints its key or "-" and why not
    local key="vod-sr-runs/$run_token/qc/${fields[$1 * 5]}.jpg" code=0
    limited "$(qc_limit)" aws s3 cp --only-show-errors --content-type image/jpeg "$workdir/qc-$1.jpg" \
        "s3://${results_path%%/*}/$key" >"$workdir/qc-$1.log" 2>&1 || code=$?
    if [ "$code" -eq 0 ]; then
        echo "$key"
    elif [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
        echo "-upload reached the time limit"
    else
        echo "vod-sr: upload of the contact sheet $key failed:" >&2
        tail -n 5 "$workdir/qc-$1.log" >&2
        echo "-upload failed"
    fi
    return 0
}

upload() {  # file number, bytes, seconds
    local base=$(($1 * 5)) source_media output_media qc
    local output="$workdir/output-$1${fields[base + 4]}"
    source_media=$(probe "$workdir/input-$1")
    output_media=$(probe "$output")
    # Made while the source is still here; `||`: should it fail all the same, the file does not.
    qc=$(contact_sheet "$1" "$source_media" "$output_media") || qc="-the contact sheet step failed"
    rm -f -- "$workdir/input-$1"
    if aws s3 cp --only-show-errors --metadata "vod-sr-run=$run_token" "$output" "${fields[base + 3]}" \
            2>"$workdir/upload-$1.log"; then
        if [ -z "$qc" ]; then
            qc=$(upload_sheet "$1") || qc="-upload failed"
        fi
        result "${fields[base]}" ok "$2" "$3" "" "$source_media" "$output_media" "$qc"
    else
        echo "vod-sr: upload to ${fields[base + 3]} failed:" >&2
        tail -n 5 "$workdir/upload-$1.log" >&2
        result "${fields[base]}" failed "$2" "$3" upload "$source_media" "$output_media" ""
    fi
    rm -f -- "$output" "$workdir/qc-$1.jpg"
}

upload_pid=""
if [ "$count" -gt 0 ]; then
    fetch 0 &
    fetch_pid=$!
fi
for ((n = 0; n < count; n++)); do
    base=$((n * 5))
    source_uri="s3://${fields[base + 1]}/${fields[base + 2]}"
    fetched=0
    wait "$fetch_pid" || fetched=$?
    left=$(remaining)
    if [ -n "$left" ] && { [ "$left" -le 0 ] || [ "$fetched" -eq 124 ] || [ "$fetched" -eq 137 ]; }; then
        echo "vod-sr: chunk budget of $budget s reached; $((count - n)) file(s) not started" >&2
        rm -f -- "$workdir/input-$n"
        for ((; n < count; n++)); do
            line "${fields[n * 5]}" failed 0 0 "ffmpeg (not started: chunk budget $budget s reached)"
        done
        touch "$workdir/unsaved"
        break
    fi
    if [ "$fetched" -eq 0 ] && [ "$slot_state" = none ] && ! take_slot; then
        rm -f -- "$workdir/input-$n"
        for ((; n < count; n++)); do
            line "${fields[n * 5]}" failed 0 0 "ffmpeg (not started: waited $lock_wait s for a free slot)"
        done
        touch "$workdir/unsaved"
        break
    fi
    left=$(remaining)
    if ((n + 1 < count)); then
        fetch $((n + 1)) &
        fetch_pid=$!
    fi
    if [ "$fetched" -ne 0 ]; then
        echo "vod-sr: download of $source_uri failed:" >&2
        tail -n 5 "$workdir/download-$n.log" >&2
        result "${fields[base]}" failed 0 0 download
        continue
    fi
    limit=$file_limit why="per-file limit $file_limit s reached"
    if [ -n "$left" ] && { [ -z "$limit" ] || [ "$left" -lt "$limit" ]; }; then
        limit=$left why="chunk budget $budget s reached"
    fi
    started=$SECONDS
    output="$workdir/output-$n${fields[base + 4]}"
    code=0
    # VOD_SR_SR_RUN marks the model's run (not the measurements or the contact sheet) for whoever watches the GPU.
    VOD_SR_SR_RUN=1 limited "$limit" ffmpeg -y -i "$workdir/input-$n" -vf "$video_filter" "${output_args[@]}" \
        "$output" </dev/null >"$workdir/ffmpeg.log" 2>&1 || code=$?
    if ((n + 1 == count)); then
        release_slot  # the last model run of this chunk: the next chunk's may start while this one uploads
    fi
    if [ "$code" -ne 0 ]; then
        stage=ffmpeg
        if [ -n "$limit" ] && [ $((SECONDS - started)) -ge "$limit" ]; then
            stage="ffmpeg ($why)"
            echo "vod-sr: ffmpeg stopped for $source_uri: $why" >&2
        else
            echo "vod-sr: ffmpeg failed for $source_uri:" >&2
            tail -n 20 "$workdir/ffmpeg.log" >&2
        fi
        result "${fields[base]}" failed 0 "$((SECONDS - started))" "$stage"
        rm -f -- "$workdir/input-$n" "$output"
        continue
    fi
    bytes=$(stat -c %s "$output")
    if [ -n "$upload_pid" ]; then
        wait "$upload_pid" || true
    fi
    upload "$n" "$bytes" "$((SECONDS - started))" 9>&- &
    upload_pid=$!
done
release_slot
if [ -n "$upload_pid" ]; then
    wait "$upload_pid" || true
fi
if [ -e "$workdir/unsaved" ]; then
    save
fi
failed=$(grep -c "$(printf '\tfailed\t')" "$workdir/results" || true)
if [ "$failed" -gt 0 ]; then
    echo "vod-sr: $failed of $count file(s) failed" >&2
    exit 1
fi
"""


def parse_result_lines(stdout: str) -> dict[int, dict[str, object]]:
    """The per-file result lines a chunk script printed or stored, keyed by file index.

    `source_media` and `output_media` are the script's measurements (`WIDTHxHEIGHT SECONDS AUDIO-STREAMS`, see
    `verify.Media`), empty when the file failed before they were taken or the line predates them.

    `qc` is the contact sheet's field as printed: its S3 key (in the results' bucket) when it was uploaded; `-` and
    why not when it could not be made or uploaded (keys under `vod-sr-runs/` never start with `-`); empty when the
    file failed; None for a line from before contact sheets (8 fields, or 6 from before the measurements).
    """
    results: dict[int, dict[str, object]] = {}
    for line in stdout.splitlines():
        parts = line.split("\t")
        if len(parts) in (6, 8, 9) and parts[0] == RESULT_MARKER and parts[1].isdigit():
            results[int(parts[1])] = {
                "status": parts[2],
                "bytes": int(parts[3]) if parts[3].isdigit() else 0,
                "seconds": int(parts[4]) if parts[4].isdigit() else 0,
                "stage": parts[5],
                "source_media": parts[6] if len(parts) >= 8 else "",
                "output_media": parts[7] if len(parts) >= 8 else "",
                "qc": parts[8] if len(parts) == 9 else None,
            }
    return results
