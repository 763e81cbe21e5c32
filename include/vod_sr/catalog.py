"""The super-resolution models: what ffmpeg runs on the instance for each one.

Models A and B reproduce the vendor's console scripts (the seed procedure) exactly: the same environment and the
same ffmpeg filter and encoder arguments. `cpu` runs anywhere ffmpeg with libx264 exists (the local emulator,
machines without the vendor filters). Operators add models without a code change through a JSON Airflow Variable
(see `parse_custom_models`).

A model is code that runs as root on the GPU instance, so every model is checked against what an SR model needs:
its environment may set only the vendor runtime's variables, its output arguments only encoder settings, and its
filtergraph may use no filter that reads or writes files, loads plugins or listens for commands.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ModelError(ValueError):
    """A model is unknown or its definition is invalid."""


# The Bluewhale AMI's runtime environment, in the seed's order. `$NAME` expands when the script runs.
BLUEWHALE_ENV: tuple[tuple[str, str], ...] = (
    ("ONNX_DIR", "/usr/local/bluedot/models/"),
    ("LD_LIBRARY_PATH", "/usr/local/cuda/lib64:/usr/local/bluedot/:/usr/local/TensorRT/lib:$LD_LIBRARY_PATH"),
    ("PATH", "/usr/local/bluedot:$PATH"),
    ("LD_LIBRARY_PATH", "/etc/neura-vortex/nvx_packages/plugins/libs:$LD_LIBRARY_PATH"),
    ("PYTHONPATH", "/etc/neura-vortex/libs/python3.10/site-packages"),
    ("VSSCRIPT_PATH", "/etc/neura-vortex/nvx_packages/plugins/scripts"),
    ("VSPREFIX", "/etc/neura-vortex"),
    ("PATH", "$PATH:/etc/neura-vortex/bin"),
    ("VAPOURSYNTH_CONF_PATH", "/etc/neura-vortex/vapoursynth.conf"),
)
NVENC_OUTPUT_ARGS: tuple[str, ...] = ("-c:v", "h264_nvenc", "-cq", "13", "-c:a", "copy")

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Env values may reference other variables ($NAME or ${NAME}) but nothing else the shell would interpret.
ENV_VALUE = re.compile(r"^(?:[^$`\"\\\n]|\$[A-Za-z_][A-Za-z0-9_]*|\$\{[A-Za-z_][A-Za-z0-9_]*\})*$")

# An allow-list, not a deny-list: the names that change how bash, the dynamic loader, glibc, Python, OpenSSL, the AWS
# CLI, CUDA or ffmpeg behave (TMPDIR moves the instance lock, LD_PRELOAD, BASH_ENV, AWS_*, CUDA_VISIBLE_DEVICES,
# FFREPORT, HTTPS_PROXY, ...) have no end, while the vendor's models need exactly these. A new one is a reviewed
# code change.
MODEL_ENV_NAMES = frozenset(
    {"ONNX_DIR", "LD_LIBRARY_PATH", "PATH", "PYTHONPATH", "VSSCRIPT_PATH", "VSPREFIX", "VAPOURSYNTH_CONF_PATH"}
)

# ffmpeg output options that set how the output is encoded, each followed by its value; a stream specifier may follow
# the name (`-c:v`, `-b:a:0`). Left out on purpose: everything that names a file, an input, a filter, a muxer or a
# log (-i, -f, -vf, -filter*, -attach, -passlogfile, -progress, -report, -y, ...) and `-/name`, which loads a value
# from a file.
ENCODER_OPTIONS = frozenset(
    {
        *("c", "codec", "vcodec", "acodec", "b", "maxrate", "minrate", "bufsize", "rc", "crf", "cq", "qp", "q"),
        *("qscale", "qmin", "qmax", "preset", "tune", "profile", "level", "tier", "pix_fmt", "g", "bf", "refs"),
        *("keyint_min", "sc_threshold", "rc-lookahead", "spatial-aq", "temporal-aq", "aq-strength", "b_ref_mode"),
        *("multipass", "r", "aspect", "color_primaries", "color_trc", "colorspace", "color_range", "threads"),
        *("ar", "ac", "sample_fmt", "movflags", "tag", "metadata", "disposition", "map", "map_metadata"),
        "map_chapters",
    }
)
ENCODER_FLAGS = frozenset({"an", "sn", "dn"})  # options without a value: drop audio, subtitle, data streams
OUTPUT_OPTION = re.compile(r"^-(?P<name>[A-Za-z0-9_-]+)(?::[A-Za-z0-9:]{1,16})?$")
MAX_OUTPUT_ARGS = 48
MAX_OUTPUT_VALUE = 64
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
RATIO = re.compile(r"^\d+(?:\.\d+)?/\d+(?:\.\d+)?$")  # -r 30000/1001, -aspect 16/9

# Filters that read or write files (also when the graph then fails to link: ffmpeg opens them while creating the
# filter), load plugins or models, or take commands at run time. Every filter of the ffmpeg build in the dev
# environment with a file option is here (tests/vod_sr/test_catalog.py checks), plus those of other builds.
FILE_FILTERS = frozenset(
    {
        *("movie", "amovie", "subtitles", "ass", "drawtext", "qrencode", "qrencodesrc", "drawvg"),
        *("sendcmd", "asendcmd", "zmq", "azmq", "frei0r", "frei0r_src", "ladspa", "lv2", "ocr", "lensfun"),
        *("dnn_processing", "dnn_classify", "dnn_detect", "sr", "derain", "arnndn", "whisper", "asr", "sofalizer"),
        *("lut1d", "lut3d", "curves", "selectivecolor", "nnedi", "fieldhint", "fsync", "cellauto", "life"),
        *("removelogo", "find_rect", "cover_rect", "deshake", "vidstabdetect", "vidstabtransform", "signature"),
        *("psnr", "ssim", "ssim360", "xpsnr", "vmafmotion", "libvmaf", "metadata", "ametadata", "paletteuse"),
        *("firequalizer", "loudnorm", "libplacebo", "showcqt", "program_opencl", "openclsrc", "xfade_opencl"),
        *("coreimage", "coreimagesrc"),
    }
)
# Option names that name a file in any filter, for filters this list does not know (a vendor's).
FILE_OPTION_KEYS = frozenset({"file", "filename", "textfile", "fontfile", "stats_file", "log_path", "dumpfile"})
MAX_VIDEO_FILTER = 512
FILTER_LABEL = re.compile(r"\[[A-Za-z0-9_]+\]")
FILTER_NAME = re.compile(r"^(?P<filter>[A-Za-z0-9_]+)(?:@[A-Za-z0-9_]+)?$")
FILTER_OPTION_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class SrModel:
    """One SR model: `ffmpeg -y -i IN -vf <video_filter> <output_args...> OUT` run under `env`."""

    name: str
    title: str
    video_filter: str
    output_args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    scale: float = 2.0  # output width and height over the source's: verify checks each output's resolution by it

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not 0 < self.scale <= 16:
            raise ModelError(f"{where}: scale must be a number above 0 and at most 16, got {self.scale!r}")
        if not MODEL_NAME.match(self.name):
            raise ModelError(f"{where}: name must match {MODEL_NAME.pattern}")
        if not self.title.strip():
            raise ModelError(f"{where}: title is empty")
        if not self.video_filter.strip():
            raise ModelError(f"{where}: video_filter is empty")
        if not all(isinstance(arg, str) and arg for arg in self.output_args):
            raise ModelError(f"{where}: output_args must be non-empty strings")
        for name, value in self.env:
            if not ENV_NAME.match(name):
                raise ModelError(f"{where}: environment name {name!r} is not a valid shell variable name")
            if name not in MODEL_ENV_NAMES:
                raise ModelError(
                    f"{where}: environment name {name!r} is not allowed; a model may set only "
                    f"{', '.join(sorted(MODEL_ENV_NAMES))} (other variables can change how the shell, the loader, "
                    "the instance lock or the AWS CLI behave)"
                )
            if not ENV_VALUE.match(value):
                raise ModelError(
                    f"{where}: environment value for {name} may reference $VARIABLES but must not contain "
                    f"quotes, backticks, backslashes or newlines: {value!r}"
                )
        _check_output_args(where, self.output_args)
        _check_video_filter(where, self.video_filter)

    def to_xcom(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "video_filter": self.video_filter,
            "output_args": list(self.output_args),
            "env": [list(pair) for pair in self.env],
            "scale": self.scale,
        }

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> SrModel:
        return cls(
            name=data["name"],
            title=data["title"],
            video_filter=data["video_filter"],
            output_args=tuple(data["output_args"]),
            env=tuple((name, value) for name, value in data["env"]),
            scale=data.get("scale", 2.0),
        )


def _check_output_args(where: str, args: tuple[str, ...]) -> None:
    """Encoder settings only: `-option value` pairs and value-less flags. ffmpeg writes any other argument that does
    not start with `-` as an extra output file, so a value must follow the option that takes it."""
    if len(args) > MAX_OUTPUT_ARGS:
        raise ModelError(f"{where}: output_args has {len(args)} arguments; at most {MAX_OUTPUT_ARGS} are allowed")
    position = 0
    while position < len(args):
        arg = args[position]
        if not arg.startswith("-"):
            raise ModelError(
                f"{where}: output_args {arg!r} follows no option that takes a value; ffmpeg would write it as an "
                "extra output file"
            )
        option = OUTPUT_OPTION.match(arg)
        if option is None or option["name"] not in ENCODER_OPTIONS | ENCODER_FLAGS:
            allowed = ", ".join(f"-{name}" for name in sorted(ENCODER_OPTIONS | ENCODER_FLAGS))
            raise ModelError(f"{where}: output_args option {arg!r} is not an allowed encoder setting ({allowed})")
        if option["name"] in ENCODER_FLAGS:
            position += 1
            continue
        if position + 1 == len(args):
            raise ModelError(f"{where}: output_args option {arg!r} has no value")
        value = args[position + 1]
        if (
            len(value) > MAX_OUTPUT_VALUE
            or not value.isprintable()
            or ".." in value
            or URL_SCHEME.match(value)
            or ("/" in value and not RATIO.match(value))
        ):
            raise ModelError(
                f"{where}: output_args value {value!r} of {arg} must be a setting of at most {MAX_OUTPUT_VALUE} "
                "printable characters, not a path or URL (no '/' except in a ratio such as 30000/1001, no '..', "
                "no 'scheme:')"
            )
        position += 2


def _check_video_filter(where: str, graph: str) -> None:
    """No filter that touches files, loads code or takes commands; no option value that is a path outside the working
    directory; no `/option=`, which loads the option's value from a file."""
    if len(graph) > MAX_VIDEO_FILTER or not graph.isascii() or not graph.isprintable():
        raise ModelError(f"{where}: video_filter must be at most {MAX_VIDEO_FILTER} printable ASCII characters")
    if "\\" in graph:
        raise ModelError(f"{where}: video_filter must not contain backslash escapes (quote with '...'): {graph!r}")
    try:
        filters = parse_filtergraph(graph)
    except ValueError as error:
        raise ModelError(f"{where}: video_filter {graph!r}: {error}") from None
    for name, options in filters:
        if name in FILE_FILTERS:
            raise ModelError(
                f"{where}: video_filter uses {name!r}, a filter that reads or writes files, loads code or takes "
                "commands; it is not allowed in a model"
            )
        for item in options.split(":"):
            key, has_key, value = item.partition("=")
            key, value = (key.strip(), value.strip()) if has_key else ("", key.strip())
            if has_key and not FILTER_OPTION_KEY.match(key):
                raise ModelError(
                    f"{where}: video_filter option name {key!r} of {name} is not a plain name (a leading '/' "
                    "would load the value from a file)"
                )
            if key in FILE_OPTION_KEYS:
                raise ModelError(f"{where}: video_filter option {key}= of {name} names a file; it is not allowed")
            if value.startswith("/") or ".." in value:
                raise ModelError(
                    f"{where}: video_filter value {value!r} of {name} looks like a path outside the working "
                    "directory (starts with '/' or contains '..')"
                )


