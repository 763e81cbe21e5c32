from __future__ import annotations

import pickle
from dataclasses import asdict

import boto3
import pytest
from moto import mock_aws

from include.vod_sr.budget import AFTER_BUDGET, MAX_CHUNK_BUDGET, ChunkLimits, chunk_limits
from include.vod_sr.fleet import FleetRequest
from include.vod_sr.limits import MAX_CHUNKS, MAX_EXECUTION_TIMEOUT
from include.vod_sr.plan import (
    BatchRequest,
    Chunk,
    FileJob,
    PlanError,
    chunk_files,
    deal,
    existing_objects,
    existing_sizes,
    plan_batch,
    run_token,
    select_files,
)
from include.vod_sr.sources import S3Object
from tests.vod_sr.test_sources import HOSTILE_KEYS

SOURCE, OUTPUT = "src-bucket", "out-bucket"
INSTANCE_ID = "i-0123456789abcdef0"
TOKEN = "feedfacecafebeef"


def request(*sources: str, **overrides) -> BatchRequest:
    params = {
        "sources": list(sources),
        "model": "A",
        "source_bucket": SOURCE,
        "output_bucket": OUTPUT,
        "instance_ids": [INSTANCE_ID],
        **overrides,
    }
    return BatchRequest.from_params(params)


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=SOURCE)
        client.create_bucket(Bucket=OUTPUT)
        yield client


def put(s3, key: str, bucket: str = SOURCE, body: bytes = b"video") -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body)


class TestRequestValidation:
    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            pytest.param({"sources": []}, "no sources: give keys", id="empty-sources"),
            pytest.param({"sources": [1, 2]}, "sources must be a list of strings", id="non-string-sources"),
            pytest.param({"instance_ids": ["web-01"]}, "'web-01' is not an EC2 instance id", id="instance-id"),
            pytest.param({"instance_ids": []}, "no instance", id="no-instance"),
            pytest.param({"chunk_size": 201}, "outside 1..200", id="chunk-size"),
            pytest.param({"extensions": ["mp4"]}, "must start with a dot", id="extension"),
            pytest.param({"output_bucket": "Bad_Bucket"}, "'Bad_Bucket' (output bucket name)", id="output-bucket"),
            pytest.param({"execution_timeout": 10}, "chunk budget) 10 s is outside 60..85500", id="timeout-too-small"),
            pytest.param(
                {"execution_timeout": 172_800}, "must fit in SSM's 48 h limit", id="budget-leaves-no-room-to-wait"
            ),
            pytest.param({"execution_timeout": "1h"}, "execution_timeout must be a whole number", id="timeout-text"),
            pytest.param({"file_timeout": 5}, "per-file limit) 5 s is outside 10..85500", id="file-limit-too-small"),
            pytest.param({"file_timeout": 90_000}, "outside 10..85500", id="file-limit-too-large"),
            pytest.param({"file_timeout": True}, "file_timeout must be a whole number", id="file-limit-bool"),
            pytest.param({"output_template": "{nope}"}, "unknown fields", id="template"),
            pytest.param({"model": ""}, "no model chosen", id="no-model"),
        ],
    )
    def test_bad_params_are_named(self, overrides, message):
        params = {
            "sources": ["a.mp4"],
            "model": "A",
            "source_bucket": SOURCE,
            "output_bucket": OUTPUT,
            "instance_ids": [INSTANCE_ID],
            **overrides,
        }

        with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
            BatchRequest.from_params(params)


FLEET = {"instance_ids": [], "fleet_size": 3, "launch_template": "bluewhale-g6e"}


