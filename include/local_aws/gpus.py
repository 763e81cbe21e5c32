"""The emulated instances' GPUs: how many an instance type has, a stand-in `nvidia-smi` that lists them, and a
stand-in `ffmpeg` that records when each GPU ran a model.

The agent puts both stand-ins first in the PATH of an instance's commands (`install_stand_ins`), so the real chunk
script detects the instance's GPUs as on EC2 and the timeline shows each GPU's busy intervals (`read_gpu_busy`). The
GPU a model run used is the `CUDA_VISIBLE_DEVICES` the chunk script set for its slot; a run is the ffmpeg call the
script marks with `VOD_SR_SR_RUN=1` (not its measurements or contact sheets, which run ffmpeg too).
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

# GPUs per instance type: the g6e family (NVIDIA L40S); any type not listed has none.
GPUS_BY_INSTANCE_TYPE = {
    "g6e.xlarge": 1,
    "g6e.2xlarge": 1,
    "g6e.4xlarge": 1,
    "g6e.8xlarge": 1,
    "g6e.16xlarge": 1,
    "g6e.12xlarge": 4,
    "g6e.24xlarge": 4,
    "g6e.48xlarge": 8,
}
GPU_NAME = "NVIDIA L40S"
GPU_BUSY_LOG = "gpu-busy.log"  # in the instance's sandbox: one "<CUDA_VISIBLE_DEVICES> <start> <end>" line per run
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA "
    "driver is installed and running."
)


def gpu_count(instance_type: str | None) -> int:
    return GPUS_BY_INSTANCE_TYPE.get(instance_type or "", 0)


def gpu_uuid(instance_id: str, index: int) -> str:
    digest = hashlib.sha1(f"{instance_id}/{index}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def nvidia_smi_stand_in(instance_id: str, gpus: int) -> str:
    """`nvidia-smi -L` lists the GPUs as the real one does; without GPUs it fails as a driverless instance's does
    (a GPU AMI on a type without a GPU). Other arguments print the list too: nothing else is emulated."""
    if gpus == 0:
        return f"#!/bin/sh\necho {shlex.quote(NO_DRIVER)}\nexit 9\n"
    lines = " ".join(shlex.quote(f"GPU {k}: {GPU_NAME} (UUID: {gpu_uuid(instance_id, k)})") for k in range(gpus))
    return f"#!/bin/sh\n# Stand-in: this emulated instance's {gpus} GPU(s)\nprintf '%s\\n' {lines}\n"


def ffmpeg_stand_in(real_ffmpeg: str, busy_log: Path, model_run_seconds: float | None = None) -> str:
    """Runs the real ffmpeg; for a model run (VOD_SR_SR_RUN=1) it appends `<CUDA_VISIBLE_DEVICES or -> <start>
    <end>` (epoch seconds) to `busy_log` when ffmpeg ends, however it ends. It passes TERM and INT on to ffmpeg, so
    the chunk script's `timeout --foreground` (which signals only its own child) still stops ffmpeg at a limit.

    `model_run_seconds`: a model run lasts that long at least, as on a GPU of fixed speed: the real ffmpeg runs
    niced (the host's CPUs go to the orchestration first), then the stand-in sleeps out the rest; a signal ends the
    sleep too."""
    real, log = shlex.quote(real_ffmpeg), shlex.quote(str(busy_log))
    pace = "" if model_run_seconds is None else f"{float(model_run_seconds):.3f}"
    return f"""#!/bin/bash
# Stand-in: the real ffmpeg, timed per GPU for the emulator's timeline{" and paced to a GPU" if pace else ""}.
if [ -z "${{VOD_SR_SR_RUN:-}}" ]; then
    exec {real} "$@"
fi
start=$(date +%s.%N)
pace={pace}
if [ -n "$pace" ]; then
    nice -n 10 {real} "$@" &
else
    {real} "$@" &
fi
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM
trap 'kill -INT "$child" 2>/dev/null' INT
code=0
wait "$child" || code=$?
while kill -0 "$child" 2>/dev/null; do  # a signal ended the wait, not ffmpeg
    code=0
    wait "$child" || code=$?
done
if [ -n "$pace" ] && [ "$code" -eq 0 ]; then
    rest=$(awk -v s="$start" -v p="$pace" -v n="$(date +%s.%N)" \
        'BEGIN {{ r = s + p - n; printf "%.3f", (r > 0 ? r : 0) }}')
    sleep "$rest" &
    child=$!
    wait "$child" || true
    kill "$child" 2>/dev/null || true
fi
printf '%s %s %s\\n' "${{CUDA_VISIBLE_DEVICES:--}}" "$start" "$(date +%s.%N)" >>{log}
exit "$code"
"""


def install_stand_ins(
    sandbox: Path,
    instance_id: str,
    instance_type: str | None,
    real_ffmpeg: str,
    *,
    model_run_seconds: float | None = None,
) -> Path:
    """Write the instance's `nvidia-smi` and `ffmpeg` stand-ins into `sandbox/bin` (again before each command: the
    type of a stopped instance can change, and so can its faults' `model_run_seconds`) and return that directory, to
    go first in the command's PATH."""
    bin_dir = sandbox / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    stand_ins = {
        "nvidia-smi": nvidia_smi_stand_in(instance_id, gpu_count(instance_type)),
        "ffmpeg": ffmpeg_stand_in(real_ffmpeg, sandbox / GPU_BUSY_LOG, model_run_seconds),
    }
    for name, body in stand_ins.items():
        path = bin_dir / name
        if not path.exists() or path.read_text() != body:
            staged = bin_dir / f".{name}.new"
            staged.write_text(body)
            staged.chmod(0o755)
            staged.replace(path)  # atomic: a command of the instance already running never sees half a script
    return bin_dir


def read_gpu_busy(sandbox: Path) -> dict[str, list[list[float]]]:
    """The instance's model runs per GPU (its CUDA_VISIBLE_DEVICES, "-" when unset): [[start, end], ...] in epoch
    seconds, in the order they ended."""
    busy: dict[str, list[list[float]]] = {}
    log = sandbox / GPU_BUSY_LOG
    if not log.exists():
        return busy
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # a line still being written
        try:
            start, end = float(parts[1]), float(parts[2])
        except ValueError:
            continue
        busy.setdefault(parts[0], []).append([start, end])
    return busy
