from __future__ import annotations

import json
import re
import subprocess

import pytest

from include.vod_sr import catalog, script
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
                '{"C": {"title": "x", "video_filter": "y", "env": {"PATH": "`id`"}}}', "backticks", id="env-backtick"
            ),
            pytest.param(
                '{"C": {"title": "x", "video_filter": "y", "env": {"PATH": "$(id)"}}}', "quotes", id="env-substitution"
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


# The README's example custom model, verbatim.
README_MODEL_C = {
    "C": {
        "title": "Model C: SR + sharpen",
        "video_filter": "bdsr_coupang_aws,unsharp",
        "output_args": ["-c:v", "h264_nvenc", "-cq", "18", "-c:a", "copy"],
        "env": {"ONNX_DIR": "/usr/local/bluedot/models/", "PATH": "/usr/local/bluedot:$PATH"},
    }
}

# Variables that change how bash, the loader, the chunk script or the tools it runs behave.
REFUSED_ENV_NAMES = [
    "TMPDIR",  # moves the instance lock: two runs would share the GPU
    "LD_PRELOAD",
    "LD_AUDIT",
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "IFS",
    "PS4",
    "PROMPT_COMMAND",
    "HOME",
    "PWD",
    "CDPATH",
    "GLOBIGNORE",
    "AWS_ENDPOINT_URL",  # sends the results and outputs elsewhere
    "AWS_SHARED_CREDENTIALS_FILE",
    "CUDA_VISIBLE_DEVICES",  # the chunk script is to set it per GPU
    "FFREPORT",  # ffmpeg writes its report to any file
    "HTTPS_PROXY",
    "workdir",  # the chunk script's own variables
    "output_args",
]


def custom_model(**fields) -> str:
    """The Variable's JSON for one custom model "C": a valid SR model with `fields` replaced."""
    spec = {"title": "C", "video_filter": "bdsr_coupang_aws", "output_args": ["-c:v", "h264_nvenc"], **fields}
    return json.dumps({"C": spec})


class TestCustomModelsRunAsRoot:
    """A custom model runs as root on the GPU instance: it may configure the vendor runtime, the SR filters and the
    encoder, and nothing else."""

    def test_readme_example_model_is_valid(self):
        model = parse_custom_models(json.dumps(README_MODEL_C))["C"]

        assert model.output_args == ("-c:v", "h264_nvenc", "-cq", "18", "-c:a", "copy")

    @pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
    def test_builtin_models_pass_the_custom_model_rules(self, name):
        model = BUILTIN_MODELS[name]
        spec = {"title": model.title, "video_filter": model.video_filter, "output_args": list(model.output_args)}

        parse_custom_models(json.dumps({f"copy-of-{name}": {**spec, "env": dict(model.env)}}))

    @pytest.mark.parametrize("name", REFUSED_ENV_NAMES, ids=str)
    def test_environment_names_outside_the_vendor_runtime_are_refused(self, name):
        with pytest.raises(ModelError, match=rf"model 'C': environment name '{name}' is not allowed"):
            parse_custom_models(custom_model(env={name: "/tmp/x"}))

    def test_chunk_script_variables_are_not_model_variables(self):
        rendered = script.render_sr_script(BUILTIN_MODELS["cpu"], "token", 0, "s3://b/files", "s3://b/results")
        text = rendered + script.INSTALL_CLI_SCRIPT
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
        used |= set(re.findall(r"(?:^|[\s;(])([A-Za-z_][A-Za-z0-9_]*)=", text, re.MULTILINE))

        assert {"TMPDIR", "workdir", "output_args"} <= used  # the patterns do find the script's variables
        assert not used & catalog.MODEL_ENV_NAMES

    @pytest.mark.parametrize(
        ("output_args", "message"),
        [
            pytest.param(["-i", "/etc/shadow", "-c:v", "libx264"], "option '-i' is not an allowed", id="input-file"),
            pytest.param(
                ["-c:v", "libx264", "/etc/cron.d/vod"], "'/etc/cron.d/vod' follows no option", id="bare-output-path"
            ),
            pytest.param(["-an", "copy.mp4"], "'copy.mp4' follows no option", id="value-after-a-flag"),
            pytest.param(["-c:v"], "option '-c:v' has no value", id="option-without-value"),
            pytest.param(["-f", "image2", "/root/x.png"], "option '-f' is not an allowed", id="muxer-and-file"),
            pytest.param(["-vf", "movie=x"], "option '-vf' is not an allowed", id="second-filter"),
            pytest.param(["-filter_complex_script", "g.txt"], "not an allowed", id="filter-script"),
            pytest.param(["-/c:v", "codec.txt"], "option '-/c:v' is not an allowed", id="value-from-file"),
            pytest.param(["-passlogfile", "/tmp/x"], "option '-passlogfile' is not an allowed", id="passlogfile"),
            pytest.param(["-progress", "x.log"], "option '-progress' is not an allowed", id="progress-file"),
            pytest.param(["-y"], "option '-y' is not an allowed", id="overwrite-flag"),
            pytest.param(["-metadata", "/etc/passwd"], "not a path or URL", id="value-is-a-path"),
            pytest.param(["-c:v", "file:x"], "not a path or URL", id="value-is-a-url"),
            pytest.param(["-preset", "..x"], "not a path or URL", id="value-has-dot-dot"),
        ],
    )
    def test_output_args_other_than_encoder_settings_are_refused(self, output_args, message):
        with pytest.raises(ModelError, match=rf"model 'C': output_args .*{re.escape(message)}"):
            parse_custom_models(custom_model(output_args=output_args))

    @pytest.mark.parametrize(
        ("video_filter", "message"),
        [
            pytest.param("bdsr_coupang_aws,movie=secret.mp4", "uses 'movie'", id="movie"),
            pytest.param("amovie=secret.wav", "uses 'amovie'", id="amovie"),
            pytest.param("bdsr_coupang_aws,subtitles=/root/.aws/credentials", "uses 'subtitles'", id="subtitles"),
            pytest.param("sendcmd=c='0 scale w 64',scale=64:64", "uses 'sendcmd'", id="sendcmd"),
            pytest.param("zmq,bdsr_coupang_aws", "uses 'zmq'", id="zmq-listens-for-commands"),
            pytest.param("drawtext=textfile=/etc/shadow", "uses 'drawtext'", id="drawtext-textfile"),
            pytest.param("lut3d=grade.cube", "uses 'lut3d'", id="lut3d"),
            pytest.param("frei0r=filter_name=/tmp/x.so", "uses 'frei0r'", id="frei0r-plugin"),
            pytest.param("psnr=stats.log", "uses 'psnr'", id="psnr-writes-its-first-option"),
            pytest.param("[in]bdsr_coupang_aws[sr];[sr]metadata=print:file=x[out]", "uses 'metadata'", id="labelled"),
            pytest.param("bdsr_coupang_aws=file=/etc/shadow", "option file= of bdsr_coupang_aws", id="file-option"),
            pytest.param("bdsr_coupang_aws=model=/tmp/evil.onnx", "value '/tmp/evil.onnx'", id="absolute-path"),
            pytest.param("bdsr_coupang_aws=model=../../tmp/x", "value '../../tmp/x'", id="parent-directory"),
            pytest.param("scale=/w=w.txt:h=-2", "option name '/w' of scale", id="option-value-from-file"),
            pytest.param("scale='/w'=w.txt:h=-2", "option name '/w' of scale", id="quoted-option-from-file"),
            pytest.param("'movie'=secret.mp4", "filter name \"'movie'\" is not a plain name", id="quoted-name"),
            pytest.param("mo\\vie=secret.mp4", "backslash", id="escaped-name"),
            pytest.param("sws_flags=x';movie=secret.mp4,'", "sws_flags is not supported", id="sws-flags-prefix"),
            pytest.param("[a,movie=x]scale", "link label", id="label-hiding-a-filter"),
            pytest.param("scale='iw*2", "quote is not closed", id="open-quote"),
        ],
    )
    def test_filters_that_touch_files_are_refused(self, video_filter, message):
        with pytest.raises(ModelError, match=rf"model 'C': video_filter .*{re.escape(message)}"):
            parse_custom_models(custom_model(video_filter=video_filter))

    @pytest.mark.parametrize(
        ("video_filter", "output_args"),
        [
            pytest.param("[in]scale=w='min(iw*2,3840)':h=-2,fps=30000/1001[out]", ["-c:v", "libx264"], id="quoting"),
            pytest.param(" hqdn3d , scale=iw/2:-2 ", ["-r", "30000/1001", "-aspect", "16:9"], id="ratios"),
            pytest.param("bdsr_coupang_aws", ["-b:v:0", "8M", "-map_metadata", "-1", "-an"], id="flag-and-minus"),
            pytest.param(
                "bdsr_coupang_aws", ["-metadata", "comment=Model C: SR", "-movflags", "+faststart"], id="meta"
            ),
        ],
    )
    def test_ordinary_filters_and_encoder_settings_are_accepted(self, video_filter, output_args):
        parse_custom_models(custom_model(video_filter=video_filter, output_args=output_args))

    def test_every_filter_with_a_file_option_in_ffmpeg_is_refused(self):
        """Checks FILE_FILTERS against the ffmpeg build in the dev environment; the AMI's has the vendor filters."""
        imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
        listing = subprocess.run([ffmpeg, "-hide_banner", "-filters"], capture_output=True, text=True).stdout
        filters = {line.split()[1] for line in listing.splitlines() if re.match(r"^ [.A-Z|]{2,3} \S", line)}
        help_text = subprocess.run([ffmpeg, "-hide_banner", "-h", "full"], capture_output=True, text=True).stdout
        file_option = re.compile(r"\b(file|filename|path|plugin|model|shader|uri)\b", re.IGNORECASE)
        with_file_options, owners = set(), set()
        for line in help_text.splitlines():
            if section := re.match(r"^(\(a\))?(\S+) AVOptions:$", line):  # "(a)movie" is movie and amovie
                owners = {section[2], "a" + section[2]} if section[1] else {section[2]}
                owners &= filters
            elif (option := re.match(r"^   (\S+)\s+<(string|binary)>\s+\S+\s*(.*)$", line)) and (
                option[1] in {"file", "filename"} or file_option.search(option[3])
            ):
                with_file_options |= owners

        assert len(filters) > 300 and {"movie", "lut3d", "psnr", "drawtext"} <= with_file_options
        assert with_file_options - catalog.FILE_FILTERS == set()


class TestResolveModel:
    def test_unknown_model_error_lists_known_models(self):
        with pytest.raises(ModelError, match=r"unknown model 'Z'; known models: A, B, cpu"):
            resolve_model("Z")

    def test_custom_model_resolves_by_name(self):
        assert resolve_model("C", json.dumps(TestCustomModels.VALID)).title == "Model C: SR + sharpen"
