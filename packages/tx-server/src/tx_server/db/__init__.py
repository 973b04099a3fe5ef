"""Persistence: typed ORM models, engine/session handling and the Alembic migrations."""
