"""The local AWS emulator: moto's server, plus an extension for what moto lacks.

Requests pass through `Extension`, a WSGI layer in front of moto's own application. It records every call,
injects throttling, server errors, dropped connections and permission errors, answers the SSM Run Command actions
with `SsmAgent` (which really runs the commands), adds time to EC2 launch/start/stop/terminate, and refuses CreateTags
on an unknown instance as AWS does (moto accepts it). Everything else (S3, EC2, IAM, ...) is moto,
unchanged.

RunInstances goes through `Ec2Lifecycle.plan_launch` before moto (see ec2_lifecycle.py): from a launch template
(`LaunchTemplate={LaunchTemplateId|LaunchTemplateName, Version}`, unknown ones refused with EC2's
`InvalidLaunchTemplateId.NotFound` / `InvalidLaunchTemplateName.NotFoundException`), MaxCount instances when there is
room, and the fault plan's capacity (`{"capacity": {"<type>": N}, "spot_capacity": {"<type>" or "*": N},
"spot_error": ...}`, see faults.py) refuses it whole when it cannot get MinCount: On-Demand with
`InsufficientInstanceCapacity` (HTTP 500), Spot (`InstanceMarketOptions` spot, from the request or the template) with
`InsufficientInstanceCapacity` "There is no Spot capacity available that matches your request." (HTTP 500),
`MaxSpotInstanceCountExceeded` or `SpotMaxPriceTooLow`. Launched instances are pending for `pending_seconds`, then
running; their agent registers like a started instance's. TerminateInstances shows shutting-down for
`shutting_down_seconds` (default: `stopping_seconds`), ends the agent's commands as a stop does, and the instance leaves
SSM once terminated.

Control endpoints, for tests and benchmarks:
    GET  /_local_aws/calls            every AWS call served: [{"service", "action", "time", "caller", "user_agent",
                                      and for S3 "bucket", "key", "query" (parameter names), else "params"}]
    GET  /_local_aws/timeline         per instance (wall-clock seconds): {"running": [[start, stop], ...],
                                      "commands": [{"comment", "status", "start", "end"}, ...], "gpus": N (its
                                      type's), "gpu_busy": {"<GPU>": [[start, end], ...]} (each model ffmpeg run, by
                                      the CUDA_VISIBLE_DEVICES it ran with; see gpus.py)}
    POST /_local_aws/calls/reset      forget the recorded calls
    POST /_local_aws/faults           change timing and faults (see faults.py)
    POST /_local_aws/s3/last-modified {"bucket", "key", "last_modified": ISO 8601}: date an object as if uploaded then
                                      (S3 itself never lets a client set LastModified; tests of time windows need it)
    POST /_local_aws/s3/bulk-objects  {"bucket", "prefix", "count", "bytes" (default 1), "start" (default 0), "suffix"
                                      (default ".mp4")}: `count` objects `<prefix><n, 6+ digits><suffix>` of `bytes`
                                      zero bytes, written straight into moto's S3 (about 30,000 a second, where
                                      PutObject over HTTP manages a few hundred); not in the call log. Answers
                                      {"created", "first_key", "last_key"}. For benchmarks of many sources.
    GET  /_local_aws/health           {"status": "ok"}
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode

from include.local_aws.ec2_lifecycle import Ec2Error, Ec2Lifecycle, LaunchRequest, find_instance
from include.local_aws.faults import DENIED_ERRORS, INVOCATION_READ_ERRORS, FaultPlan, InstanceFaults
from include.local_aws.gpus import gpu_count
from include.local_aws.ssm_agent import SsmAgent, SsmError

# Not secrets: moto accepts any credentials, and botocore and the AWS CLI refuse to sign without some.
EMULATOR_ACCESS_KEY = "local-emulator"
EMULATOR_REGION = "us-east-1"
SSM_ACTIONS = {
    "SendCommand": "send_command",
    "GetCommandInvocation": "get_command_invocation",
    "ListCommandInvocations": "list_command_invocations",
    "ListCommands": "list_commands",
    "CancelCommand": "cancel_command",
    "DescribeInstanceInformation": "describe_instance_information",
}
IMDS_PREFIX = "/_local_aws/imds/"  # + <instance id>/latest/...: each emulated instance's metadata (`_imds`)
CREDENTIAL_SCOPE = re.compile(r"Credential=[^/]+/\d+/([^/]+)/([^/]+)/")

StartResponse = Callable[..., Any]


def emulator_client_env(endpoint_url: str, region: str = EMULATOR_REGION) -> dict[str, str]:
    """Environment that points boto3 and the AWS CLI at the emulator (the role of an instance profile)."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": EMULATOR_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": EMULATOR_ACCESS_KEY,
        "AWS_DEFAULT_REGION": region,
    }


