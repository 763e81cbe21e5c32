"""Batch planning: turn a run's params into validated file jobs, split into chunks.

Everything that can be wrong with the input is found here, before any instance is started, and each error names
the bad value. S3 is asked with one listing per source folder, not one call per file.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from include.vod_sr.limits import MAX_EXECUTION_TIMEOUT, MAX_MAPPED_CHUNKS
from include.vod_sr.sources import (
    DEFAULT_OUTPUT_TEMPLATE,
    S3Object,
    SourceError,
    output_key,
    parse_source,
    validate_bucket_name,
    validate_output_template,
)

INSTANCE_ID_PREFIX = ("i-", "mi-")


class PlanError(ValueError):
    """The run's input is unusable; nothing was started."""


@dataclass(frozen=True)
class BatchRequest:
    """A run's params, type-checked. Built with `BatchRequest.from_params`."""

    sources: tuple[str, ...]
    model: str
    source_bucket: str
    output_bucket: str
    instance_id: str
    output_template: str = DEFAULT_OUTPUT_TEMPLATE
    overwrite: bool = False
    stop_when_done: bool = True
    execution_timeout: int = 21_600
    chunk_size: int = 10

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> BatchRequest:
        sources = params.get("sources") or []
        if isinstance(sources, str):
            sources = [sources]
        if not isinstance(sources, list | tuple) or not all(isinstance(s, str) for s in sources):
            raise PlanError(f"sources must be a list of keys or s3:// URIs, got {sources!r}")
        request = cls(
            sources=tuple(sources),
            model=str(params.get("model") or ""),
            source_bucket=str(params.get("source_bucket") or ""),
            output_bucket=str(params.get("output_bucket") or ""),
            instance_id=str(params.get("instance_id") or ""),
            output_template=str(params.get("output_template") or DEFAULT_OUTPUT_TEMPLATE),
            overwrite=bool(params.get("overwrite", False)),
            stop_when_done=bool(params.get("stop_when_done", True)),
            execution_timeout=int(params.get("execution_timeout", 21_600)),
            chunk_size=int(params.get("chunk_size", 10)),
        )
        request.validate()
        return request

    def validate(self) -> None:
        if not self.sources:
            raise PlanError("the source list is empty: give at least one key or s3:// URI in 'sources'")
        if not self.model:
            raise PlanError("no model chosen")
        if not self.instance_id.startswith(INSTANCE_ID_PREFIX):
            raise PlanError(f"instance id {self.instance_id!r} is not an EC2 instance id (i-...)")
        if not 60 <= self.execution_timeout <= MAX_EXECUTION_TIMEOUT:
            raise PlanError(
                f"execution_timeout {self.execution_timeout} s is outside 60..{MAX_EXECUTION_TIMEOUT} s (SSM's limits)"
            )
        if self.chunk_size < 1:
            raise PlanError(f"chunk_size {self.chunk_size} must be at least 1")
        try:
            validate_bucket_name(self.output_bucket, what="output bucket name")
            validate_output_template(self.output_template)
        except SourceError as error:
            raise PlanError(str(error)) from None


@dataclass(frozen=True)
class FileJob:
    index: int
    source: S3Object
    output: S3Object

    def to_xcom(self) -> dict[str, Any]:
        return {"index": self.index, "source": asdict(self.source), "output": asdict(self.output)}

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> FileJob:
        return cls(data["index"], S3Object(**data["source"]), S3Object(**data["output"]))


@dataclass(frozen=True)
class Chunk:
    """The files one SSM command processes, one after another, on one instance."""

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

    def to_xcom(self) -> dict[str, Any]:
        return {
            "run_token": self.run_token,
            "instance_id": self.request.instance_id,
            "chunks": [c.to_xcom() for c in self.chunks],
            "skipped": [f.to_xcom() for f in self.skipped],
            "file_count": sum(len(c.files) for c in self.chunks),
        }


def run_token(dag_id: str, run_id: str) -> str:
    """A short ASCII id for a run, stored as S3 object metadata on every output the run writes."""
    return hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:16]


def existing_objects(s3_client: Any, objects: Iterable[S3Object]) -> dict[S3Object, int]:
    """Which of `objects` exist, with their sizes: one paginated listing per folder, not one call per key."""
    by_folder: dict[tuple[str, str], list[str]] = defaultdict(list)
    for obj in objects:
        by_folder[(obj.bucket, posixpath.dirname(obj.key))].append(obj.key)
    found: dict[S3Object, int] = {}
    paginator = s3_client.get_paginator("list_objects_v2")
    for (bucket, _), keys in by_folder.items():
        wanted = set(keys)
        prefix = os.path.commonprefix(keys)  # noqa: RUF071 - S3 prefixes are plain string prefixes
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    if item["Key"] in wanted:
                        found[S3Object(bucket, item["Key"])] = item["Size"]
        except s3_client.exceptions.NoSuchBucket:
            raise PlanError(f"bucket {bucket!r} does not exist") from None
    return found


def chunk_files(files: list[FileJob], instance_id: str, chunk_size: int) -> tuple[Chunk, ...]:
    """Split into chunks of `chunk_size`, growing it when needed to stay within Airflow's mapping limit."""
    size = max(chunk_size, math.ceil(len(files) / MAX_MAPPED_CHUNKS))
    return tuple(
        Chunk(index=n, instance_id=instance_id, files=tuple(files[start : start + size]))
        for n, start in enumerate(range(0, len(files), size))
    )


def plan_batch(request: BatchRequest, s3_client: Any, *, run_token: str) -> BatchPlan:
    """Resolve, validate and chunk the request's sources. Raises PlanError naming the first bad value."""
    try:
        sources = list(dict.fromkeys(parse_source(s, request.source_bucket) for s in request.sources))
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

    present = existing_objects(s3_client, [job.source for job in jobs])
    missing = [job.source.uri for job in jobs if job.source not in present]
    if missing:
        shown = ", ".join(repr(uri) for uri in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise PlanError(f"missing source objects: {shown}{more}")
    empty = [job.source.uri for job in jobs if present[job.source] == 0]
    if empty:
        raise PlanError(f"source objects are empty (0 bytes): {', '.join(repr(uri) for uri in empty[:10])}")

    try:
        s3_client.head_bucket(Bucket=request.output_bucket)
    except ClientError as error:
        raise PlanError(f"output bucket {request.output_bucket!r} is not accessible: {error}") from None
    done = set() if request.overwrite else set(existing_objects(s3_client, [job.output for job in jobs]))
    todo = [job for job in jobs if job.output not in done]
    skipped = tuple(job for job in jobs if job.output in done)
    return BatchPlan(request, run_token, chunk_files(todo, request.instance_id, request.chunk_size), skipped)