def parse_filtergraph(graph: str) -> list[tuple[str, str]]:
    """Each filter's name and its options as ffmpeg reads them (quotes removed), for ffmpeg's graph syntax without
    backslash escapes: filters separated by `,` or `;`, each `[label]... name[@id][=options] [label]...`.

    Raises ValueError for anything else, so that the names checked are the filters ffmpeg creates: `'movie'=x`
    is the movie filter to ffmpeg, and `sws_flags=` at the start of a graph is read without quoting rules.
    """
    filters = []
    position = 0
    while True:
        position = _skip_labels(graph, position)
        end = position
        while end < len(graph) and graph[end] not in "=,;[":
            end += 1
        name = FILTER_NAME.match(graph[position:end].strip())
        if name is None:
            raise ValueError(f"filter name {graph[position:end].strip()!r} is not a plain name")
        if name["filter"] == "sws_flags":
            raise ValueError("sws_flags is not supported; give scale its flags= option")
        position, options = end, []
        if position < len(graph) and graph[position] == "=":
            position += 1
            while position < len(graph) and graph[position] not in "[],;":
                if graph[position] == "'":
                    closing = graph.find("'", position + 1)
                    if closing < 0:
                        raise ValueError("a quote is not closed")
                    options.append(graph[position + 1 : closing])
                    position = closing + 1
                else:
                    options.append(graph[position])
                    position += 1
        filters.append((name["filter"], "".join(options)))
        position = _skip_labels(graph, position)
        if position == len(graph):
            return filters
        if graph[position] not in ",;":
            raise ValueError(f"unexpected {graph[position]!r} at position {position}")
        position += 1


