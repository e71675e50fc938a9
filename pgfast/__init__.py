"""pgfast: a fast, TLS-first front door for PostgreSQL."""

__version__ = "0.1.0"
