"""Batch planning: turn a run's params into validated file jobs, chunked and spread over the instances.

Everything that can be wrong with the input is found here, before any instance is started, and each error names
the bad value. S3 is asked with one paginated listing per source folder or prefix, never one call per file.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from include.vod_sr.budget import MAX_CHUNK_BUDGET, MIN_CHUNK_BUDGET, MIN_FILE_LIMIT
from include.vod_sr.fleet import FleetRequest
from include.vod_sr.limits import MAX_CHUNK_SIZE, MAX_CHUNKS, MAX_SSM_TARGETS
from include.vod_sr.sources import (
    DEFAULT_OUTPUT_TEMPLATE,
    DEFAULT_SOURCE_EXTENSIONS,
    S3Object,
    SourceError,
    output_key,
    parse_manifest,
    parse_prefix,
    parse_source,
    validate_bucket_name,
    validate_output_template,
)

INSTANCE_ID_PREFIX = ("i-", "mi-")


class PlanError(ValueError):
    """The run's input is unusable; nothing was started."""


def _strings(params: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = params.get(name) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"{name} must be a list of strings, got {value!r}")
    return tuple(value)


def _seconds(params: Mapping[str, Any], name: str, default: int | None) -> int | None:
    """A whole number of seconds (a JSON integer, or digits in a hand-written conf); None when null."""
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit():
        raise PlanError(f"{name} must be a whole number of seconds, got {value!r}")
    return int(value)


def _fleet(params: Mapping[str, Any]) -> FleetRequest | None:
    """The run's fleet (None when fleet_size is 0 or absent); checked by BatchRequest.validate."""
    size = params.get("fleet_size") or 0
    if isinstance(size, bool) or not isinstance(size, int | str) or not str(size).strip().isdigit():
        raise PlanError(f"fleet_size must be a whole number (0: no fleet), got {size!r}")
    if int(size) == 0:
        return None
    template = str(params.get("launch_template") or "").strip()
    if not template:
        raise PlanError(
            f"fleet_size {int(size)} asks for a fleet but no launch_template is given (nor VOD_SR_LAUNCH_TEMPLATE): "
            "name the EC2 launch template (lt-... or its name) the instances are launched from"
        )
    spot = params.get("spot", False)
    if not isinstance(spot, bool):
        raise PlanError(f"spot must be true or false, got {spot!r}")
    return FleetRequest(
        launch_template=template,
        count=int(size),
        version=str(params.get("launch_template_version") or "$Default").strip(),
        spot=spot,
        instance_types=tuple(dict.fromkeys(t.strip() for t in _strings(params, "fleet_instance_types") if t.strip())),
    )


