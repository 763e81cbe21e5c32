"""
## Baseline for `make bench` (not deployed: it lives outside dags/)

The same batch the way the Amazon provider's stock operators do it, one task chain per file, with their default
intervals: EC2StartInstanceOperator, SsmRunCommandOperator, SsmRunCommandCompletedSensor, S3KeySensor,
EC2StopInstanceOperator. The per-file script is the seed's (minus its pasted keys): download, ffmpeg, upload.
"""

from __future__ import annotations

import shlex
from typing import Any

from airflow.providers.amazon.aws.operators.ec2 import EC2StartInstanceOperator, EC2StopInstanceOperator
from airflow.providers.amazon.aws.operators.ssm import SsmRunCommandOperator
from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.providers.amazon.aws.sensors.ssm import SsmRunCommandCompletedSensor
from airflow.sdk import Param, dag, get_current_context, task

SEED_STYLE_SCRIPT = """\
cd "$HOME"
aws s3 cp {source} ./original-{n}.mp4
ffmpeg -y -i ./original-{n}.mp4 -vf scale=iw*2:ih*2:flags=lanczos \\
    -c:v libx264 -preset veryfast -crf 18 -c:a copy ./sr-{n}.mp4
aws s3 cp ./sr-{n}.mp4 {output}
"""


@dag(
    schedule=None,
    doc_md=__doc__,
    tags=["vod-sr", "benchmark"],
    params={
        "sources": Param([], type="array"),
        "source_bucket": Param("", type="string"),
        "output_bucket": Param("", type="string"),
        "instance_id": Param("", type="string"),
    },
)
def baseline_stock_operators() -> None:
    start_instance = EC2StartInstanceOperator(task_id="start_instance", instance_id="{{ params.instance_id }}")

    @task
    def commands() -> list[dict[str, Any]]:
        params = get_current_context()["params"]
        return [
            {
                "document_name": "AWS-RunShellScript",
                "run_command_kwargs": {
                    "InstanceIds": [params["instance_id"]],
                    "Parameters": {
                        "commands": [
                            SEED_STYLE_SCRIPT.format(
                                n=n,
                                source=shlex.quote(f"s3://{params['source_bucket']}/{key}"),
                                output=shlex.quote(f"s3://{params['output_bucket']}/baseline/{key}"),
                            )
                        ]
                    },
                },
            }
            for n, key in enumerate(params["sources"])
        ]

    @task
    def outputs() -> list[str]:
        params = get_current_context()["params"]
        return [f"s3://{params['output_bucket']}/baseline/{key}" for key in params["sources"]]

    sent = SsmRunCommandOperator.partial(task_id="send", wait_for_completion=False).expand_kwargs(commands())
    done = SsmRunCommandCompletedSensor.partial(task_id="wait").expand(command_id=sent.output)
    landed = S3KeySensor.partial(task_id="output_landed").expand(bucket_key=outputs())
    stop_instance = EC2StopInstanceOperator(
        task_id="stop_instance", instance_id="{{ params.instance_id }}", trigger_rule="all_done"
    )
    start_instance >> sent
    done >> landed >> stop_instance


baseline_stock_operators()
