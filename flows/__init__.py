"""The refinery's Prefect flows.

Importing this package scrubs secrets from every log record this process creates (core/redact.py):
served runs, CLI runs and Dask workers all import it before they log anything of ours.
"""
from core import redact as _redact

_redact.install()