@dataclass(frozen=True)
class BatchRequest:
    """A run's params, type-checked. Built with `BatchRequest.from_params`."""

    model: str
    source_bucket: str
    output_bucket: str
    instance_ids: tuple[str, ...]
    sources: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    manifest: str = ""
    extensions: tuple[str, ...] = DEFAULT_SOURCE_EXTENSIONS
    output_template: str = DEFAULT_OUTPUT_TEMPLATE
    overwrite: bool = False
    stop_when_done: bool = True
    execution_timeout: int = 21_600  # the chunk's budget, from taking the instance's lock (see budget.py)
    file_timeout: int | None = None  # one file's model run; None: only the budget bounds it
    chunk_size: int = 10
    # Scheduled selection (vod_sr_nightly): only objects under `prefixes` with window[0] <= LastModified < window[1]
    # are taken, and a window in which nothing arrived is an empty plan, not an error.
    modified_window: tuple[datetime, datetime] | None = None
    # Event-driven selection (vod_sr_events): a batch of S3 events with no usable upload (a test event, a deleted or
    # non-video object) is an empty plan, not an error. Set by the events selection for event-started runs (the
    # `allow_empty` param, JSON true only; not a form field).
    allow_empty: bool = False
    # Instances launched for this run from a launch template (fleet.py), instead of `instance_ids`.
    fleet: FleetRequest | None = None

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], modified_window: tuple[datetime, datetime] | None = None
    ) -> BatchRequest:
        request = cls(
            # The form's drop-down lists the built-in models; an operator's own model is named in custom_model.
            model=str(params.get("custom_model") or params.get("model") or ""),
            source_bucket=str(params.get("source_bucket") or ""),
            output_bucket=str(params.get("output_bucket") or ""),
            instance_ids=tuple(dict.fromkeys(_strings(params, "instance_ids"))),
            sources=_strings(params, "sources"),
            prefixes=_strings(params, "prefixes"),
            manifest=str(params.get("manifest") or ""),
            extensions=tuple(e.lower() for e in _strings(params, "extensions")) or DEFAULT_SOURCE_EXTENSIONS,
            output_template=str(params.get("output_template") or DEFAULT_OUTPUT_TEMPLATE),
            overwrite=bool(params.get("overwrite", False)),
            stop_when_done=bool(params.get("stop_when_done", True)),
            execution_timeout=_seconds(params, "execution_timeout", 21_600) or 0,
            file_timeout=_seconds(params, "file_timeout", None),
            chunk_size=int(params.get("chunk_size", 10)),
            modified_window=modified_window,
            allow_empty=params.get("allow_empty") is True,
            fleet=_fleet(params),
        )
        request.validate()
        return request

    def validate(self) -> None:
        if self.modified_window is not None and not self.prefixes:
            raise PlanError(
                "no watch prefixes: a scheduled run takes what arrived under its folders; set VOD_SR_NIGHTLY_PREFIXES "
                "or give 'prefixes'"
            )
        if not (self.sources or self.prefixes or self.manifest or self.allow_empty):
            raise PlanError("no sources: give keys or s3:// URIs in 'sources', folders in 'prefixes', or a 'manifest'")
        if not self.model:
            raise PlanError("no model chosen")
        if self.fleet is not None:
            self._validate_fleet(self.fleet)
        elif not self.instance_ids:
            raise PlanError(
                "no instance: give at least one EC2 instance id in 'instance_ids', or a fleet to launch "
                "('fleet_size' and 'launch_template')"
            )
        if len(self.instance_ids) > MAX_SSM_TARGETS:
            raise PlanError(f"{len(self.instance_ids)} instances given; at most {MAX_SSM_TARGETS} are supported")
        for instance_id in self.instance_ids:
            if not instance_id.startswith(INSTANCE_ID_PREFIX):
                raise PlanError(f"instance id {instance_id!r} is not an EC2 instance id (i-...)")
        if not MIN_CHUNK_BUDGET <= self.execution_timeout <= MAX_CHUNK_BUDGET:
            raise PlanError(
                f"execution_timeout (the chunk budget) {self.execution_timeout} s is outside "
                f"{MIN_CHUNK_BUDGET}..{MAX_CHUNK_BUDGET} s: the chunk ahead's budget and this one's, each with time "
                "for its last uploads, must fit in SSM's 48 h limit"
            )
        if self.file_timeout is not None and not MIN_FILE_LIMIT <= self.file_timeout <= MAX_CHUNK_BUDGET:
            raise PlanError(
                f"file_timeout (the per-file limit) {self.file_timeout} s is outside "
                f"{MIN_FILE_LIMIT}..{MAX_CHUNK_BUDGET} s (leave it empty for no per-file limit)"
            )
        if not 1 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise PlanError(f"chunk_size {self.chunk_size} is outside 1..{MAX_CHUNK_SIZE}")
        bad_extensions = [e for e in self.extensions if not e.startswith(".")]
        if bad_extensions:
            raise PlanError(f"extensions must start with a dot: {bad_extensions}")
        try:
            validate_bucket_name(self.output_bucket, what="output bucket name")
            validate_output_template(self.output_template)
        except SourceError as error:
            raise PlanError(str(error)) from None

    def _validate_fleet(self, fleet: FleetRequest) -> None:
        if self.instance_ids:
            raise PlanError(
                f"a run uses either named instances or a fleet, not both: instance_ids names {len(self.instance_ids)} "
                f"and fleet_size asks for {fleet.count}. Clear instance_ids to launch a fleet, or set fleet_size to 0 "
                "to use the named instances"
            )
        if not self.stop_when_done:
            raise PlanError(
                "stop_when_done is off, but a fleet's instances are always terminated at the end of the run (they "
                "belong to it alone): turn stop_when_done on, or name instances in instance_ids to keep them running"
            )
        problems = fleet.problems()
        if problems:
            raise PlanError("; ".join(problems))