def _skip_labels(graph: str, position: int) -> int:
    """Past the whitespace and `[label]`s at `position`; labels must be plain names."""
    while True:
        while position < len(graph) and graph[position].isspace():
            position += 1
        if position == len(graph) or graph[position] != "[":
            return position
        label = FILTER_LABEL.match(graph, position)
        if label is None:
            raise ValueError(f"link label at position {position} is not a plain [name]")
        position = label.end()


BUILTIN_MODELS: dict[str, SrModel] = {
    model.name: model
    for model in (
        SrModel(
            name="A",
            title="Model A: Bluewhale denoise + SR + film grain (GPU)",
            video_filter="bdnvx_aws,bdsr_coupang_aws,noise=c0s=8:allf=t+u",
            output_args=NVENC_OUTPUT_ARGS,
            env=BLUEWHALE_ENV,
            scale=2.0,
        ),
        SrModel(
            name="B",
            title="Model B: Bluewhale SR (GPU)",
            video_filter="bdsr_coupang_aws",
            output_args=NVENC_OUTPUT_ARGS,
            env=BLUEWHALE_ENV,
            scale=2.0,
        ),
        SrModel(
            name="cpu",
            title="CPU: lanczos 2x + libx264 (no vendor filters needed)",
            video_filter="scale=iw*2:ih*2:flags=lanczos",
            output_args=("-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-c:a", "copy"),
            scale=2.0,
        ),
    )
}