def instance_tools_dir(root: Path) -> Path:
    """A bin directory for the emulated instances: ffmpeg from imageio-ffmpeg, the AWS CLI from this venv."""
    import imageio_ffmpeg

    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    links = {"ffmpeg": Path(imageio_ffmpeg.get_ffmpeg_exe()), "aws": Path(sys.executable).parent / "aws"}
    for name, target in links.items():
        link = bin_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return bin_dir


class Extension:
    """WSGI layer in front of moto: call log, throttling, SSM agent, EC2 timing."""

    def __init__(self, moto_app: Callable[..., Iterable[bytes]], root: Path, faults: FaultPlan) -> None:
        self.moto_app = moto_app
        self.faults = faults
        self.calls: list[dict[str, Any]] = []
        self._calls_lock = threading.Lock()
        self._random = random.Random(0)
        self.endpoint_url = ""
        self._root = root
        self.agent: SsmAgent | None = None
        self.lifecycle = Ec2Lifecycle(faults, on_stopping=self._instance_stopping)

    def start_agent(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        path = f"{instance_tools_dir(self._root)}:{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
        env = {**emulator_client_env(endpoint_url), "PATH": path, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        self.agent = SsmAgent(self._root, self.faults, self.lifecycle, env)

    # --- WSGI ----------------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_local_aws/"):
            return self._control(environ, start_response, path)
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        service, action = self._identify(environ, body)
        # The emulated instances' AWS CLI says so in its User-Agent; everything else is the orchestrator.
        caller = "instance" if environ.get("HTTP_USER_AGENT", "").startswith("aws-cli/") else "orchestrator"
        call = {
            "service": service,
            "action": action,
            "time": time.time(),
            "caller": caller,
            "user_agent": environ.get("HTTP_USER_AGENT", ""),
            **self._call_target(service, environ, body),
        }
        with self._calls_lock:
            self.calls.append(call)
        if (
            service in ("ssm", "ec2")
            and self.faults.throttle_fraction
            and self._random.random() < self.faults.throttle_fraction
        ):
            return self._throttled(service, start_response)
        if service == "ssm" and action == "GetCommandInvocation":
            instance_id = json.loads(body or b"{}").get("InstanceId", "")
            if (error := self.faults.invocation_read_error(instance_id)) is not None:
                return self._injected_error(error, environ, start_response)
        if service == "ssm" and action == "SendCommand":
            targets = json.loads(body or b"{}").get("InstanceIds") or [""]
            if self.faults.send_answer_lost(targets[0]):
                self._ssm(action, body, lambda *args: None)  # accepted: the command exists and runs
                return self._injected_error("connection_drop", environ, start_response)  # ... its answer is lost
        if service == "ssm" and action in SSM_ACTIONS:
            return self._ssm(action, body, start_response)
        if service == "ec2" and (refused := self._ec2_refusal(action, body, environ, start_response)) is not None:
            return refused
        if service == "ec2" and action == "RunInstances":
            return self._run_instances(body, environ, start_response)
        if service == "ec2" and action in ("StartInstances", "StopInstances", "TerminateInstances"):
            return self._ec2_transition(action, body, environ, start_response)
        return self.moto_app(environ, start_response)

    @staticmethod
    def _identify(environ: dict[str, Any], body: bytes) -> tuple[str, str]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        scope = CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        service = scope.group(2) if scope else "unknown"
        if target:
            return service, target.rsplit(".", 1)[-1]
        if service == "s3":
            key_part = environ.get("PATH_INFO", "/").lstrip("/").partition("/")[2]
            return service, f"{environ['REQUEST_METHOD']} {'object' if key_part else 'bucket'}"
        form = parse_qs(body.decode("utf-8", errors="replace")) if body else {}
        query = parse_qs(environ.get("QUERY_STRING", ""))
        action = (form.get("Action") or query.get("Action") or [environ["REQUEST_METHOD"]])[0]
        return service, action

    @staticmethod
    def _call_target(service: str, environ: dict[str, Any], body: bytes) -> dict[str, Any]:
        """What a call acted on, for the call log (the IAM test checks it against the policies): an S3 call's
        bucket, key and query parameter names; any other call's parameters (JSON body or query form)."""
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if service == "s3":
            path = environ.get("PATH_INFO", "/").encode("latin-1").decode("utf-8", errors="replace")
            bucket, _, key = path.lstrip("/").partition("/")
            return {"bucket": bucket, "key": key, "query": sorted(query)}
        try:
            params = json.loads(body) if environ.get("HTTP_X_AMZ_TARGET") else None
        except ValueError:
            params = None
        if not isinstance(params, dict):
            form = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True) if body else query
            params = {name: values[0] for name, values in form.items()}
        return {"params": params}

    @staticmethod
    def _json(start_response: StartResponse, status: str, payload: Any) -> list[bytes]:
        data = json.dumps(payload, default=str).encode()
        start_response(
            status,
            [
                ("Content-Type", "application/x-amz-json-1.1"),
                ("Content-Length", str(len(data))),
                ("x-amzn-RequestId", str(uuid.uuid4())),
            ],
        )
        return [data]

    @staticmethod
    def _ec2_error(start_response: StartResponse, status: str, code: str, message: str) -> list[bytes]:
        data = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
            f"<Code>{code}</Code><Message>{message}</Message></Error></Errors>"
            f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
        ).encode()
        start_response(status, [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
        return [data]

    def _throttled(self, service: str, start_response: StartResponse) -> list[bytes]:
        if service == "ssm":
            return self._json(
                start_response, "400 Bad Request", {"__type": "ThrottlingException", "message": "Rate exceeded"}
            )
        return self._ec2_error(
            start_response, "503 Service Unavailable", "RequestLimitExceeded", "Request limit exceeded."
        )

    def _injected_error(self, error: str, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        answer = INVOCATION_READ_ERRORS[error]
        if answer is None:  # close the connection without a response, as a load balancer dropping it would
            connection = environ.get("werkzeug.socket")
            if connection is not None:
                connection.shutdown(socket.SHUT_RDWR)
            raise ConnectionAbortedError("fault injection: connection dropped")  # werkzeug ignores dropped ones
        status, message = answer
        return self._json(start_response, status, {"__type": error, "message": message})

    def _ssm(self, action: str, body: bytes, start_response: StartResponse) -> list[bytes]:
        assert self.agent is not None
        try:
            payload = getattr(self.agent, SSM_ACTIONS[action])(json.loads(body or b"{}"))
        except SsmError as error:
            return self._json(start_response, "400 Bad Request", {"__type": error.code, "message": error.message})
        return self._json(start_response, "200 OK", payload)

    def _ec2_refusal(
        self, action: str, body: bytes, environ: dict[str, Any], start_response: StartResponse
    ) -> list[bytes] | None:
        """The error AWS answers an EC2 request naming an instance with, when moto would serve it: the permission
        faults, a just-launched instance not visible yet, and CreateTags on an unknown instance. None to let moto serve
        it."""
        form = parse_qs(body.decode("utf-8", errors="replace")) if body else parse_qs(environ.get("QUERY_STRING", ""))
        instance_ids = [values[0] for key, values in form.items() if re.fullmatch(r"(InstanceId|ResourceId)\.\d+", key)]
        named = list(instance_ids)
        for key, values in form.items():  # DescribeTags / DescribeInstances filters on the instance id
            if re.fullmatch(r"Filter\.\d+\.Name", key) and values[0] in ("resource-id", "instance-id"):
                prefix = key[: -len("Name")] + "Value."
                instance_ids += [v[0] for k, v in form.items() if k.startswith(prefix)]
        try:
            self.lifecycle.check_visible(action, named)
            self.lifecycle.check_request(action, instance_ids)
        except Ec2Error as error:
            status = "403 Forbidden" if error.code in DENIED_ERRORS else "400 Bad Request"
            return self._ec2_error(start_response, status, error.code, error.message)
        return None

    def _ec2_transition(
        self, action: str, body: bytes, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        form = parse_qs(body.decode())
        instance_ids = [values[0] for key, values in form.items() if key.startswith("InstanceId.")]
        previous = self.lifecycle.states(instance_ids)
        try:
            if action == "StartInstances":
                self.lifecycle.check_start(instance_ids)
            elif action == "StopInstances":
                self.lifecycle.check_stop(instance_ids)
        except Ec2Error as error:
            return self._ec2_error(start_response, "400 Bad Request", error.code, error.message)
        response = list(self.moto_app(environ, start_response))
        if action == "StartInstances":
            self.lifecycle.started(instance_ids, previous)
        elif action == "StopInstances":
            self.lifecycle.stopped(instance_ids, previous)
        else:
            self.lifecycle.terminated(instance_ids, previous)
        return response

    def _run_instances(self, body: bytes, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """RunInstances as EC2 serves it (see the module docstring): refused whole, or MaxCount (or as many as there
        is room for) instances launched by moto, then pending for a while."""
        fields = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        form = dict(fields)
        if form.get("DryRun", "").lower() == "true":
            return self.moto_app(environ, start_response)
        scope = CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        region = scope.group(1) if scope else EMULATOR_REGION
        try:
            launch = self.lifecycle.plan_launch(LaunchRequest.from_form(form, region))
        except (Ec2Error, ValueError) as error:
            code, status = getattr(error, "code", "InvalidParameterValue"), getattr(error, "status", "400 Bad Request")
            return self._ec2_error(start_response, status, code, getattr(error, "message", str(error)))
        counts = {"MinCount": str(launch.count), "MaxCount": str(launch.count)}  # moto launches MinCount
        rewritten = urlencode([(key, counts.get(key, value)) for key, value in fields]).encode()
        environ["wsgi.input"] = io.BytesIO(rewritten)
        environ["CONTENT_LENGTH"] = str(len(rewritten))
        response = list(self.moto_app(environ, start_response))
        found = re.findall(r"<instanceId>(i-[0-9a-f]+)</instanceId>", b"".join(response).decode("utf-8", "replace"))
        self.lifecycle.launched(list(dict.fromkeys(found)), launch)
        return response

    def _imds(self, method: str, path: str, start_response: StartResponse) -> list[bytes]:
        """The instance metadata an emulated instance can read (its agent's AWS_EC2_METADATA_SERVICE_ENDPOINT):
        IMDSv2's token and `spot/instance-action`, 404 until the instance has an interruption notice."""
        instance_id, _, rest = path.partition("/")
        if rest == "latest/api/token" and method == "PUT":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"emulated-imds-token"]
        if rest == "latest/meta-data/spot/instance-action" and method == "GET":
            action = self.lifecycle.spot_instance_action(instance_id)
            if action is not None:
                return self._json(start_response, "200 OK", action)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"Not Found"]

    def _instance_stopping(self, instance_id: str, agent_was_up: bool) -> None:
        if self.agent is not None:
            self.agent.instance_stopping(instance_id, agent_was_up)

    def record_call(self, call: dict[str, Any]) -> None:
        """Add a call made without HTTP to the call log: the synthetic SR stand-in's S3 calls (synthetic_sr.py)."""
        with self._calls_lock:
            self.calls.append(call)

    def _control(self, environ: dict[str, Any], start_response: StartResponse, path: str) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        if path.startswith(IMDS_PREFIX):
            return self._imds(method, path.removeprefix(IMDS_PREFIX), start_response)
        if path == "/_local_aws/health":
            return self._json(start_response, "200 OK", {"status": "ok"})
        if path == "/_local_aws/calls" and method == "GET":
            with self._calls_lock:
                return self._json(start_response, "200 OK", list(self.calls))
        if path == "/_local_aws/timeline" and method == "GET":
            assert self.agent is not None
            commands, gpu_busy = self.agent.timeline(), self.agent.gpu_busy()
            instances = set(commands) | set(self.lifecycle.running_intervals) | set(gpu_busy)
            return self._json(
                start_response,
                "200 OK",
                {
                    i: {
                        "running": self.lifecycle.running_intervals.get(i, []),
                        "commands": commands.get(i, []),
                        "gpus": gpu_count(getattr(find_instance(i), "instance_type", None)),
                        "gpu_busy": gpu_busy.get(i, {}),
                    }
                    for i in sorted(instances)
                },
            )
        if path == "/_local_aws/calls/reset" and method == "POST":
            with self._calls_lock:
                self.calls.clear()
            return self._json(start_response, "200 OK", {})
        if path == "/_local_aws/faults" and method == "POST":
            raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            try:
                self.faults.update(json.loads(raw or b"{}"))
            except (ValueError, TypeError) as error:
                return self._json(start_response, "400 Bad Request", {"error": str(error)})
            return self._json(start_response, "200 OK", {})
        if path == "/_local_aws/s3/last-modified" and method == "POST":
            raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            try:
                request = json.loads(raw)
                set_last_modified(request["bucket"], request["key"], request["last_modified"])
            except (ValueError, TypeError, KeyError) as error:
                return self._json(start_response, "400 Bad Request", {"error": f"{type(error).__name__}: {error}"})
            return self._json(start_response, "200 OK", {})
        if path == "/_local_aws/s3/bulk-objects" and method == "POST":
            raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            try:
                request = json.loads(raw)
                created = create_objects(
                    request["bucket"],
                    request["prefix"],
                    int(request["count"]),
                    size=int(request.get("bytes", 1)),
                    start=int(request.get("start", 0)),
                    suffix=str(request.get("suffix", ".mp4")),
                )
            except (ValueError, TypeError, KeyError) as error:
                return self._json(start_response, "400 Bad Request", {"error": f"{type(error).__name__}: {error}"})
            return self._json(start_response, "200 OK", created)
        return self._json(start_response, "404 Not Found", {"error": f"no control endpoint {method} {path}"})


def set_last_modified(bucket: str, key: str, last_modified: str) -> None:
    """Date an S3 object in moto's store (UTC, whole seconds, as S3 keeps it). Raises KeyError if it is missing."""
    from datetime import UTC, datetime

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    when = datetime.fromisoformat(last_modified.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"last_modified {last_modified!r} has no time zone")
    stored = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(bucket, key)
    if stored is None:
        raise KeyError(f"s3://{bucket}/{key}")
    stored.last_modified = when.astimezone(UTC).replace(tzinfo=None, microsecond=0)  # moto keeps naive UTC


def create_objects(
    bucket: str, prefix: str, count: int, *, size: int = 1, start: int = 0, suffix: str = ".mp4"
) -> dict[str, Any]:
    """`count` objects `<prefix><number><suffix>` of `size` zero bytes in moto's store, numbered from `start` with at
    least six digits (so S3's order is number order). KeyError for a missing bucket, ValueError for bad counts."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    if not 0 < count <= 1_000_000 or not 0 <= size <= 1_048_576 or start < 0:
        raise ValueError(f"count {count} must be 1..1,000,000, bytes {size} 0..1 MiB and start {start} 0 or more")
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    if bucket not in backend.buckets:
        raise KeyError(f"no bucket {bucket!r}")
    digits = max(6, len(str(start + count - 1)))
    body = b"\0" * size
    keys = [f"{prefix}{n:0{digits}d}{suffix}" for n in range(start, start + count)]
    for key in keys:
        backend.put_object(bucket, key, body)
    return {"created": count, "first_key": keys[0], "last_key": keys[-1]}


class LocalAws:
    """moto server plus the extension, in a background thread. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        state_dir: Path | None = None,
        defaults: InstanceFaults | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._own_state_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="local-aws-"))
        self.faults = FaultPlan(defaults=defaults or InstanceFaults(), instances={})
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.extension: Extension | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalAws:
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.extension = Extension(DomainDispatcherApplication(create_backend_app), self.state_dir, self.faults)
        self._server = make_server(
            self.host, self.port, self.extension, threaded=True, request_handler=MotoRequestHandler
        )
        self.port = self._server.server_address[1]
        self.extension.start_agent(self.endpoint_url)
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-aws", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.extension is not None and self.extension.agent is not None:
            self.extension.agent.shutdown()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> LocalAws:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