@dataclass(frozen=True, slots=True)
class FileJob:
    index: int
    source: S3Object
    output: S3Object

    def to_xcom(self) -> dict[str, Any]:
        # asdict(self.source), written out: dataclasses.asdict deep-copies field by field, and store_plan does this
        # for every file of a run (a third of its time for a million files).
        source, output = self.source, self.output
        return {
            "index": self.index,
            "source": {"bucket": source.bucket, "key": source.key},
            "output": {"bucket": output.bucket, "key": output.key},
        }

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> FileJob:
        return cls(data["index"], S3Object(**data["source"]), S3Object(**data["output"]))


@dataclass(frozen=True, slots=True)
class Chunk:
    """The files one SSM command processes on one instance."""

    index: int
    instance_id: str
    files: tuple[FileJob, ...]

    def to_xcom(self) -> dict[str, Any]:
        return {"index": self.index, "instance_id": self.instance_id, "files": [f.to_xcom() for f in self.files]}

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> Chunk:
        return cls(data["index"], data["instance_id"], tuple(FileJob.from_xcom(f) for f in data["files"]))


@dataclass(frozen=True)
class BatchPlan:
    request: BatchRequest
    run_token: str
    chunks: tuple[Chunk, ...]
    skipped: tuple[FileJob, ...] = field(default=())
    launched: tuple[str, ...] = ()  # the instances launched for this run (its fleet): terminated when done

    @property
    def file_count(self) -> int:
        return sum(len(c.files) for c in self.chunks)

    def lanes(self) -> list[dict[str, Any]]:
        """One work list per instance that has chunks: the unit that is started, run and stopped together."""
        by_instance: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for chunk in self.chunks:
            by_instance[chunk.instance_id].append(chunk.to_xcom())
        shared = {
            "run_token": self.run_token,
            "output_bucket": self.request.output_bucket,
            "execution_timeout": self.request.execution_timeout,
            "file_timeout": self.request.file_timeout,
            "stop_when_done": self.request.stop_when_done,
        }
        return [
            {
                **shared,
                "instance_id": i,
                "chunks": chunks,
                "label": lane_label({"instance_id": i, "chunks": chunks}),
            }
            for i, chunks in by_instance.items()
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "run_token": self.run_token,
            "file_count": self.file_count,
            "chunk_count": len(self.chunks),
            "instance_ids": sorted({c.instance_id for c in self.chunks}),
            # O(chunks): what the run page needs to show progress per instance before any report exists.
            "lanes": [
                {
                    "instance_id": lane["instance_id"],
                    "chunks": [c["index"] for c in lane["chunks"]],
                    "files": sum(len(c["files"]) for c in lane["chunks"]),
                }
                for lane in self.lanes()
            ],
            "skipped": [f.to_xcom() for f in self.skipped],
            "modified_window": [t.isoformat() for t in self.request.modified_window or ()] or None,
        }


def lane_label(lane: Mapping[str, Any]) -> str:
    """A lane as a person reads it, its mapped tasks' name in the UI (map_index_template): `i-0abc... (12 files)`."""
    if "label" in lane:  # a stored_plan.Lane
        return str(lane["label"])
    files = sum(len(chunk.get("files") or ()) for chunk in lane.get("chunks") or ())
    return f"{lane.get('instance_id', '?')} ({files} files)"


def run_token(dag_id: str, run_id: str) -> str:
    """A short ASCII id for a run: names its leases, commands, chunk lists and report."""
    return hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:16]


def _list(s3_client: Any, bucket: str, prefix: str, start_after: str = "") -> Iterable[dict[str, Any]]:
    """The bucket's objects under `prefix`, after `start_after`, in S3's order (UTF-8 bytes); pages are fetched
    only as the caller reads on."""
    bounds = {"StartAfter": start_after} if start_after else {}
    try:
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **bounds):
            yield from page.get("Contents", [])
    except s3_client.exceptions.NoSuchBucket:
        raise PlanError(f"bucket {bucket!r} does not exist") from None


