"""
## vod-sr with 1, 2 and 4 SR streams per GPU, for `make bench` (not deployed: it lives outside dags/)

VOD_SR_STREAMS_PER_GPU is read when a DAG file is parsed (by the dag-processor and by the workers alike), so one
running stack cannot vary it per run. This file makes the same DAG as dags/vod_sr_batch.py three times, each with
its own setting: `vod_sr_bench_streams_1`, `_2`, `_4`; everything else comes from the environment as usual.
"""

from __future__ import annotations

import dataclasses

from airflow.sdk import DAG

from include.vod_sr.pipeline import vod_sr_dag
from include.vod_sr.settings import Settings

STREAMS = (1, 2, 4)


def dag_id(streams: int) -> str:
    return f"vod_sr_bench_streams_{streams}"


_settings = Settings.from_env()
dags: dict[str, DAG] = {
    dag_id(n): vod_sr_dag(
        dag_id(n),
        doc_md=__doc__,
        settings=dataclasses.replace(_settings, streams_per_gpu=n),
    )
    for n in STREAMS
}
globals().update(dags)