class TestFleetRequest:
    def test_a_fleet_takes_the_place_of_instance_ids(self):
        given = request("a.mp4", **FLEET, spot=True, fleet_instance_types=["g6e.xlarge", " g6e.2xlarge", "g6e.xlarge"])

        assert given.instance_ids == ()
        assert given.fleet == FleetRequest(
            "bluewhale-g6e", 3, "$Default", spot=True, instance_types=("g6e.xlarge", "g6e.2xlarge")
        )

    @pytest.mark.parametrize("size", [0, None, "0"], ids=["zero", "null", "text-zero"])
    def test_fleet_size_zero_is_no_fleet_even_with_a_template(self, size):
        assert request("a.mp4", fleet_size=size, launch_template="bluewhale-g6e").fleet is None

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            pytest.param(
                {"instance_ids": [INSTANCE_ID]}, "either named instances or a fleet, not both", id="ids-and-fleet"
            ),
            pytest.param({"launch_template": None}, "no launch_template is given", id="no-template"),
            pytest.param({"fleet_size": 51}, r"fleet_size 51 is outside 1..50", id="too-many"),
            pytest.param({"fleet_size": -2}, "fleet_size must be a whole number", id="negative"),
            pytest.param({"fleet_size": 2.5}, "fleet_size must be a whole number", id="fraction"),
            pytest.param({"launch_template": "a b"}, "neither a launch template id", id="template-name"),
            pytest.param({"launch_template_version": "latest"}, r"is not \$Default, \$Latest", id="version"),
            pytest.param({"fleet_instance_types": ["xlarge"]}, "are not EC2 instance types", id="instance-type"),
            pytest.param({"spot": "true"}, "spot must be true or false", id="spot-text"),
            pytest.param({"stop_when_done": False}, "always terminated at the end of the run", id="keep-running"),
        ],
    )
    def test_bad_fleets_are_named_before_anything_starts(self, overrides, message):
        with pytest.raises(PlanError, match=message):
            request("a.mp4", **{**FLEET, **overrides})

    def test_neither_instances_nor_a_fleet_says_how_to_give_either(self):
        with pytest.raises(PlanError, match="instance_ids', or a fleet to launch"):
            request("a.mp4", instance_ids=[])

    def test_the_selection_is_dealt_to_the_launched_instances_and_says_they_were_launched(self, s3):
        for n in range(5):
            put(s3, f"f{n}.mp4")
        fleet_request = request(*(f"f{n}.mp4" for n in range(5)), **FLEET, chunk_size=2)
        launched = ("i-0aaaaaaaaaaaaaaa1", "i-0aaaaaaaaaaaaaaa2")

        selection = select_files(fleet_request, s3)
        plan = deal(fleet_request, TOKEN, selection, launched, launched=True)

        assert selection.chunk_count(2) == 3
        assert [(c.instance_id, len(c.files)) for c in plan.chunks] == [
            (launched[0], 2),
            (launched[1], 2),
            (launched[0], 1),
        ]
        assert plan.launched == launched

    def test_nothing_to_do_has_no_chunks_so_no_fleet(self, s3):
        put(s3, "a.mp4")
        put(s3, "a_sr_A.mp4", bucket=OUTPUT)

        selection = select_files(request("a.mp4", **FLEET), s3)

        assert (selection.todo, selection.chunk_count(10), len(selection.skipped)) == ((), 0, 1)

    def test_named_instances_are_not_launched_ones(self, s3):
        put(s3, "a.mp4")

        assert plan_batch(request("a.mp4"), s3, run_token=TOKEN).launched == ()


class TestTimeLimits:
    def test_file_limit_is_optional_and_reaches_every_lane(self, s3):
        put(s3, "a.mp4")

        assert request("a.mp4").file_timeout is None
        plan = plan_batch(request("a.mp4", file_timeout=600, execution_timeout=3600), s3, run_token=TOKEN)

        (lane,) = plan.lanes()
        assert (lane["execution_timeout"], lane["file_timeout"]) == (3600, 600)

    def test_backstop_covers_the_wait_for_the_chunk_ahead_and_the_budget(self):
        limits = chunk_limits(3600, queued_ahead=1, file_limit=600)

        # The chunk ahead holds the lock for at most its budget and what follows it; this one waits that long.
        assert limits == ChunkLimits(budget=3600, file_limit=600, lock_wait=3600 + AFTER_BUDGET, backstop=9000)
        assert limits.backstop == limits.lock_wait + limits.budget + AFTER_BUDGET

    def test_nothing_ahead_means_no_wait(self):
        assert chunk_limits(600, queued_ahead=0) == ChunkLimits(600, None, 0, 600 + AFTER_BUDGET)

    def test_the_largest_budget_still_covers_one_chunk_ahead_within_ssms_limit(self):
        limits = chunk_limits(MAX_CHUNK_BUDGET, queued_ahead=1)

        assert limits.backstop <= MAX_EXECUTION_TIMEOUT
        assert limits.lock_wait == MAX_CHUNK_BUDGET + AFTER_BUDGET

    def test_more_chunks_ahead_than_ssm_allows_cut_the_wait_never_the_budget(self):
        limits = chunk_limits(50_000, queued_ahead=3)

        assert limits.backstop == MAX_EXECUTION_TIMEOUT
        assert limits.budget == 50_000
        assert limits.lock_wait == MAX_EXECUTION_TIMEOUT - 50_000 - AFTER_BUDGET

    @pytest.mark.parametrize(
        "kwargs",
        [
            pytest.param({"budget": 0, "queued_ahead": 1}, id="no-budget"),
            pytest.param({"budget": MAX_EXECUTION_TIMEOUT, "queued_ahead": 0}, id="budget-over-ssm-limit"),
            pytest.param({"budget": 60, "queued_ahead": -1}, id="negative-queue"),
            pytest.param({"budget": 60, "queued_ahead": 1, "file_limit": 0}, id="zero-file-limit"),
        ],
    )
    def test_impossible_limits_are_refused(self, kwargs):
        with pytest.raises(ValueError):
            chunk_limits(**kwargs)


