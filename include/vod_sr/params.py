"""The trigger form of `vod_sr_batch`: one Param per choice, defaults from the deployment's settings.

How the Airflow 3.3 UI reads these schemas decides whether an operator can submit the form at all:

- A field is *required* unless its JSON-schema type includes "null"; a required field that is empty turns its
  section red and disables Trigger. Sources, folders and a manifest are alternatives, so all three allow null;
  `plan` (not the form) says when none was given.
- Fields without a `section` land in the form's first section ("Run Parameters"), the only one open when the form
  opens; every named section starts collapsed. So what an operator changes on every run has no section.
- The UI checks only "required" before submitting; every other rule (patterns, ranges) is checked by the API server
  when Trigger is pressed, and its message quotes the field's schema. The descriptions live in the schema
  (`description_md`) so that the message also carries the rule in words.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param

from include.vod_sr.budget import AFTER_BUDGET, MAX_CHUNK_BUDGET, MIN_CHUNK_BUDGET, MIN_FILE_LIMIT
from include.vod_sr.catalog import BUILTIN_MODELS, MODEL_NAME
from include.vod_sr.fleet import INSTANCE_TYPE, MAX_FLEET_SIZE, MAX_INSTANCE_TYPES, TEMPLATE_NAME, TEMPLATE_VERSION
from include.vod_sr.limits import MAX_CHUNK_SIZE, MAX_SSM_TARGETS
from include.vod_sr.settings import Settings
from include.vod_sr.sources import DEFAULT_OUTPUT_TEMPLATE, DEFAULT_SOURCE_EXTENSIONS

# S3's rules, split so that each broken one gets its own message ("is too short", "does not match ...").
BUCKET_SCHEMA: dict[str, Any] = {"minLength": 3, "maxLength": 63, "pattern": r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$"}
BUCKET_RULE = (
    "A bucket name has 3 to 63 characters: lowercase letters, digits, dots and hyphens, "
    "starting and ending with a letter or digit."
)
INSTANCE_PATTERN = r"^m?i-[0-9a-f]{8,17}$"

OUTPUT_SECTION = "Output"
SOURCE_OPTIONS_SECTION = "Source options"
INSTANCES_SECTION = "Instances"
LIMITS_SECTION = "Limits"
FLEET_SECTION = "Fleet"


def model_choices(settings: Settings) -> dict[str, str]:
    """Drop-down entries (name -> readable title): the built-in models, plus the deployment's default model when
    it is a custom one, so that the default is always selectable."""
    choices = {name: model.title for name, model in BUILTIN_MODELS.items()}
    if settings.default_model not in choices:
        choices[settings.default_model] = f"{settings.default_model} (custom model, the deployment's default)"
    return choices


def trigger_form(settings: Settings, prefixes: tuple[str, ...] = (), budget: float | None = None) -> dict[str, Param]:
    """The trigger form; `prefixes` pre-fills the source folders (the nightly DAG's watch prefixes), `budget` the
    run's budget (the nightly DAG's VOD_SR_NIGHTLY_BUDGET)."""
    choices = model_choices(settings)
    return {
        "sources": Param(
            [],
            type=["null", "array"],
            items={"type": "string"},
            title="Source videos",
            description_md="One per line: keys in the source bucket, or `s3://bucket/key` URIs. Keys are taken "
            "literally (spaces and any other characters are fine). Give sources, folders, a manifest or any mix.",
        ),
        "prefixes": Param(
            list(prefixes),
            type=["null", "array"],
            items={"type": "string"},
            title="Source folders",
            description_md="One per line: prefixes in the source bucket, or `s3://bucket/prefix` URIs. Every video "
            "under them is processed (see *Source options*).",
        ),
        "manifest": Param(
            None,
            type=["null", "string"],
            title="Manifest",
            description_md='Key or `s3://` URI of a manifest: `.json` (a list, or `{"sources": [...]}`), `.csv` '
            "(a `source` or `key` column, else the first), or text with one key or URI per line.",
        ),
        "model": Param(
            settings.default_model,
            type="string",
            enum=list(choices),
            values_display=choices,
            title="SR model",
            description_md="A and B are the Bluewhale GPU models of the AMI; CPU runs anywhere (no vendor "
            "filters). For an operator-defined model, fill in *Custom model* below.",
        ),
        "custom_model": Param(
            None,
            type=["null", "string"],
            pattern=MODEL_NAME.pattern,
            title="Custom model",
            description_md="Name of a model defined by the operators in the Airflow Variable "
            f"`{settings.models_variable}`. When filled in, it is used instead of *SR model*.",
        ),
        "source_bucket": Param(
            settings.source_bucket or None,
            type=["null", "string"],
            **BUCKET_SCHEMA,
            section=SOURCE_OPTIONS_SECTION,
            title="Source bucket",
            description_md=f"Bucket of the sources and folders given as plain keys. {BUCKET_RULE}",
        ),
        "extensions": Param(
            list(DEFAULT_SOURCE_EXTENSIONS),
            type="array",
            items={"type": "string", "pattern": r"^\.[A-Za-z0-9]+$"},
            minItems=1,
            section=SOURCE_OPTIONS_SECTION,
            title="Extensions",
            description_md="One per line, each starting with a dot: which files under the source folders count "
            "as videos (case-insensitive).",
        ),
        "output_bucket": Param(
            settings.output_bucket,
            type="string",
            **BUCKET_SCHEMA,
            section=OUTPUT_SECTION,
            title="Output bucket",
            description_md=f"Bucket the SR outputs and the run report are written to. {BUCKET_RULE}",
        ),
        "output_template": Param(
            DEFAULT_OUTPUT_TEMPLATE,
            type="string",
            minLength=1,
            section=OUTPUT_SECTION,
            title="Output naming",
            description_md="Output key for each source. Fields: `{dir}` (source folder with trailing /), "
            "`{stem}`, `{ext}` (with dot), `{name}`, `{model}`. Must end in .mp4, .m4v, .mov, .mkv or .ts.",
        ),
        "overwrite": Param(
            False,
            type="boolean",
            section=OUTPUT_SECTION,
            title="Overwrite existing outputs",
            description_md="Off: sources whose output already exists are skipped and reported as such.",
        ),
        # Optional in the form: a run names instances here or launches a fleet (section Fleet); plan says when it has
        # neither, or both.
        "instance_ids": Param(
            list(settings.instance_ids),
            type=["null", "array"],
            items={"type": "string", "pattern": INSTANCE_PATTERN},
            maxItems=MAX_SSM_TARGETS,
            section=INSTANCES_SECTION,
            title="GPU instances",
            description_md="One per line: EC2 instance ids (`i-` followed by 8 to 17 hex digits) of Bluewhale AMI "
            "instances with an SSM instance profile, at most "
            f"{MAX_SSM_TARGETS}. Chunks are dealt out to them in turn; each is started, used and stopped on its own. "
            "Leave empty when the run launches a fleet (*Fleet*).",
        ),
        "stop_when_done": Param(
            True,
            type="boolean",
            section=INSTANCES_SECTION,
            title="Stop the instance when done",
            description_md="Stop it at the end (also after failures) unless another run or command still uses it.",
        ),
        "fleet_size": Param(
            settings.fleet_size,
            type="integer",
            minimum=0,
            maximum=MAX_FLEET_SIZE,
            section=FLEET_SECTION,
            title="Fleet size",
            description_md=f"0: no fleet, the run uses *GPU instances*. 1 to {MAX_FLEET_SIZE}: instances launched for "
            "this run from the launch template below (instead of *GPU instances*, which must then be empty), once its "
            "input is checked; never more than the run has chunks. They carry the run's tags and are terminated at its "
            "end, also when it fails. At most as many as named instances, for the same reason: one run's lanes.",
        ),
        "launch_template": Param(
            settings.launch_template or None,
            type=["null", "string"],
            pattern=f"^{TEMPLATE_NAME.pattern}$",
            section=FLEET_SECTION,
            title="Launch template",
            description_md="EC2 launch template of the fleet, by id (`lt-` and 17 hex digits) or name (3 to 128 "
            "letters, digits and `( ) . - / _`): the Bluewhale AMI, the SSM instance profile, network and disks.",
        ),
        "launch_template_version": Param(
            settings.launch_template_version,
            type="string",
            pattern=f"^({TEMPLATE_VERSION.pattern})$",
            section=FLEET_SECTION,
            title="Launch template version",
            description_md="`$Default`, `$Latest` or a version number.",
        ),
        "spot": Param(
            settings.spot,
            type="boolean",
            section=FLEET_SECTION,
            title="Spot first",
            description_md="Ask for Spot instances first; where Spot has no room, On-Demand of the same type. A Spot "
            "instance reclaimed by EC2 mid-run fails its lane's files (the report lists them for a re-run).",
        ),
        "fleet_instance_types": Param(
            list(settings.fleet_instance_types),
            type=["null", "array"],
            items={"type": "string", "pattern": f"^{INSTANCE_TYPE.pattern}$"},
            maxItems=MAX_INSTANCE_TYPES,
            section=FLEET_SECTION,
            title="Instance types",
            description_md=f"One per line, at most {MAX_INSTANCE_TYPES} (such as `g6e.xlarge`): tried in turn while "
            "EC2 has no capacity for the one before (each Spot first when asked, then On-Demand). Empty: the "
            "template's type only. Fewer instances than asked is fine when at least one launched.",
        ),
        "execution_timeout": Param(
            21_600,
            type="integer",
            minimum=MIN_CHUNK_BUDGET,
            maximum=MAX_CHUNK_BUDGET,
            section=LIMITS_SECTION,
            title="Chunk time budget (seconds)",
            description_md=f"{MIN_CHUNK_BUDGET} to {MAX_CHUNK_BUDGET}, counted from when a chunk (the files of one "
            "SSM command) takes the instance's lock: waiting for the chunk ahead of it does not count. It covers "
            "reading the chunk's file list, the downloads and the model runs. Once it is used up, the download or "
            'model run under way is stopped, that file and every file not started yet fail with "chunk budget ... '
            'reached", and uploads of files already processed still finish. A chunk waits for the lock at most this '
            f"budget plus {AFTER_BUDGET // 60} minutes (the longest the chunk ahead may hold it), else it fails "
            f"without starting a file. SSM's execution timeout is only a backstop: that wait, this budget and "
            f"{AFTER_BUDGET // 60} more minutes.",
        ),
        "file_timeout": Param(
            None,
            type=["null", "integer"],
            minimum=MIN_FILE_LIMIT,
            maximum=MAX_CHUNK_BUDGET,
            section=LIMITS_SECTION,
            title="Per-file time limit (seconds)",
            description_md=f"Empty: no limit but the chunk's budget. Otherwise {MIN_FILE_LIMIT} to {MAX_CHUNK_BUDGET}: "
            "how long the model may run on one file (not its download, measuring or upload). A file that reaches it "
            'is stopped and fails with "per-file limit ... reached"; the chunk goes on with its next file while its '
            "budget lasts.",
        ),
        "budget": Param(
            budget,
            type=["null", "number"],
            exclusiveMinimum=0,
            section=LIMITS_SECTION,
            title=f"Budget ({settings.rates.currency})",
            description_md=f"Empty: no budget. Otherwise the most the run's GPU instances may cost, in "
            f"{settings.rates.currency} at the deployment's hourly rates (per second, 60 s minimum per start). Checked "
            "before each chunk is sent: once reached, no more chunks are sent, the running ones finish, and the "
            "report lists the files left for the next run with the conf (and a link) to run them. Running chunks may "
            "take the spend past it by up to one chunk's time per instance.",
        ),
        "chunk_size": Param(
            10,
            type="integer",
            minimum=1,
            maximum=MAX_CHUNK_SIZE,
            section=LIMITS_SECTION,
            title="Files per command",
            description_md=f"1 to {MAX_CHUNK_SIZE}: files one SSM command processes one after another. Grown "
            "only for runs of about a million files, so a run never has more than 99,999 chunks.",
        ),
    }
