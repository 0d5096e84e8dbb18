"""The local stack's moto server, run as its own process: ``python -m pgsnow.local.moto_server``.

Why a process of its own: moto keeps its IAM switch (``settings.INITIAL_NO_AUTH_ACTION_COUNT``),
its request counter and every backend *per process*. The stack turns IAM enforcement on, while
other code in the same process (tests with an in-process ``ThreadedMotoServer`` and fake keys)
must keep it off; a subprocess keeps the two apart.

The parent (``pgsnow.local.aws.start_local_aws``) sets ``INITIAL_NO_AUTH_ACTION_COUNT`` in this
process's environment, reads the bound port from the first line this prints
(``PORT <n>``), and stops it by closing its stdin (or terminating it). The server also stops
when the parent dies, because its stdin then reaches end-of-file.

These behaviours of moto 5.2 are changed here, and only in this process (docs/local-fidelity.md):

* A PutObject carrying ``If-Match`` or ``If-None-Match`` is checked and applied under one lock.
  moto checks the condition and then writes, so two conditional writers with the same base ETag
  could both succeed; real S3 lets exactly one win, and pgsnow's manifest writes rely on that.
* S3 requests are authorized under their IAM action, not their API operation name. moto's S3
  code works out the IAM action (HeadObject needs ``s3:GetObject``, ListObjectsV2
  ``s3:ListBucket``, ListObjectVersions ``s3:ListBucketVersions``, a GET with a versionId
  ``s3:GetObjectVersion``...) but its IAM check then uses the operation name
  (``s3:HeadObject``), which no policy grants: every HEAD by a role would be refused.
* A refusal names the caller, the IAM action and the resource, as S3's own message does.
* A Secrets Manager request naming a secret is authorized against that secret's ARN; moto checks
  every Secrets Manager request against resource ``*``, which a policy scoped to one secret
  (as each function's is) never matches.
* ListObjectVersions copies only the versions under the request's prefix before listing them
  (moto deep-copies every version in the bucket on each call, so listing a small prefix of a
  bucket with 10,000 objects took a minute). Same results, a speed-up only.
* A test-only route, ``POST /_pgsnow/seed-objects``, writes objects straight into the S3 backend
  (what as many PUTs would write, without their HTTP and signature cost), so a test can fill a
  bucket with 10,000 objects in seconds. pgsnow's own code never calls it: it reaches S3 only
  through the S3 API, which keeps every check above.
* DeleteObjects is authorized per key (``s3:DeleteObject``, or ``s3:DeleteObjectVersion`` for a
  key with a VersionId) as S3 does, instead of once on the bucket's ARN, where a policy scoped
  to ``bucket/prefix/*`` can never match. If any key is refused, every key is reported refused
  (real S3 reports each key's own result).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import threading
from typing import Any

_CONDITIONAL_PUT_LOCK = threading.Lock()


def make_conditional_puts_atomic() -> None:
    """Wrap moto's S3 ``put_object`` so a conditional PUT's check and write are one step."""
    from moto.s3.responses import S3Response

    original = S3Response.put_object
    if getattr(original, "_pgsnow_atomic", False):
        return

    @functools.wraps(original)
    def put_object(self: Any) -> Any:
        if self.headers.get("If-Match") is None and self.headers.get("If-None-Match") is None:
            return original(self)
        with _CONDITIONAL_PUT_LOCK:
            return original(self)

    put_object._pgsnow_atomic = True  # type: ignore[attr-defined]
    S3Response.put_object = put_object  # type: ignore[method-assign]


def authorize_s3_by_iam_action() -> None:
    """Make moto's S3 IAM check use the IAM action its S3 code records in ``data["Action"]``."""
    from moto.iam import access_control
    from moto.s3 import responses

    if getattr(access_control.S3IAMRequest, "_pgsnow_iam_action", False):
        return
    operation_request = access_control.S3IAMRequest

    from moto.s3.exceptions import S3AccessDeniedError, S3ClientError

    class NamedAccessDenied(S3AccessDeniedError):
        """Access Denied with the message real S3 gives: who, which action, which resource."""

        def __init__(self, message: str) -> None:
            S3ClientError.__init__(self, "AccessDenied", message)

    class IamActionS3Request(operation_request):  # type: ignore[misc,valid-type]
        _pgsnow_iam_action = True

        def __init__(self, *, action: str, data: dict[str, Any], **options: Any) -> None:
            super().__init__(action=data.get("Action") or action, data=data, **options)

        def check_action_permitted(self, resource: str) -> None:
            self._pgsnow_resource = resource
            super().check_action_permitted(resource)

        def _raise_access_denied(self) -> None:
            if "BucketName" in self._data:
                super()._raise_access_denied()
            raise NamedAccessDenied(
                f"User: {self._access_key.arn} is not authorized to perform: {self._action} on resource: "
                f'"{self._pgsnow_resource}" because no identity-based policy allows the {self._action} action'
            )

    # moto imports the class from this module at each check, so replacing it here is enough.
    access_control.S3IAMRequest = IamActionS3Request  # type: ignore[misc,assignment]
    # A HEAD with a versionId reads a version, as a GET with one does.
    responses.ACTION_MAP["KEY"]["HEAD"]["versionId"] = "GetObjectVersion"

    S3Response = responses.S3Response
    authorize = S3Response._authenticate_and_authorize_s3_action

    def authorize_each_deleted_key(
        self: Any, bucket_name: str | None = None, key_name: str | None = None
    ) -> None:
        if key_name is not None or self.data.get("Action") != "DeleteObject" or not self.is_delete_keys():
            authorize(self, bucket_name=bucket_name, key_name=key_name)
            return
        import xmltodict
        from moto.s3.exceptions import BucketAccessDeniedError

        objects = xmltodict.parse(self.body, strip_whitespace=False)["Delete"].get("Object", [])
        try:
            for entry in objects if isinstance(objects, list) else [objects]:
                self.data["Action"] = "DeleteObjectVersion" if entry.get("VersionId") else "DeleteObject"
                authorize(self, bucket_name=bucket_name, key_name=entry["Key"])
        except S3AccessDeniedError as exc:
            # moto answers this error with every key of the request refused.
            raise BucketAccessDeniedError(bucket=bucket_name or "") from exc
        finally:
            self.data["Action"] = "DeleteObject"

    S3Response._authenticate_and_authorize_s3_action = authorize_each_deleted_key  # type: ignore[method-assign]


