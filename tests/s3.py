"""An S3-compatible server on 127.0.0.1 for the tests: moto's server mode (`moto_server`).

What it does not emulate, as measured here: it keeps every bucket in memory (nothing survives it);
it accepts any keys (S3_ENV gives DVC some, through the environment, as AWS's tools read them) and
checks no signature or IAM policy; a client that names another region than the bucket's is
served all the same. What it does answer: the S3 calls DVC makes (buckets, uploads, listings) at
the endpoint URL the remote names; without that URL, DVC would look for AWS, which no test reaches.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

MOTO = Path(sys.executable).parent / "moto_server"
REGION = "eu-west-3"  # the buckets' region, not moto's default (us-east-1)
S3_ENV = {"AWS_ACCESS_KEY_ID": "mnist-test", "AWS_SECRET_ACCESS_KEY": "mnist-test-secret"}


@contextmanager
def s3_server(log: Path, start_timeout_s: float = 60.0) -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1 until the block ends; its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as out:
        process = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            assert process.poll() is None, f"moto_server ended ({process.returncode}):\n{log.read_text()[-2000:]}"
            try:
                if httpx.get(endpoint, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"moto_server did not answer within {start_timeout_s:.0f} s"
            time.sleep(0.2)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def make_bucket(endpoint: str, bucket: str) -> None:
    """Create `bucket` in REGION on the server at `endpoint`."""
    _client(endpoint).create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})


def keys_in(endpoint: str, bucket: str) -> list[str]:
    """Every object key in `bucket`."""
    pages = _client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _client(endpoint: str) -> Any:  # boto3 ships no types; the project installs no stubs for it
    """boto3's S3 client for the server at `endpoint`, with S3_ENV's keys."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    )
