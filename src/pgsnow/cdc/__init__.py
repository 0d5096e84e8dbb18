"""Change capture (docs/change-capture.md): ``slot`` reads the replication slot's health."""
