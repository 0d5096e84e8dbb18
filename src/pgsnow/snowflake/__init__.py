"""Snowflake: the connection, the SQL the loader sends, and the one error classifier.

- ``connection``: ``connect`` and the connector arguments (key pair from Secrets Manager, or a
  password locally).
- ``session_sql``: what a session runs once when ``connect`` opens it (its ``LOCK_TIMEOUT``).
- ``sql_text``: what every builder shares: the one paramstyle, its placeholders, string literals.
- ``table_sql``: target tables: DDL, column look-ups, schema evolution, the write modes (MERGE,
  swap, deletes); and the load ledger's statements (moving to ``pgsnow.ledger``).
- ``load_sql``: reading staged files: stages, stage credentials, COPY, Snowpipe pipes, the INSERT
  of ``LOAD_METHOD=insert`` (each value converted the same way), and the session's query tag.
- ``error_classifier``: ``classify_snowflake_error`` (retryable or permanent) and
  ``redact_credentials``.

SQL is built by pure functions so each shape can be read and unit-tested as text. Every
identifier goes through ``quote_ident``/``quote_qualified``; values are bound. Things Snowflake
cannot bind (stage paths, ``FILES = (...)``, the session query tag, the credentials method's
``CREDENTIALS = (...)``) are built only from values we parsed and validated, and are escaped as
string literals on top of that. SQL that carries credentials never reaches a log line or an
error message (``redact_credentials``).
"""
