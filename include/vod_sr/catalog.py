"""The super-resolution models: what ffmpeg runs on the instance for each one.

Models A and B reproduce the vendor's console scripts (the seed procedure) exactly: the same environment and the
same ffmpeg filter and encoder arguments. `cpu` runs anywhere ffmpeg with libx264 exists (the local emulator,
machines without the vendor filters). Operators add models without a code change through a JSON Airflow Variable
(see `parse_custom_models`).
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


@dataclass(frozen=True)
class SrModel:
    """One SR model: `ffmpeg -y -i IN -vf <video_filter> <output_args...> OUT` run under `env`."""

    name: str
    title: str
    video_filter: str
    output_args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
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
            if not ENV_VALUE.match(value):
                raise ModelError(
                    f"{where}: environment value for {name} may reference $VARIABLES but must not contain "
                    f"quotes, backticks, backslashes or newlines: {value!r}"
                )

    def to_xcom(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "video_filter": self.video_filter,
            "output_args": list(self.output_args),
            "env": [list(pair) for pair in self.env],
        }

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> SrModel:
        return cls(
            name=data["name"],
            title=data["title"],
            video_filter=data["video_filter"],
            output_args=tuple(data["output_args"]),
            env=tuple((name, value) for name, value in data["env"]),
        )


BUILTIN_MODELS: dict[str, SrModel] = {
    model.name: model
    for model in (
        SrModel(
            name="A",
            title="Model A: Bluewhale denoise + SR + film grain (GPU)",
            video_filter="bdnvx_aws,bdsr_coupang_aws,noise=c0s=8:allf=t+u",
            output_args=NVENC_OUTPUT_ARGS,
            env=BLUEWHALE_ENV,
        ),
        SrModel(
            name="B",
            title="Model B: Bluewhale SR (GPU)",
            video_filter="bdsr_coupang_aws",
            output_args=NVENC_OUTPUT_ARGS,
            env=BLUEWHALE_ENV,
        ),
        SrModel(
            name="cpu",
            title="CPU: lanczos 2x + libx264 (no vendor filters needed)",
            video_filter="scale=iw*2:ih*2:flags=lanczos",
            output_args=("-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-c:a", "copy"),
        ),
    )
}


def _model_from_json(name: str, spec: Any) -> SrModel:
    where = f"model {name!r}"
    if not isinstance(spec, Mapping):
        raise ModelError(f"{where}: definition must be a JSON object, got {type(spec).__name__}")
    unknown = set(spec) - {"title", "video_filter", "output_args", "env"}
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
    )


def parse_custom_models(raw: str | None) -> dict[str, SrModel]:
    """Parse the operators' JSON Variable: `{"C": {"title", "video_filter", "output_args", "env"}}`."""
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
