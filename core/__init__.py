"""What every layer uses: the typed configuration, atomic IO and hashes, the shard format (the
contract between sharding and training), fault injection, retry classification and log redaction.

Dependencies point one way: core <- tasks <- flows, and core <- models. Nothing here imports tasks,
flows or models (tests/test_layout.py checks it), and importing core has no side effect: the entry
points install log redaction themselves (core.redact.install).
"""