def _found(s3_client: Any, objects: Iterable[S3Object]) -> Iterator[tuple[S3Object, dict[str, Any]]]:
    """Which of `objects` exist, each (the caller's object, its listing entry): one listing per folder, not a call
    per key.

    Each listing is bounded to the wanted keys' range: it starts just before the first (StartAfter) and stops after
    the last, so keys at the bucket's root or in one huge folder never make it list the whole bucket."""
    by_folder: dict[tuple[str, str], dict[str, S3Object]] = defaultdict(dict)
    for obj in objects:
        by_folder[(obj.bucket, posixpath.dirname(obj.key))][obj.key] = obj
    for (bucket, _), wanted in by_folder.items():
        # S3 lists keys in UTF-8 byte order, which is code point order, Python's string order: min and max are the
        # first and last wanted keys (no sorted copy of a million keys), and their common prefix is all of theirs.
        first, last_key = min(wanted), max(wanted)
        prefix = os.path.commonprefix([first, last_key])  # noqa: RUF071 - S3 prefixes are plain string prefixes
        last = last_key.encode()
        # A key's own prefix sorts just before it: listing after it starts at or before the first wanted key.
        for item in _list(s3_client, bucket, prefix, start_after=first[:-1]):
            if item["Key"].encode() > last:
                break
            obj = wanted.get(item["Key"])
            if obj is not None:
                yield obj, item


def existing_objects(s3_client: Any, objects: Iterable[S3Object]) -> dict[S3Object, dict[str, Any]]:
    """Which of `objects` exist, with their listing entries (LastModified, Size, ...); see `_found`."""
    return dict(_found(s3_client, objects))


def existing_sizes(s3_client: Any, objects: Iterable[S3Object]) -> dict[S3Object, int]:
    """Which of `objects` exist, with their sizes: what the planner needs of a listing, a million objects at a time.
    The keys are the caller's own objects, and no listing entry is kept (see `_found`)."""
    return {obj: item["Size"] for obj, item in _found(s3_client, objects)}


def list_prefix(
    s3_client: Any,
    prefix: S3Object,
    extensions: tuple[str, ...],
    modified_window: tuple[datetime, datetime] | None = None,
) -> dict[S3Object, int]:
    """Video objects under a prefix (by extension, case-insensitive), with their sizes; with `modified_window`, only
    those whose LastModified is in [start, end): adjacent windows take each object exactly once."""
    return {
        S3Object(prefix.bucket, item["Key"]): item["Size"]
        for item in _list(s3_client, prefix.bucket, prefix.key)
        if item["Key"].lower().endswith(extensions)
        and (modified_window is None or modified_window[0] <= item["LastModified"] < modified_window[1])
    }


def read_manifest(s3_client: Any, manifest: S3Object) -> list[str]:
    try:
        body = s3_client.get_object(Bucket=manifest.bucket, Key=manifest.key)["Body"].read()
    except ClientError as error:
        raise PlanError(f"manifest {manifest.uri!r} cannot be read: {error}") from None
    try:
        return parse_manifest(body, manifest.key)
    except SourceError as error:
        raise PlanError(str(error)) from None


def chunk_files(files: list[FileJob], instance_ids: tuple[str, ...], chunk_size: int) -> tuple[Chunk, ...]:
    """Chunks of `chunk_size` files (grown only past MAX_CHUNKS chunks a run, at about a million files), dealt out
    to the instances in turn so each gets an even share."""
    size = max(chunk_size, math.ceil(len(files) / MAX_CHUNKS))
    return tuple(
        Chunk(index=n, instance_id=instance_ids[n % len(instance_ids)], files=tuple(files[start : start + size]))
        for n, start in enumerate(range(0, len(files), size))
    )