class TestPlanBatch:
    def test_keys_and_uris_resolve_with_named_outputs(self, s3):
        put(s3, "in/a.mp4")
        s3.create_bucket(Bucket="elsewhere")
        put(s3, "b.mov", bucket="elsewhere")

        plan = plan_batch(request("in/a.mp4", "s3://elsewhere/b.mov"), s3, run_token=TOKEN)

        (chunk,) = plan.chunks
        assert [(f.source.uri, f.output.uri) for f in chunk.files] == [
            ("s3://src-bucket/in/a.mp4", "s3://out-bucket/in/a_sr_A.mp4"),
            ("s3://elsewhere/b.mov", "s3://out-bucket/b_sr_A.mov"),
        ]

    @pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
    def test_any_key_s3_accepts_is_planned(self, s3, key):
        put(s3, key)

        plan = plan_batch(request(key), s3, run_token=TOKEN)

        assert plan.chunks[0].files[0].source.key == key

    def test_missing_source_is_named_before_anything_starts(self, s3):
        put(s3, "here.mp4")

        with pytest.raises(PlanError, match=r"missing source objects: 's3://src-bucket/not-here.mp4'"):
            plan_batch(request("here.mp4", "not-here.mp4"), s3, run_token=TOKEN)

    def test_prefix_of_a_real_key_is_not_mistaken_for_it(self, s3):
        put(s3, "clip.mp4.bak")

        with pytest.raises(PlanError, match="missing source objects: 's3://src-bucket/clip.mp4'"):
            plan_batch(request("clip.mp4"), s3, run_token=TOKEN)

    def test_missing_source_bucket(self, s3):
        with pytest.raises(PlanError, match="bucket 'no-such-bucket' does not exist"):
            plan_batch(request("s3://no-such-bucket/a.mp4"), s3, run_token=TOKEN)

    def test_missing_output_bucket(self, s3):
        put(s3, "a.mp4")

        with pytest.raises(PlanError, match="output bucket 'gone-bucket' is not accessible"):
            plan_batch(request("a.mp4", output_bucket="gone-bucket"), s3, run_token=TOKEN)

    def test_empty_source_object(self, s3):
        put(s3, "zero.mp4", body=b"")

        with pytest.raises(PlanError, match="empty \\(0 bytes\\): 's3://src-bucket/zero.mp4'"):
            plan_batch(request("zero.mp4"), s3, run_token=TOKEN)

    def test_output_equal_to_source_is_refused(self, s3):
        put(s3, "a.mp4")

        with pytest.raises(PlanError, match="output 's3://src-bucket/a.mp4' is the source itself"):
            plan_batch(request("a.mp4", output_bucket=SOURCE, output_template="{dir}{name}"), s3, run_token=TOKEN)

    def test_two_sources_mapping_to_one_output_are_refused(self, s3):
        put(s3, "x/a.mp4")
        put(s3, "y/a.mp4")

        with pytest.raises(PlanError, match="both map to output 's3://out-bucket/a.mp4'"):
            plan_batch(request("x/a.mp4", "y/a.mp4", output_template="{name}"), s3, run_token=TOKEN)

    def test_duplicates_are_planned_once(self, s3):
        put(s3, "a.mp4")

        plan = plan_batch(request("a.mp4", "s3://src-bucket/a.mp4", "a.mp4"), s3, run_token=TOKEN)

        assert sum(len(c.files) for c in plan.chunks) == 1

    def test_existing_outputs_are_skipped_unless_overwrite(self, s3):
        put(s3, "a.mp4")
        put(s3, "b.mp4")
        put(s3, "a_sr_A.mp4", bucket=OUTPUT)

        plan = plan_batch(request("a.mp4", "b.mp4"), s3, run_token=TOKEN)
        forced = plan_batch(request("a.mp4", "b.mp4", overwrite=True), s3, run_token=TOKEN)

        assert [f.source.key for f in plan.skipped] == ["a.mp4"]
        assert [f.source.key for c in plan.chunks for f in c.files] == ["b.mp4"]
        assert forced.skipped == ()
        assert [f.source.key for c in forced.chunks for f in c.files] == ["a.mp4", "b.mp4"]

    def test_existence_is_checked_with_one_listing_per_folder_not_per_file(self, s3):
        keys = [f"batch/clip-{n:03}.mp4" for n in range(250)]
        for key in keys:
            put(s3, key)
        calls: list[str] = []
        s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))

        plan_batch(request(*keys), s3, run_token=TOKEN)

        # sources and outputs: one paginated listing each (250 keys fit a page), plus HeadBucket on the output.
        assert sorted(calls) == ["HeadBucket", "ListObjectsV2", "ListObjectsV2"]


