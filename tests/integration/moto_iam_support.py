"""A moto server that enforces IAM, for the local Snowflake's stage-access tests.

moto checks signatures and IAM policies once ``INITIAL_NO_AUTH_ACTION_COUNT`` requests have been
served; the setting is read from the environment at import, and moto's in-process server shares
its request counter with every other moto in this process, so this server is a subprocess of its
own. Its first three calls (the count) create the admin user, its allow-all policy and its access
key; everything after that is signed and checked.

Minimal on purpose: the stack-wide version belongs to ``pgsnow.local.iam``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config

REGION = "us-east-1"
UNAUTHENTICATED_SETUP_CALLS = 3  # create_user, put_user_policy, create_access_key of the admin
STARTUP_TIMEOUT_SECONDS = 30.0
# moto authorises an API call by its own name (s3:ListObjectsV2, s3:HeadObject) where AWS uses the
# IAM action (s3:ListBucket, s3:GetObject); a role granted only the AWS names is refused listing
# by moto, so policies name both.
MOTO_LIST_ACTIONS = ["s3:ListBucket", "s3:ListObjectsV2"]
MOTO_READ_ACTIONS = ["s3:GetObject", "s3:GetObjectVersion", "s3:HeadObject"]


@dataclass(frozen=True)
class AccessKey:
    key_id: str
    secret: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


@dataclass
class IamMoto:
    """A moto server subprocess with IAM enforced, and its admin's key."""

    endpoint_url: str
    admin: AccessKey
    _process: subprocess.Popen[bytes] = field(repr=False)

    def client(self, service: str, key: AccessKey | None = None) -> Any:
        key = key or self.admin
        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=key.key_id,
            aws_secret_access_key=key.secret,
            aws_session_token=key.token,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def create_user(self, name: str, statements: list[dict[str, Any]]) -> tuple[str, AccessKey]:
        """A user with an inline policy and an access key; its ARN and key."""
        iam = self.client("iam")
        arn = str(iam.create_user(UserName=name)["User"]["Arn"])
        iam.put_user_policy(UserName=name, PolicyName="inline", PolicyDocument=_policy(statements))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return arn, AccessKey(key["AccessKeyId"], key["SecretAccessKey"])

    def create_storage_role(
        self, name: str, *, trusted_arn: str, external_id: str | None, bucket: str, prefix: str
    ) -> str:
        """The role an integration assumes: trusts ``trusted_arn`` (with the external id), reads ``prefix``."""
        trust: dict[str, Any] = {
            "Effect": "Allow",
            "Principal": {"AWS": trusted_arn},
            "Action": "sts:AssumeRole",
        }
        if external_id is not None:
            trust["Condition"] = {"StringEquals": {"sts:ExternalId": external_id}}
        iam = self.client("iam")
        arn = str(iam.create_role(RoleName=name, AssumeRolePolicyDocument=_policy([trust]))["Role"]["Arn"])
        iam.put_role_policy(
            RoleName=name,
            PolicyName="read-prefix",
            PolicyDocument=_policy(read_prefix_statements(bucket, prefix)),
        )
        return arn

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def read_prefix_statements(bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Read objects under ``prefix`` and list the bucket: the template's storage role, in moto's terms."""
    return [
        {"Effect": "Allow", "Action": MOTO_READ_ACTIONS, "Resource": f"arn:aws:s3:::{bucket}/{prefix}*"},
        {"Effect": "Allow", "Action": MOTO_LIST_ACTIONS, "Resource": f"arn:aws:s3:::{bucket}"},
    ]


def _policy(statements: list[dict[str, Any]]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_iam_moto() -> IamMoto:
    """Start moto with IAM enforced after the admin is created; the caller stops it."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(UNAUTHENTICATED_SETUP_CALLS)}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto did not start on port {port}") from None
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    bootstrap = IamMoto(endpoint, AccessKey("testing", "testing"), process)
    iam = bootstrap.client("iam")
    iam.create_user(UserName="admin")
    iam.put_user_policy(
        UserName="admin",
        PolicyName="all",
        PolicyDocument=_policy([{"Effect": "Allow", "Action": "*", "Resource": "*"}]),
    )
    key = iam.create_access_key(UserName="admin")["AccessKey"]
    return IamMoto(endpoint, AccessKey(key["AccessKeyId"], key["SecretAccessKey"]), process)
