"""Temporary stages of the local Snowflake: one set per session, never in the shared catalog.

Snowflake's "Working with Temporary and Transient Tables" says temporary objects live only in
the session that created them, until it ends, and that stages follow the same semantics; the same
page says a temporary table hides, in its session, another table of that name in the schema
(stated for tables; applied to stages here). So a ``CREATE TEMPORARY STAGE``
is kept here, in the memory of the session that made it: a stage reference in that session
finds it before the permanent stage of the same name, other sessions never see it, it is gone
when the session ends, and it is never written to ``data_dir`` (its CREDENTIALS included).

The permanent stages stay in fakesnow's catalog (``sf_copy_run.STAGES_TABLE``) and their
credentials in ``sf_access``; this module only holds what is per session.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from pgsnow.local.sf_credentials_sql import AwsCredentials

StageKey = tuple[str, str, str]  # (database, schema, name) as stored


@dataclass(frozen=True)
class TemporaryStage:
    """One session's external stage; its credentials are never shown (``AwsCredentials`` hides them)."""

    key: StageKey
    url: str
    storage_integration: str | None
    credentials: AwsCredentials | None
    created_on: datetime.datetime

    def show_row(self) -> dict[str, Any]:
        """The stage as SHOW STAGES lists it (the columns of fakesnow's stage catalog)."""
        database, schema, name = self.key
        return {
            "created_on": self.created_on,
            "name": name,
            "database_name": database,
            "schema_name": schema,
            "url": self.url,
            "has_credentials": "Y" if self.credentials is not None else "N",
            "has_encryption_key": "N",
            "owner": "SYSADMIN",
            "comment": "",
            "region": None,
            "type": "EXTERNAL TEMPORARY",
            "cloud": "AWS",
            "notification_channel": None,
            "storage_integration": self.storage_integration,
            "endpoint": None,
            "owner_role_type": "ROLE",
            "directory_enabled": "N",
        }


@dataclass
class SessionStages:
    """The temporary stages of one session, by (database, schema, name)."""

    _stages: dict[StageKey, TemporaryStage] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self._stages)

    def get(self, key: StageKey) -> TemporaryStage | None:
        return self._stages.get(key)

    def put(self, stage: TemporaryStage) -> None:
        self._stages[stage.key] = stage

    def drop(self, key: StageKey) -> bool:
        return self._stages.pop(key, None) is not None

    def all(self) -> list[TemporaryStage]:
        return list(self._stages.values())
