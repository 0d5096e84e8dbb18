"""Change capture: draining a logical replication slot into staged change files (docs/change-capture.md).

The change-capture contract (change columns, LSNs, how runs chain) is ``pgsnow.changes``.

One file per job:

- ``protocol``: ``decode_message``, a decoder for pgoutput (protocol version 1) messages.
- ``reader``: ``open_stream`` / ``read_changes``: stream the slot from its confirmed position to
  per-table spill files (PostgreSQL COPY CSV), cut at a commit, never confirming a position itself;
  ``ReplicationSession.confirm`` is how the drain confirms once the staged files are durable.
- ``slot``: the one owner of the slot's row: its health (retained WAL, confirmed position, lost or
  missing, not pgoutput's or of another database), ``check_slot`` / ``SlotLostError`` and the
  re-snapshot command a lost slot needs; the reader, the drain and ``pgsnow status`` call it.
- ``stage``: ``stage_table``: a table's spilled segments → local change files in the type contract
  (through a temp table and the full runs' select builders); ``upload_files``.
- ``drain``: ``drain_slot``: one scheduled run (slot check, heartbeat, read, repair of a run that
  died before confirming, stage, manifest before files, drain state, then confirm); docs/extraction.md.
- ``slot``: ``slot_health`` / ``check_slot``: the replication slot's health, a lost slot refused.
"""