def resolve_sources(request: BatchRequest, s3_client: Any) -> dict[S3Object, int]:
    """Every source the request names, in order, without duplicates, with its size; missing ones are an error."""
    try:
        named = [parse_source(s, request.source_bucket) for s in request.sources]
        if request.manifest:
            manifest = parse_source(request.manifest, request.source_bucket)
            named += [parse_source(s, request.source_bucket) for s in read_manifest(s3_client, manifest)]
        prefixes = [parse_prefix(p, request.source_bucket) for p in request.prefixes]
    except SourceError as error:
        raise PlanError(str(error)) from None

    present = existing_sizes(s3_client, named)
    missing = list(dict.fromkeys(obj.uri for obj in named if obj not in present))
    if missing:
        shown = ", ".join(repr(uri) for uri in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise PlanError(f"missing source objects: {shown}{more}")
    resolved = {obj: present[obj] for obj in named}
    for prefix in prefixes:
        listed = list_prefix(s3_client, prefix, request.extensions, request.modified_window)
        if not listed and request.modified_window is None:  # nothing new in a scheduled window is normal
            where = f"s3://{prefix.bucket}/{prefix.key}"
            raise PlanError(f"prefix {where!r} holds no files ending in {', '.join(request.extensions)}")
        for obj, size in listed.items():
            resolved.setdefault(obj, size)
    return resolved


@dataclass(frozen=True)
class FileSelection:
    """The files a run will process (`todo`) and those skipped because their output exists, before they are dealt
    to instances."""

    todo: tuple[FileJob, ...]
    skipped: tuple[FileJob, ...]

    def chunk_count(self, chunk_size: int) -> int:
        """How many chunks `chunk_files` makes of `todo`: the most lanes that can have work."""
        if not self.todo:
            return 0
        size = max(chunk_size, math.ceil(len(self.todo) / MAX_CHUNKS))
        return math.ceil(len(self.todo) / size)


def plan_batch(request: BatchRequest, s3_client: Any, *, run_token: str) -> BatchPlan:
    """Resolve, validate and chunk the request's sources, dealt to its named instances. Raises PlanError naming the
    first bad value."""
    return deal(request, run_token, select_files(request, s3_client), request.instance_ids)


def deal(
    request: BatchRequest,
    run_token: str,
    selection: FileSelection,
    instance_ids: tuple[str, ...],
    *,
    launched: bool = False,
) -> BatchPlan:
    """The plan: the selected files chunked and dealt to `instance_ids` (launched for this run when `launched`)."""
    chunks = chunk_files(list(selection.todo), instance_ids, request.chunk_size) if selection.todo else ()
    return BatchPlan(request, run_token, chunks, selection.skipped, instance_ids if launched else ())


def select_files(request: BatchRequest, s3_client: Any) -> FileSelection:
    """Resolve and validate the request's sources, name their outputs and skip those already done; nothing is
    started. Raises PlanError naming the first bad value."""
    sources = resolve_sources(request, s3_client)
    empty = [obj.uri for obj, size in sources.items() if size == 0]
    if empty:
        raise PlanError(f"source objects are empty (0 bytes): {', '.join(repr(uri) for uri in empty[:10])}")
    try:
        jobs = [
            FileJob(
                n, src, S3Object(request.output_bucket, output_key(src.key, request.output_template, request.model))
            )
            for n, src in enumerate(sources)
        ]
    except SourceError as error:
        raise PlanError(str(error)) from None

    outputs: dict[S3Object, FileJob] = {}
    for job in jobs:
        if job.output == job.source:
            raise PlanError(f"output {job.output.uri!r} is the source itself; change the output naming or bucket")
        if job.output in outputs:
            raise PlanError(
                f"sources {outputs[job.output].source.uri!r} and {job.source.uri!r} both map to output "
                f"{job.output.uri!r}; one would overwrite the other"
            )
        outputs[job.output] = job

    try:
        s3_client.head_bucket(Bucket=request.output_bucket)
    except ClientError as error:
        raise PlanError(f"output bucket {request.output_bucket!r} is not accessible: {error}") from None
    done = {} if request.overwrite else existing_sizes(s3_client, [job.output for job in jobs])
    todo = tuple(job for job in jobs if job.output not in done)
    skipped = tuple(job for job in jobs if job.output in done)
    return FileSelection(todo, skipped)
