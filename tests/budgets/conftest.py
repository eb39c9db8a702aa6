"""Fixtures for the budget tests: the key stores of tests/keys (SQLite and PostgreSQL)."""

from __future__ import annotations

from keys.conftest import database_url, make_store, store

__all__ = ["database_url", "make_store", "store"]