class TestChunking:
    JOBS = [FileJob(n, S3Object("b", f"{n}.mp4"), S3Object("o", f"{n}.mp4")) for n in range(25)]

    def test_chunks_hold_chunk_size_files_in_order(self):
        chunks = chunk_files(self.JOBS, (INSTANCE_ID,), 10)

        assert [len(c.files) for c in chunks] == [10, 10, 5]
        assert [f.index for c in chunks for f in c.files] == list(range(25))

    def test_ten_thousand_files_keep_the_chunk_size_asked_for(self):
        # Chunks are not mapped tasks: a big plan keeps its chunk size (and so each chunk's time budget holds).
        jobs = [FileJob(n, S3Object("b", f"{n}.mp4"), S3Object("o", f"{n}.mp4")) for n in range(10_000)]

        chunks = chunk_files(jobs, (INSTANCE_ID,), 1)

        assert len(chunks) == 10_000 and {len(c.files) for c in chunks} == {1}

    def test_a_million_files_grow_their_chunks_only_to_stay_under_the_chunk_limit(self):
        jobs = [FileJob(n, S3Object("b", f"{n}.mp4"), S3Object("o", f"{n}.mp4")) for n in range(1_000_000)]

        chunks = chunk_files(jobs, (INSTANCE_ID,), 10)

        assert len(chunks) <= MAX_CHUNKS and max(len(c.files) for c in chunks) == 11
        assert sum(len(c.files) for c in chunks) == 1_000_000

    def test_chunks_are_dealt_out_to_the_instances_in_turn(self):
        chunks = chunk_files(self.JOBS, ("i-aaaaaaaaaaaaaaaaa", "i-bbbbbbbbbbbbbbbbb"), 5)

        assert [c.instance_id[2] for c in chunks] == ["a", "b", "a", "b", "a"]

    def test_chunk_round_trips_through_xcom(self):
        (chunk, *_) = chunk_files(self.JOBS, (INSTANCE_ID,), 10)

        assert type(chunk).from_xcom(chunk.to_xcom()) == chunk


def test_run_token_is_stable_and_ascii():
    assert run_token("vod_sr_batch", "manual__2026") == run_token("vod_sr_batch", "manual__2026")
    assert run_token("vod_sr_batch", "manual__2026") != run_token("vod_sr_batch", "manual__2027")
    assert run_token("d", "r").isascii() and len(run_token("d", "r")) == 16


