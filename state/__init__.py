"""Durable state (SQLAlchemy 2; SQLite WAL by default, PostgreSQL by URL). Tables arrive with managed jobs."""
