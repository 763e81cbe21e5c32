from __future__ import annotations

import json
import subprocess

import pytest

from include.vod_sr.catalog import BUILTIN_MODELS, ModelError, available_models, parse_custom_models, resolve_model
from include.vod_sr.script import _export_line

# The seed procedure's Model A / Model B scripts, verbatim.
SEED_EXPORTS = """\
export ONNX_DIR=/usr/local/bluedot/models/
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/bluedot/:/usr/local/TensorRT/lib:$LD_LIBRARY_PATH
export PATH=/usr/local/bluedot:$PATH
export LD_LIBRARY_PATH=/etc/neura-vortex/nvx_packages/plugins/libs:$LD_LIBRARY_PATH
export PYTHONPATH=/etc/neura-vortex/libs/python3.10/site-packages
export VSSCRIPT_PATH=/etc/neura-vortex/nvx_packages/plugins/scripts
export VSPREFIX=/etc/neura-vortex
export PATH=$PATH:/etc/neura-vortex/bin
export VAPOURSYNTH_CONF_PATH=/etc/neura-vortex/vapoursynth.conf
"""
SEED_ENV_NAMES = [
    "ONNX_DIR",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "VSSCRIPT_PATH",
    "VSPREFIX",
    "VAPOURSYNTH_CONF_PATH",
    "PATH",
]


def _environment_after(exports: str) -> dict[str, str]:
    """Run exports in bash from a fixed starting environment and read back the variables the seed sets."""
    script = exports + "\n" + "".join(f'printf "%s=%s\\0" {n} "${n}"\n' for n in SEED_ENV_NAMES)
    out = subprocess.run(
        ["bash", "-c", script],
        env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/opt/lib"},
        capture_output=True,
        check=True,
    ).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if item)


class TestBuiltinModels:
    @pytest.mark.parametrize(
        ("name", "video_filter"),
        [("A", "bdnvx_aws,bdsr_coupang_aws,noise=c0s=8:allf=t+u"), ("B", "bdsr_coupang_aws")],
    )
    def test_vendor_models_match_the_seed_command(self, name, video_filter):
        model = BUILTIN_MODELS[name]

        assert model.video_filter == video_filter
        assert model.output_args == ("-c:v", "h264_nvenc", "-cq", "13", "-c:a", "copy")

    @pytest.mark.parametrize("name", ["A", "B"])
    def test_vendor_environment_is_the_seed_environment(self, name):
        rendered = "\n".join(_export_line(n, v) for n, v in BUILTIN_MODELS[name].env)

        assert _environment_after(rendered) == _environment_after(SEED_EXPORTS)

    def test_vendor_environment_survives_set_u_when_variables_are_unset(self):
        rendered = "set -u\n" + "\n".join(_export_line(n, v) for n, v in BUILTIN_MODELS["A"].env)

        result = subprocess.run(["bash", "-c", rendered], env={"PATH": "/usr/bin:/bin"}, capture_output=True)

        assert result.returncode == 0, result.stderr

    @pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
    def test_round_trips_through_xcom(self, name):
        model = BUILTIN_MODELS[name]

        assert type(model).from_xcom(json.loads(json.dumps(model.to_xcom()))) == model

    def test_cpu_model_needs_no_vendor_filters(self):
        model = BUILTIN_MODELS["cpu"]

        assert "bd" not in model.video_filter
        assert "libx264" in model.output_args
        assert model.env == ()


class TestCustomModels:
    VALID = {
        "C": {
            "title": "Model C: SR + sharpen",
            "video_filter": "bdsr_coupang_aws,unsharp",
            "output_args": ["-c:v", "h264_nvenc", "-cq", "18"],
            "env": {"ONNX_DIR": "/opt/models/", "PATH": "/opt/bin:$PATH"},
        }
    }

    def test_operator_model_is_added_next_to_builtins(self):
        models = available_models(json.dumps(self.VALID))

        assert set(models) == {"A", "B", "cpu", "C"}
        assert models["C"].env == (("ONNX_DIR", "/opt/models/"), ("PATH", "/opt/bin:$PATH"))

    def test_no_variable_means_builtins_only(self):
        assert available_models(None) == BUILTIN_MODELS
        assert parse_custom_models("  ") == {}

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            pytest.param("{not json", "not valid JSON", id="bad-json"),
            pytest.param("[]", "JSON object", id="not-an-object"),
            pytest.param('{"A": {"title": "x", "video_filter": "y"}}', "built in", id="redefines-builtin"),
            pytest.param('{"bad name!": {"title": "x", "video_filter": "y"}}', "name must match", id="bad-name"),
            pytest.param('{"C": {"title": "x"}}', "video_filter is empty", id="no-filter"),
            pytest.param('{"C": {"title": "x", "video_filter": "y", "gpu": 1}}', "unknown fields", id="unknown-field"),
            pytest.param(
                '{"C": {"title": "x", "video_filter": "y", "env": {"P": "`id`"}}}', "backticks", id="env-backtick"
            ),
            pytest.param(
                '{"C": {"title": "x", "video_filter": "y", "env": {"P": "$(id)"}}}', "quotes", id="env-substitution"
            ),
            pytest.param(
                '{"C": {"title": "x", "video_filter": "y", "env": {"1P": "a"}}}', "not a valid", id="env-name"
            ),
            pytest.param('{"C": {"title": "x", "video_filter": "y", "output_args": "-c:v"}}', "list", id="args-str"),
        ],
    )
    def test_invalid_definitions_are_rejected_with_the_reason(self, raw, message):
        with pytest.raises(ModelError, match=message):
            parse_custom_models(raw)


class TestResolveModel:
    def test_unknown_model_error_lists_known_models(self):
        with pytest.raises(ModelError, match=r"unknown model 'Z'; known models: A, B, cpu"):
            resolve_model("Z")

    def test_custom_model_resolves_by_name(self):
        assert resolve_model("C", json.dumps(TestCustomModels.VALID)).title == "Model C: SR + sharpen"