class TestSourceForms:
    def test_prefix_lists_videos_by_extension_case_insensitively(self, s3):
        for key in ("in/a.mp4", "in/b.MOV", "in/notes.txt", "in/sub/c.mkv", "other/d.mp4"):
            put(s3, key)

        plan = plan_batch(request(prefixes=["in/"]), s3, run_token=TOKEN)

        assert [f.source.key for c in plan.chunks for f in c.files] == ["in/a.mp4", "in/b.MOV", "in/sub/c.mkv"]

    def test_prefix_uri_and_custom_extensions(self, s3):
        s3.create_bucket(Bucket="archive")
        put(s3, "2024/x.ts", bucket="archive")
        put(s3, "2024/y.mp4", bucket="archive")

        plan = plan_batch(request(prefixes=["s3://archive/2024/"], extensions=[".ts"]), s3, run_token=TOKEN)

        assert [f.source.uri for c in plan.chunks for f in c.files] == ["s3://archive/2024/x.ts"]

    def test_prefix_with_no_videos_is_an_error(self, s3):
        put(s3, "docs/readme.txt")

        with pytest.raises(PlanError, match="prefix 's3://src-bucket/docs/' holds no files ending in"):
            plan_batch(request(prefixes=["docs/"]), s3, run_token=TOKEN)

    @pytest.mark.parametrize(
        ("name", "body"),
        [
            pytest.param("list.txt", "a.mp4\r\ns3://src-bucket/b.mp4\n\n", id="text"),
            pytest.param("list.csv", "title,key\nA,a.mp4\nB,s3://src-bucket/b.mp4\n", id="csv-key-column"),
            pytest.param("list.csv", "a.mp4\ns3://src-bucket/b.mp4\n", id="csv-first-column"),
            pytest.param("list.json", '["a.mp4", "s3://src-bucket/b.mp4"]', id="json-list"),
            pytest.param("list.json", '{"sources": ["a.mp4", "s3://src-bucket/b.mp4"]}', id="json-object"),
        ],
    )
    def test_manifest_formats(self, s3, name, body):
        put(s3, "a.mp4")
        put(s3, "b.mp4")
        put(s3, f"manifests/{name}", body=body.encode())

        plan = plan_batch(request(manifest=f"manifests/{name}"), s3, run_token=TOKEN)

        assert [f.source.key for c in plan.chunks for f in c.files] == ["a.mp4", "b.mp4"]

    def test_json_manifest_carries_keys_with_newlines(self, s3):
        put(s3, "odd\nname.mp4")
        put(s3, "m.json", body=b'["odd\\nname.mp4"]')

        plan = plan_batch(request(manifest="m.json"), s3, run_token=TOKEN)

        assert plan.chunks[0].files[0].source.key == "odd\nname.mp4"

    def test_manifest_entry_that_does_not_exist_is_named(self, s3):
        put(s3, "m.txt", body=b"gone.mp4\n")

        with pytest.raises(PlanError, match="missing source objects: 's3://src-bucket/gone.mp4'"):
            plan_batch(request(manifest="m.txt"), s3, run_token=TOKEN)

    def test_missing_manifest_is_named(self, s3):
        with pytest.raises(PlanError, match="manifest 's3://src-bucket/nope.txt' cannot be read"):
            plan_batch(request(manifest="nope.txt"), s3, run_token=TOKEN)

    def test_bad_json_manifest(self, s3):
        put(s3, "m.json", body=b'{"sources": "a.mp4"}')

        with pytest.raises(PlanError, match="must be a JSON list of strings"):
            plan_batch(request(manifest="m.json"), s3, run_token=TOKEN)

    def test_forms_combine_without_duplicates(self, s3):
        for key in ("in/a.mp4", "in/b.mp4", "c.mp4"):
            put(s3, key)
        put(s3, "m.txt", body=b"in/b.mp4\nc.mp4\n")

        plan = plan_batch(request("in/a.mp4", prefixes=["in/"], manifest="m.txt"), s3, run_token=TOKEN)

        assert [f.source.key for c in plan.chunks for f in c.files] == ["in/a.mp4", "in/b.mp4", "c.mp4"]


class TestBoundedListings:
    """Checking that named keys exist lists only their range of the bucket, not the whole bucket."""

    @staticmethod
    def listing_calls(s3) -> list[dict]:
        calls: list[dict] = []
        s3.meta.events.register("provide-client-params.s3.ListObjectsV2", lambda params, **_: calls.append(params))
        return calls

    def test_root_level_keys_do_not_list_the_whole_bucket(self, s3):
        s3.put_object(Bucket=SOURCE, Key="a.mp4", Body=b"x")
        s3.put_object(Bucket=SOURCE, Key="b.mp4", Body=b"x")
        for n in range(1500):  # a large bucket around them: before "a.mp4" and after "b.mp4"
            s3.put_object(Bucket=SOURCE, Key=f"0-{n:04d}.mp4", Body=b"")
            s3.put_object(Bucket=SOURCE, Key=f"c-{n:04d}.mp4", Body=b"")
        calls = self.listing_calls(s3)

        found = existing_objects(s3, [S3Object(SOURCE, "a.mp4"), S3Object(SOURCE, "b.mp4"), S3Object(SOURCE, "ab.mp4")])

        assert set(found) == {S3Object(SOURCE, "a.mp4"), S3Object(SOURCE, "b.mp4")}
        assert len(calls) == 1 and calls[0]["StartAfter"] == "a.mp"  # one page, not the 3 000 objects in 4 pages

    def test_keys_sorted_as_s3_sorts_them_utf8_bytes(self, s3):
        keys = ["é.mp4", "z.mp4", "Z.mp4", "한.mp4"]
        for key in keys:
            s3.put_object(Bucket=SOURCE, Key=key, Body=b"x")

        found = existing_objects(s3, [S3Object(SOURCE, key) for key in keys])

        assert {obj.key for obj in found} == set(keys)


