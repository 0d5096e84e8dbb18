"""The local stack: loopback stand-ins for the AWS and Snowflake services pgsnow talks to."""
