"""The rejected-row tables, defined once. Every stage that drops a document writes one row saying
why, in one of two Parquet layouts that share their columns (where, and why): extraction's rows have
no text (none was found) and carry the payload's size; curation's carry the text and its words as
the rejecting stage received them, and the identity groups it mentions (for the bias audit)."""
from __future__ import annotations

import pyarrow as pa

_WHERE = [("url", pa.string()), ("domain", pa.string())]
_WHY = [("source", pa.string()), ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string())]

EXTRACT_REJECTS = pa.schema(_WHERE + [("fetch_time", pa.timestamp("s", tz="UTC"))] + _WHY
                            + [("n_bytes", pa.int64())])
CURATE_REJECTS = pa.schema([("id", pa.string())] + _WHERE + _WHY
                           + [("n_words", pa.int64()), ("groups", pa.list_(pa.string())), ("text", pa.string())])
