"""
## VOD super-resolution batch

Runs a Bluewhale super-resolution model over source videos on one or more GPU instances through SSM Run Command,
verifies every output in S3, writes a report and stops the instances again, also when something failed.

1. **plan** resolves keys, `s3://` URIs, prefixes and a manifest, names the outputs, skips finished ones and
   deals the files out in chunks to the instances; bad input fails here, before any GPU starts.
2. Per instance (**lane**), independently of the others:
   - **acquire** (setup) takes a lease on the instance and starts it if needed;
   - **wait_for_agent** waits until EC2 says running *and* the SSM agent is Online;
   - **run_chunks** first installs the AWS CLI if the instance lacks it (a no-op otherwise) and counts its GPUs, in
     one command, then sends one SSM command per chunk, three per GPU slot so no GPU waits, and waits for them
     deferred (no worker slot held);
   - **verify** checks each output exists, is non-empty, has the size the instance wrote, was written by this run
     and is its source upscaled (resolution at the model's scale, duration, audio);
   - **release** (teardown) cancels this run's commands still live, drops the lease and stops the instance unless
     another run still uses it.
3. **report** (after every lane's release) logs one row per file, stores a JSON report in S3, says which instances
   were left running and why, and fails the run if any file failed, printing a link and a conf that re-run only
   the failures.

See the README for configuration, manifest formats and IAM.
"""

from __future__ import annotations

from airflow.sdk import DAG

from include.vod_sr.pipeline import vod_sr_dag

vod_sr_batch: DAG = vod_sr_dag("vod_sr_batch", doc_md=__doc__)

if __name__ == "__main__":
    vod_sr_batch.test()
