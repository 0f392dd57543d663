"""One router per resource: search, ingest (and jobs), items, querybank, health."""
