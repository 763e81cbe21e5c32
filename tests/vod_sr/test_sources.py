from __future__ import annotations

import pytest

from include.vod_sr.sources import (
    DEFAULT_OUTPUT_TEMPLATE,
    S3Object,
    SourceError,
    output_key,
    parse_source,
    validate_bucket_name,
    validate_output_template,
)

HOSTILE_KEYS = [
    'it\'s a "test" $(id); rm -rf ~.mp4',
    "  leading  spaces and  doubled  spaces.mp4",
    "folder/`reboot` & echo $HOME | cat > x.mp4",
    "유니코드/비디오 파일.mp4",
    "new\nline.mp4",
    "back\\slash\t tab.mp4",
    "-starts-with-dash.mp4",
]


class TestParseSource:
    def test_plain_key_goes_to_default_bucket(self):
        assert parse_source("videos/a.mp4", "src-bucket") == S3Object("src-bucket", "videos/a.mp4")

    def test_uri_names_its_own_bucket(self):
        assert parse_source("s3://other-bucket/x/y.mp4", "src-bucket") == S3Object("other-bucket", "x/y.mp4")

    @pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
    def test_keys_are_taken_literally(self, key):
        assert parse_source(key, "src").key == key
        assert parse_source(f"s3://src/{key}", "other").key == key

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            pytest.param("s3://bucket-only", "malformed S3 URI 's3://bucket-only'", id="no-key"),
            pytest.param("s3://bucket/", "malformed S3 URI", id="empty-key"),
            pytest.param("s3:///key.mp4", "bucket name in 's3:///key.mp4' is empty", id="no-bucket"),
            pytest.param(
                "s3://Bad_Bucket/key.mp4",
                "'Bad_Bucket' (bucket name in 's3://Bad_Bucket/key.mp4') is not a valid S3 bucket name",
                id="bad-bucket",
            ),
            pytest.param("https://example.com/a.mp4", "only s3:// URIs", id="other-scheme"),
            pytest.param("", "a source entry is empty", id="empty"),
            pytest.param("folder/", "ends with '/'", id="folder"),
        ],
    )
    def test_malformed_sources_are_named_in_the_error(self, text, message):
        with pytest.raises(SourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_source(text, "src")

    def test_plain_key_without_source_bucket_is_an_error(self):
        with pytest.raises(SourceError, match="no source bucket is set"):
            parse_source("a.mp4", "")

    def test_key_longer_than_s3_allows_is_an_error(self):
        with pytest.raises(SourceError, match="1024 bytes"):
            parse_source("가" * 400, "src")  # 1200 bytes in UTF-8


class TestBucketNames:
    @pytest.mark.parametrize("name", ["abc", "my.bucket-1", "a" * 63])
    def test_valid(self, name):
        assert validate_bucket_name(name) == name

    @pytest.mark.parametrize(
        "name", ["ab", "a" * 64, "UPPER", "has_underscore", "-dash", "dot.", "a..b", "192.168.1.1"]
    )
    def test_invalid(self, name):
        with pytest.raises(SourceError, match=repr(name).replace(".", r"\.")):
            validate_bucket_name(name)


class TestOutputKey:
    def test_default_keeps_folder_and_marks_model(self):
        assert output_key("in/clip.mp4", DEFAULT_OUTPUT_TEMPLATE, "A") == "in/clip_sr_A.mp4"

    def test_template_fields(self):
        assert output_key("a/b/c.mov", "sr/{model}/{dir}{name}", "B") == "sr/B/a/b/c.mov"
        assert output_key("top.mp4", "{dir}{stem}-x2{ext}", "cpu") == "top-x2.mp4"

    @pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
    def test_hostile_keys_keep_their_characters(self, key):
        out = output_key(key, DEFAULT_OUTPUT_TEMPLATE, "cpu")

        assert out.endswith("_sr_cpu.mp4")
        assert out[: -len("_sr_cpu.mp4")] == key[: -len(".mp4")]

    def test_unknown_template_field_is_named(self):
        with pytest.raises(SourceError, match=r"unknown fields \['date'\]"):
            output_key("a.mp4", "{date}/{name}", "A")

    def test_output_without_video_extension_is_an_error(self):
        with pytest.raises(SourceError, match="must end with one of"):
            output_key("a.txt", DEFAULT_OUTPUT_TEMPLATE, "A")

    def test_trailing_space_after_extension_asks_for_a_template(self):
        # S3 accepts the key, but ffmpeg cannot tell the container from ".mp4 ": say so before any GPU starts.
        with pytest.raises(SourceError, match=r"output key 'clip_sr_A.mp4 ' \(for 'clip.mp4 '\) must end with"):
            output_key("clip.mp4 ", DEFAULT_OUTPUT_TEMPLATE, "A")

        assert output_key("clip.mp4 ", "{dir}{stem}_sr.mp4", "A") == "clip_sr.mp4"

    def test_malformed_template(self):
        with pytest.raises(SourceError, match="malformed"):
            output_key("a.mp4", "{stem", "A")


class TestCachedChecks:
    """Bucket names and the output template are checked once per value, not once per file; a bad value still
    fails every time, with the message naming where it came from."""

    def test_a_bad_bucket_fails_every_time_naming_each_source(self):
        for text in ("s3://Bad_Bucket/a.mp4", "s3://Bad_Bucket/b.mp4"):
            with pytest.raises(SourceError, match=rf"'Bad_Bucket' \(bucket name in '{text}'\) is not a valid"):
                parse_source(text, "src")
        with pytest.raises(SourceError, match=r"'Bad_Bucket' \(source bucket name\) is not a valid"):
            parse_source("a.mp4", "Bad_Bucket")
        with pytest.raises(SourceError, match=r"'10\.0\.0\.1' \(output bucket\) is formatted like an IP address"):
            validate_bucket_name("10.0.0.1", what="output bucket")
        with pytest.raises(SourceError, match=r"'10\.0\.0\.1' \(bucket name in 's3://10\.0\.0\.1/a\.mp4'\)"):
            parse_source("s3://10.0.0.1/a.mp4", "src")

    def test_a_bad_template_fails_every_time(self):
        for key in ("a.mp4", "b.mp4"):
            with pytest.raises(SourceError, match=r"unknown fields \['date'\]"):
                output_key(key, "{date}/{name}", "A")
        with pytest.raises(SourceError, match="malformed"):
            validate_output_template("{stem")
        assert output_key("x/a.mp4", "{dir}{stem}-{model}{ext}", "m") == "x/a-m.mp4"
        assert output_key("b.mkv", "{dir}{stem}-{model}{ext}", "m") == "b-m.mkv"

    def test_empty_and_non_string_bucket_names(self):
        with pytest.raises(SourceError, match="bucket name in 's3:///a.mp4' is empty"):
            parse_source("s3:///a.mp4", "src")
        with pytest.raises(SourceError, match="output bucket is empty"):
            validate_bucket_name(None, what="output bucket")  # type: ignore[arg-type]
