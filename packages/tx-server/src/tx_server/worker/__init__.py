"""The worker: executes queued training requests on the engine (``python -m tx_server.worker``).

Importing this package imports neither jax nor the engine; :mod:`tx_server.worker.loop` does.
"""
