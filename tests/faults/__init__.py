"""Fault injection under load: real gateway, Redis, PostgreSQL and upstream processes."""
