"""Source references (keys and s3:// URIs), bucket and key validation, and output naming.

Keys are taken literally: S3 accepts almost any UTF-8 string as a key, including leading or trailing spaces,
quotes and shell metacharacters, so nothing here strips, decodes or normalises a key.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import posixpath
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache


class SourceError(ValueError):
    """A source, bucket or output name is unusable; the message names the bad value."""


BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
MAX_KEY_BYTES = 1024
# Containers ffmpeg can write H.264 with copied audio into; ffmpeg picks the muxer from the extension.
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".ts"})
DEFAULT_SOURCE_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".ts")
TEMPLATE_FIELDS = frozenset({"dir", "stem", "ext", "name", "model"})
DEFAULT_OUTPUT_TEMPLATE = "{dir}{stem}_sr_{model}{ext}"


@dataclass(frozen=True, order=True, slots=True)
class S3Object:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def validate_bucket_name(name: str, *, what: str = "bucket name") -> str:
    """`name` if it is a valid S3 bucket name, else a SourceError naming it."""
    if not isinstance(name, str) or not name:
        raise SourceError(f"{what} is empty")
    problem = _bucket_name_problem(name)
    if problem is not None:
        raise SourceError(f"{name!r} ({what}) {problem}")
    return name


@lru_cache(maxsize=256)
def _bucket_name_problem(name: str) -> str | None:
    """What is wrong with the (non-empty) bucket name, or None; cached: a manifest names the same few buckets on
    each of its lines."""
    if not BUCKET_NAME.match(name) or ".." in name:
        return (
            "is not a valid S3 bucket name "
            "(3-63 characters: lowercase letters, digits, dots and hyphens; starting and ending with a letter or digit)"
        )
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return None
    return "is formatted like an IP address, which S3 does not allow"


def _checked_bucket(name: str, what: Callable[[], str]) -> str:
    """validate_bucket_name(name, what=what()), with `what` only made when the name is bad (once per source line)."""
    if isinstance(name, str) and name and _bucket_name_problem(name) is None:
        return name
    return validate_bucket_name(name, what=what())


def validate_key(key: str, *, what: str = "key") -> str:
    if not isinstance(key, str) or key == "":
        raise SourceError(f"{what} is empty")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise SourceError(f"{what} {key[:60]!r}... is longer than S3's {MAX_KEY_BYTES} bytes")
    if key.endswith("/"):
        raise SourceError(f"{what} {key!r} ends with '/', which names a folder, not a video file")
    return key


def parse_source(text: str, default_bucket: str) -> S3Object:
    """A source reference as given by a user: a key in `default_bucket` or an `s3://bucket/key` URI."""
    if not isinstance(text, str) or text == "":
        raise SourceError("a source entry is empty")
    if text.startswith("s3://"):
        bucket, slash, key = text[len("s3://") :].partition("/")
        if not slash or not key:
            raise SourceError(f"malformed S3 URI {text!r}: expected s3://bucket/key")
        return S3Object(_checked_bucket(bucket, lambda: f"bucket name in {text!r}"), validate_key(key, what="key"))
    if URI_SCHEME.match(text):
        raise SourceError(f"malformed source {text!r}: only s3:// URIs or plain keys are accepted")
    if not default_bucket:
        raise SourceError(f"source {text!r} is a plain key but no source bucket is set")
    return S3Object(_checked_bucket(default_bucket, lambda: "source bucket name"), validate_key(text, what="key"))


def validate_output_template(template: str) -> str:
    """`template` if every `{field}` in it is known, else a SourceError listing the allowed fields."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as error:
        raise SourceError(f"output naming template {template!r} is malformed: {error}") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise SourceError(
            f"output naming template {template!r} uses unknown fields {sorted(unknown)}; "
            f"allowed: {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS))}"
        )
    return template


# output_key runs once per file with the run's one template: its fields are checked once (errors are not cached, so
# a bad template raises the same SourceError every time).
_checked_template = lru_cache(maxsize=64)(validate_output_template)


def output_key(source_key: str, template: str, model: str) -> str:
    """The output key for `source_key`: `{dir}` keeps the source's folder (with its trailing slash)."""
    folder, name = posixpath.split(source_key)
    stem, ext = posixpath.splitext(name)
    key = _checked_template(template).format(
        dir=f"{folder}/" if folder else "", stem=stem, ext=ext, name=name, model=model
    )
    validate_key(key, what=f"output key for {source_key!r}")
    if posixpath.splitext(key)[1].lower() not in VIDEO_EXTENSIONS:
        raise SourceError(
            f"output key {key!r} (for {source_key!r}) must end with one of {', '.join(sorted(VIDEO_EXTENSIONS))} "
            "so ffmpeg knows which container to write"
        )
    return key


def parse_prefix(text: str, default_bucket: str) -> S3Object:
    """A folder of sources: `s3://bucket/prefix` (`s3://bucket/` for the whole bucket) or a prefix in the
    default bucket. The key of the result is the listing prefix."""
    if not isinstance(text, str) or text == "":
        raise SourceError("a prefix entry is empty")
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        return S3Object(validate_bucket_name(bucket, what=f"bucket name in prefix {text!r}"), prefix)
    if URI_SCHEME.match(text):
        raise SourceError(f"malformed prefix {text!r}: only s3:// URIs or plain prefixes are accepted")
    if not default_bucket:
        raise SourceError(f"prefix {text!r} is not an s3:// URI but no source bucket is set")
    return S3Object(validate_bucket_name(default_bucket, what="source bucket name"), text)


def parse_manifest(body: bytes, name: str) -> list[str]:
    """Source entries (keys or s3:// URIs) from a manifest object, by its extension:

    - `.json`: a list of strings, or an object with a "sources" list (the only form for keys with newlines);
    - `.csv`: a column named "source" or "key" if the header has one, else the first column;
    - anything else: one entry per line, taken literally (no trimming; blank lines are skipped).
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SourceError(f"manifest {name!r} is not UTF-8 text: {error}") from None
    suffix = posixpath.splitext(name)[1].lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SourceError(f"manifest {name!r} is not valid JSON: {error}") from None
        entries = data.get("sources") if isinstance(data, dict) else data
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise SourceError(f'manifest {name!r} must be a JSON list of strings or {{"sources": [...]}}')
        return entries
    if suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        header = [cell.strip().lower() for cell in rows[0]]
        column = next((header.index(n) for n in ("source", "key") if n in header), None)
        data_rows = rows[1:] if column is not None else rows
        return [row[column or 0] for row in data_rows if row and row[column or 0] != ""]
    return [line.removesuffix("\r") for line in text.split("\n") if line.removesuffix("\r") != ""]
