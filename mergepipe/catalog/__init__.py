"""The catalog: models, tensors, plans, runs, lineage, evaluations and searches as SQL rows.

Nothing is imported here, so `mergepipe --help` does not load SQLAlchemy or DuckDB.
"""

DEFAULT_SQL_TIMEOUT = 5.0  # seconds before `mergepipe sql` stops a query
