"""S3 for the tests of the ``s3`` resolver: moto's standalone server in threads of the test
process, reached over HTTP by real boto3 clients.

    from .s3 import moto_endpoint_fixture  # noqa: F401  (registers "moto_endpoint")

    def test_something(moto_endpoint: str) -> None:
        bucket = make_bucket(moto_endpoint, {"doom/doom.wad": b"IWAD..."})

The fixture ``moto_endpoint`` (session scope) sets fake credentials in this process's
environment before any client exists (``AWS_ACCESS_KEY_ID=testing``..., region us-east-1, no
shared files, no instance metadata), starts ``moto.server.ThreadedMotoServer`` on a free
port of 127.0.0.1 and yields its URL; at the end it stops the server and puts the
environment back as it was. Processes started meanwhile (gunicorn) inherit the credentials.

What moto does, seen with moto 5.2 and botocore 1.44 (tests relying on it keep it in mind):

* Buckets and objects live in this process's memory, shared by every server of the process;
  a bucket name must be valid (3 characters at least: "b" is refused).
* ``LastModified`` is the time of the PUT, in whole seconds; it cannot be set.
* GetObject honours ``If-Match`` (412 PreconditionFailed) also with ``Range``, and a ranged
  answer (206) carries the object's ETag and ``Content-Range``. A HEAD of a missing key or
  bucket is a bare 404 (error code "404": no body to tell the two apart).
* Every answer has ``Connection: close``: each request opens a connection of its own, and an
  answer's socket belongs to its body only (the connection object no longer has it).
* Access is refused only with IAM authentication on, which is global to the process
  (:func:`access_denied`): then an unknown access key is a 403 InvalidAccessKeyId, and a
  user of moto's IAM without a policy a 403 AccessDenied (bucket policies are not applied).
* boto3 adds a CRC-32 to every PUT; GetObject of the whole object returns it and botocore
  checks it as the body ends; ranged answers carry none.

Also here: ``gunicorn_app()``, the application gunicorn serves in the real-server tests
(``tests.s3:gunicorn_app()``), configured by the environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

# Fake credentials and a region for every client of this process (and of its children).
FAKE_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",  # the machine's own files are never read
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
REMOVED_ENVIRONMENT = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def fake_credentials() -> Iterator[None]:
    """This process's environment with :data:`FAKE_ENVIRONMENT`, as it was again afterwards."""
    saved = {name: os.environ.get(name) for name in (*FAKE_ENVIRONMENT, *REMOVED_ENVIRONMENT)}
    os.environ.update(FAKE_ENVIRONMENT)
    for name in REMOVED_ENVIRONMENT:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session", name="moto_endpoint")
def moto_endpoint_fixture() -> Iterator[str]:
    """The URL of a moto S3 server (see the module doc)."""
    server_module = pytest.importorskip(
        "moto.server", reason="needs moto[server]: pip install 'moto[server]'"
    )
    pytest.importorskip("boto3")
    # moto's server logs every request it serves through werkzeug's logger, at INFO.
    requests_log = logging.getLogger("werkzeug")
    level = requests_log.level
    requests_log.setLevel(logging.WARNING)
    with fake_credentials():
        port = _free_port()
        server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()
            requests_log.setLevel(level)


def client(endpoint: str, **credentials: str) -> Any:
    """A boto3 S3 client of the test's own (path-style addresses, botocore's usual retries)."""
    import boto3
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config, **credentials)


def unique_bucket() -> str:
    return f"zm-{uuid.uuid4().hex[:16]}"


def put_objects(
    endpoint: str,
    bucket: str,
    files: Mapping[str, bytes],
    content_types: Mapping[str, str] | None = None,
    threads: int = 16,
) -> dict[str, str]:
    """Store ``files`` (key -> bytes) in ``bucket``, several at once; their ETags by key.
    (Their LastModified is the time of the PUT: moto cannot be told another.)"""
    s3 = client(endpoint)
    types = content_types or {}

    def put(key: str) -> tuple[str, str]:
        extra = {"ContentType": types[key]} if key in types else {}
        answer = s3.put_object(Bucket=bucket, Key=key, Body=files[key], **extra)
        return key, str(answer["ETag"])

    with ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(put, files))


def make_bucket(
    endpoint: str,
    files: Mapping[str, bytes] = {},  # noqa: B006  (never changed)
    content_types: Mapping[str, str] | None = None,
    name: str | None = None,
) -> str:
    """A new bucket (a fresh name unless ``name``) holding ``files``; its name."""
    bucket = name or unique_bucket()
    client(endpoint).create_bucket(Bucket=bucket)
    put_objects(endpoint, bucket, files, content_types)
    return bucket


@contextlib.contextmanager
def down_endpoint() -> Iterator[str]:
    """The URL of a store that is down: a port of 127.0.0.1 bound but not listening (held for the
    block, so nothing else takes it), where a connection is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


def _reset_auth(endpoint: str, count: str) -> str:
    """Set moto's count of requests served before IAM authentication applies ("0": at once,
    "inf": never, moto's default); the previous one."""
    request = urllib.request.Request(
        endpoint + "/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},  # a form body would not reach moto
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(json.load(answer)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])


@contextlib.contextmanager
def access_denied(endpoint: str) -> Iterator[None]:
    """IAM authentication on for the block: every client of the fake credentials (unknown to
    moto's IAM) gets real 403s from moto, InvalidAccessKeyId (or a bare 403 for a HEAD). Global
    to this process's moto, and restored after the block however it ends."""
    previous = _reset_auth(endpoint, "0")
    try:
        yield
    finally:
        _reset_auth(endpoint, previous)


def denied_client(endpoint: str) -> Any:
    """A client of a user moto's IAM knows and lets do nothing: with :func:`access_denied` on,
    its requests get 403 AccessDenied. (Make it before turning authentication on.)"""
    import boto3

    iam = boto3.session.Session().client("iam", endpoint_url=endpoint)
    user = f"denied-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return client(
        endpoint, aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
    )


# -- the application gunicorn serves --------------------------------------------------------------


def _plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
    return [b"plain app\n"]


def _settings() -> dict[str, Any]:
    route = {
        "resolver": "s3",
        "bucket": os.environ["ZM_TEST_S3_BUCKET"],
        "prefix": os.environ.get("ZM_TEST_S3_PREFIX", ""),
        "endpoint_url": os.environ["ZM_TEST_S3_ENDPOINT"],
    }
    settings = json.loads(os.environ.get("ZM_TEST_SETTINGS") or "{}")
    return {"routes": {"/s3/<path:subpath>": route}, **settings}


def gunicorn_app() -> Any:
    """ZipMiddleware with one route, ``/s3/<path:subpath>``, served by the ``s3`` resolver from
    the environment: ``ZM_TEST_S3_ENDPOINT`` and ``ZM_TEST_S3_BUCKET`` (required),
    ``ZM_TEST_S3_PREFIX`` and ``ZM_TEST_SETTINGS`` (a JSON object of more settings), optional.
    gunicorn calls it: ``tests.s3:gunicorn_app()``."""
    from zipmiddleware import ZipMiddleware

    return ZipMiddleware(_plain_app, **_settings())


async def _plain_asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"plain app\n"})


def asgi_app() -> Any:
    """The same in front of an ASGI app, for uvicorn: ``uvicorn --factory tests.s3:asgi_app``."""
    from zipmiddleware.asgi import ZipMiddleware

    return ZipMiddleware(_plain_asgi_app, **_settings())
