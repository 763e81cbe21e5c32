"""S3 upload notifications to an SQS queue on the emulator: what the README's event-driven setup does on AWS.

moto (server mode included) delivers a bucket's notifications to its SQS queues: `PutBucketNotificationConfiguration`
with `QueueConfigurations` (event types and key prefix/suffix filters) makes each matching upload send the S3 event
JSON to the queue, with the key URL-encoded as S3 does (moto also encodes '/', which S3 leaves as is), and sends S3's
`s3:TestEvent` when the configuration is set. moto does not check the queue policy that AWS requires.
"""

from __future__ import annotations

from include.local_aws.world import boto_client


def create_upload_queue(endpoint_url: str, bucket: str, queue_name: str = "vod-sr-uploads", prefix: str = "") -> str:
    """A queue (created if missing) notified of every object created in `bucket` (under `prefix`); its URL."""
    sqs = boto_client("sqs", endpoint_url)
    queue_url = sqs.create_queue(QueueName=queue_name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    rule = {"Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}} if prefix else {}
    boto_client("s3", endpoint_url).put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"], **rule}]
        },
    )
    return queue_url
