"""pgsnow: replicate PostgreSQL tables into Snowflake through an S3 staging bucket."""

__version__ = "0.1.0"
