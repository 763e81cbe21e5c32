"""The trigger form of `vod_sr_batch`: one Param per choice, defaults from the deployment's settings."""

from __future__ import annotations

from airflow.sdk import Param

from include.vod_sr.catalog import BUILTIN_MODELS
from include.vod_sr.limits import MAX_CHUNK_SIZE, MAX_EXECUTION_TIMEOUT, MAX_SSM_TARGETS
from include.vod_sr.settings import Settings
from include.vod_sr.sources import DEFAULT_OUTPUT_TEMPLATE, DEFAULT_SOURCE_EXTENSIONS

BUCKET_PATTERN = r"^([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])?$"
INSTANCE_PATTERN = r"^m?i-[0-9a-f]{8,17}$"


def trigger_form(settings: Settings) -> dict[str, Param]:
    return {
        "sources": Param(
            [],
            type="array",
            items={"type": "string"},
            title="Source videos",
            description="One per line: keys in the source bucket, or s3://bucket/key URIs. Keys are taken literally.",
        ),
        "prefixes": Param(
            [],
            type="array",
            items={"type": "string"},
            title="Source folders",
            description="Prefixes in the source bucket, or s3://bucket/prefix URIs: every video under them is "
            "processed (see Extensions).",
        ),
        "manifest": Param(
            "",
            type="string",
            title="Manifest",
            description='Key or s3:// URI of a manifest: .json (a list, or {"sources": [...]}), .csv (a '
            "'source' or 'key' column, else the first), or text with one key or URI per line.",
        ),
        "extensions": Param(
            list(DEFAULT_SOURCE_EXTENSIONS),
            type="array",
            items={"type": "string", "pattern": r"^\.[A-Za-z0-9]+$"},
            title="Extensions",
            description="Which files under the source folders count as videos (case-insensitive).",
        ),
        "model": Param(
            settings.default_model,
            type="string",
            minLength=1,
            title="SR model",
            description="A and B are the Bluewhale GPU models; cpu runs anywhere. Operators' custom models "
            f"(Airflow Variable '{settings.models_variable}') are accepted by name too.",
            examples=sorted(BUILTIN_MODELS),
            values_display={name: model.title for name, model in BUILTIN_MODELS.items()},
        ),
        "source_bucket": Param(
            settings.source_bucket,
            type="string",
            pattern=BUCKET_PATTERN,
            title="Source bucket",
            description="Bucket for sources given as plain keys.",
        ),
        "output_bucket": Param(
            settings.output_bucket,
            type="string",
            pattern=BUCKET_PATTERN,
            title="Output bucket",
            description="Bucket the SR outputs and the run report are written to.",
        ),
        "output_template": Param(
            DEFAULT_OUTPUT_TEMPLATE,
            type="string",
            minLength=1,
            title="Output naming",
            description="Output key for each source. Fields: {dir} (source folder with trailing /), {stem}, "
            "{ext} (with dot), {name}, {model}. Must end in .mp4, .m4v, .mov, .mkv or .ts.",
        ),
        "instance_ids": Param(
            list(settings.instance_ids),
            type="array",
            items={"type": "string", "pattern": INSTANCE_PATTERN},
            maxItems=MAX_SSM_TARGETS,
            title="GPU instances",
            description="EC2 instance ids (i-...) of Bluewhale AMI instances with an SSM instance profile. Chunks "
            "are dealt out to them in turn; each is started, used and stopped on its own.",
        ),
        "overwrite": Param(
            False,
            type="boolean",
            title="Overwrite existing outputs",
            description="Off: sources whose output already exists are skipped and reported as such.",
        ),
        "stop_when_done": Param(
            True,
            type="boolean",
            title="Stop the instance when done",
            description="Stop it at the end (also after failures) unless another run or command still uses it.",
        ),
        "execution_timeout": Param(
            21_600,
            type="integer",
            minimum=60,
            maximum=MAX_EXECUTION_TIMEOUT,
            title="Execution timeout (seconds)",
            description="How long one SSM command (one chunk of files) may run, including waiting for the chunk "
            "ahead of it on the same instance. SSM stops the script when it is reached.",
        ),
        "chunk_size": Param(
            10,
            type="integer",
            minimum=1,
            maximum=MAX_CHUNK_SIZE,
            title="Files per command",
            description="Files one SSM command processes one after another. Grown automatically so a run "
            "never has more than 1024 chunks.",
        ),
    }