def _model_from_json(name: str, spec: Any) -> SrModel:
    where = f"model {name!r}"
    if not isinstance(spec, Mapping):
        raise ModelError(f"{where}: definition must be a JSON object, got {type(spec).__name__}")
    unknown = set(spec) - {"title", "video_filter", "output_args", "env", "scale"}
    if unknown:
        raise ModelError(f"{where}: unknown fields {sorted(unknown)}")
    output_args = spec.get("output_args", [])
    env = spec.get("env", {})
    if not isinstance(output_args, list):
        raise ModelError(f"{where}: output_args must be a list of strings")
    if not isinstance(env, Mapping) or not all(isinstance(v, str) for v in env.values()):
        raise ModelError(f"{where}: env must be an object of string values")
    return SrModel(
        name=name,
        title=str(spec.get("title", "")),
        video_filter=str(spec.get("video_filter", "")),
        output_args=tuple(output_args),
        env=tuple(env.items()),
        scale=spec.get("scale", 2.0),
    )


def parse_custom_models(raw: str | None) -> dict[str, SrModel]:
    """Parse the operators' JSON Variable: `{"C": {"title", "video_filter", "output_args", "env", "scale"}}` (scale:
    the output's size over the source's, default 2)."""
    if raw is None or not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ModelError(f"custom models are not valid JSON: {error}") from None
    if not isinstance(data, Mapping):
        raise ModelError("custom models must be a JSON object mapping model name to definition")
    models = {}
    for name, spec in data.items():
        if name in BUILTIN_MODELS:
            raise ModelError(f"model {name!r} is built in; give the custom model another name")
        models[name] = _model_from_json(name, spec)
    return models


def available_models(custom_json: str | None = None) -> dict[str, SrModel]:
    """Built-in models plus the operators' custom ones."""
    return {**BUILTIN_MODELS, **parse_custom_models(custom_json)}


def resolve_model(name: str, custom_json: str | None = None) -> SrModel:
    """The model called `name`, or a ModelError that lists the known ones."""
    models = available_models(custom_json)
    try:
        return models[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(models))}") from None