class TestExistingSizes:
    """What the planner asks of a listing: which objects exist and their sizes, keyed by the caller's own objects."""

    def test_sizes_of_the_objects_that_exist(self, s3):
        put(s3, "in/a.mp4", body=b"12345")
        put(s3, "in/b.mp4", body=b"1")
        put(s3, "c.mp4", bucket=OUTPUT, body=b"123")
        put(s3, "in/unwanted.mp4", body=b"1234567")
        wanted = [S3Object(SOURCE, "in/a.mp4"), S3Object(SOURCE, "in/b.mp4"), S3Object(SOURCE, "in/gone.mp4")]
        wanted += [S3Object(OUTPUT, "c.mp4"), S3Object(OUTPUT, "in/a.mp4")]

        sizes = existing_sizes(s3, wanted)

        assert sizes == {wanted[0]: 5, wanted[1]: 1, wanted[3]: 3}
        # The caller's objects themselves, not copies made from the listing.
        assert {id(obj) for obj in sizes} == {id(wanted[0]), id(wanted[1]), id(wanted[3])}
        # existing_objects (verify, the operators) still gets the whole listing entry.
        entries = existing_objects(s3, wanted)
        assert set(entries) == set(sizes) and {obj: e["Size"] for obj, e in entries.items()} == sizes
        assert all("LastModified" in entry for entry in entries.values())

    def test_nothing_asked_nothing_listed(self, s3):
        calls = TestBoundedListings.listing_calls(s3)

        assert existing_sizes(s3, []) == {} and calls == []

    def test_range_bounds_follow_s3s_utf8_order_beyond_the_bmp(self, s3):
        # UTF-16 would put the emoji (a surrogate pair, 0xD83D...) before U+FFFD; UTF-8 and code points after it.
        keys = ["\ufffd.mp4", "\U0001f600.mp4", "a.mp4", *HOSTILE_KEYS]
        for n, key in enumerate(keys):
            put(s3, key, body=b"x" * (n + 1))
        calls = TestBoundedListings.listing_calls(s3)

        sizes = existing_sizes(s3, [S3Object(SOURCE, key) for key in keys])

        assert sizes == {S3Object(SOURCE, key): n + 1 for n, key in enumerate(keys)}
        assert len(calls) == len({key.rpartition("/")[0] for key in keys})  # one listing per folder

    def test_missing_bucket_is_a_plan_error(self, s3):
        with pytest.raises(PlanError, match="bucket 'no-such-bucket' does not exist"):
            existing_sizes(s3, [S3Object("no-such-bucket", "a.mp4")])


class TestPlanValuesAreSlotted:
    """S3Object, FileJob and Chunk carry no per-instance __dict__ (a million of each in a big plan)."""

    JOB = FileJob(7, S3Object("b", "k 한.mp4"), S3Object("o", "k 한_sr.mp4"))
    CHUNK = Chunk(3, INSTANCE_ID, (JOB,))

    def test_no_instance_dict(self):
        for value in (self.JOB, self.JOB.source, self.CHUNK):
            assert not hasattr(value, "__dict__")

    def test_frozen_hashable_ordered_picklable(self):
        with pytest.raises(AttributeError):
            self.JOB.source.key = "other"  # type: ignore[misc]
        assert S3Object("a", "z") < S3Object("b", "a") and len({self.JOB, FileJob.from_xcom(asdict(self.JOB))}) == 1
        assert pickle.loads(pickle.dumps(self.CHUNK)) == self.CHUNK

    def test_xcom_form_is_asdict_and_round_trips(self):
        assert self.JOB.to_xcom() == asdict(self.JOB)
        assert list(self.JOB.to_xcom()["source"]) == ["bucket", "key"]
        assert Chunk.from_xcom(self.CHUNK.to_xcom()) == self.CHUNK