def authorize_secrets_by_secret_arn() -> None:
    """Give moto's Secrets Manager responses the resource its IAM check needs: the named secret."""
    from moto.secretsmanager.responses import SecretsManagerResponse

    if getattr(SecretsManagerResponse, "_pgsnow_secret_resource", False):
        return

    def determine_resource(self: Any) -> str:
        secret_id = self._get_param("SecretId")
        secret = self.backend.secrets.get(secret_id) if secret_id else None
        # An unknown secret keeps "*": the administrator then gets ResourceNotFound, a role whose
        # policy names other secrets AccessDenied, as in AWS.
        return str(secret.arn) if secret is not None else "*"

    SecretsManagerResponse._determine_resource = determine_resource  # type: ignore[attr-defined]
    SecretsManagerResponse._pgsnow_secret_resource = True  # type: ignore[attr-defined]


class _PrefixedKeys:
    """A bucket's keys as ``list_object_versions`` reads them, only those under ``prefix``."""

    def __init__(self, keys: Any, prefix: str) -> None:
        self._keys = keys
        self._prefix = prefix

    def iterlists(self) -> Any:
        return (
            (name, versions) for name, versions in self._keys.iterlists() if name.startswith(self._prefix)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._keys, name)


class _PrefixedBucket:
    def __init__(self, bucket: Any, prefix: str) -> None:
        self._bucket = bucket
        self.keys = _PrefixedKeys(bucket.keys, prefix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)


class _BackendReadingPrefix:
    """The S3 backend for one ``list_object_versions`` call: its bucket shows only the prefix."""

    def __init__(self, backend: Any, prefix: str) -> None:
        self._backend = backend
        self._prefix = prefix

    def get_bucket(self, bucket_name: str) -> Any:
        return _PrefixedBucket(self._backend.get_bucket(bucket_name), self._prefix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def list_versions_under_prefix_only() -> None:
    """Make moto's ListObjectVersions copy only the versions under the requested prefix."""
    from moto.s3.models import S3Backend

    original = S3Backend.list_object_versions
    if getattr(original, "_pgsnow_prefixed", False):
        return

    @functools.wraps(original)
    def list_object_versions(self: Any, bucket_name: str, *args: Any, **kwargs: Any) -> Any:
        prefix = kwargs.get("prefix")  # moto's S3Response passes every argument by keyword
        if not prefix:
            return original(self, bucket_name, *args, **kwargs)
        return original(_BackendReadingPrefix(self, prefix), bucket_name, *args, **kwargs)  # type: ignore[arg-type]

    list_object_versions._pgsnow_prefixed = True  # type: ignore[attr-defined]
    S3Backend.list_object_versions = list_object_versions  # type: ignore[method-assign]


SEED_OBJECTS_PATH = "/_pgsnow/seed-objects"


def serve_seed_objects_route() -> None:
    """``POST /_pgsnow/seed-objects`` with ``{"bucket": ..., "objects": [[key, text], ...]}``
    writes the objects into the default account's S3 backend (tests only; see the module docstring)."""
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication
    from moto.s3.models import s3_backends

    original = DomainDispatcherApplication.__call__
    if getattr(original, "_pgsnow_seed", False):
        return

    @functools.wraps(original)
    def dispatch(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != SEED_OBJECTS_PATH or environ.get("REQUEST_METHOD") != "POST":
            return original(self, environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        request = json.loads(environ["wsgi.input"].read(length))
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key, text in request["objects"]:
            backend.put_object(request["bucket"], key, text.encode(), disable_notification=True)
        body = json.dumps({"written": len(request["objects"])}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    dispatch._pgsnow_seed = True  # type: ignore[attr-defined]
    DomainDispatcherApplication.__call__ = dispatch  # type: ignore[method-assign]


def serve(host: str, port: int) -> None:
    """Start the server, print its port, and run until stdin closes."""
    from moto.server import ThreadedMotoServer

    # One access-log line per request would drown the parent's output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    make_conditional_puts_atomic()
    authorize_s3_by_iam_action()
    authorize_secrets_by_secret_arn()
    list_versions_under_prefix_only()
    serve_seed_objects_route()
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    _bound_host, bound_port = server.get_host_and_port()
    print(f"PORT {bound_port}", flush=True)
    try:
        # Blocks until the parent closes the pipe or exits.
        sys.stdin.read()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pgsnow.local.moto_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
