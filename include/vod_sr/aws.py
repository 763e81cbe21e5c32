"""boto3 clients through the Amazon provider's connection handling (endpoint, region, role from the connection)."""

from __future__ import annotations

from typing import Any


def aws_client(service: str, aws_conn_id: str | None, config: Any = None) -> Any:
    """A boto3 client for `service` built from the Airflow connection; `config` (a botocore Config) defaults to
    adaptive retries against throttling (commands.BOTO_CONFIG)."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    from include.vod_sr.commands import BOTO_CONFIG

    return AwsBaseHook(aws_conn_id=aws_conn_id, client_type=service, config=config or BOTO_CONFIG).get_conn()
