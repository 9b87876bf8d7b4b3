"""The store: one schema, one engine factory, queries shared by SQLite and PostgreSQL."""
