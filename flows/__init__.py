"""The refinery's Prefect flows.

Importing this package has no side effect. Log redaction (core/redact.py) is installed by whatever
starts the work, explicitly: the CLI and `deployments/serve.py` at start, every flow as its first
statement (a served run executes in a process of its own), Dask workers through a worker plugin
(flows/dask_runner.py) and the trainer in its main.
"""
