"""Importing tx-client is light: no jax, torch or transformers until a call needs them."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import tinker

import tx_client

HEAVY = ("jax", "torch", "transformers", "tinker")


def test_importing_every_module_pulls_no_heavy_dependency() -> None:
    modules = [m.name for m in pkgutil.walk_packages(tx_client.__path__, "tx_client.")]
    assert "tx_client.training_client" in modules
    assert len(modules) >= 15
    code = (
        "import importlib, sys\n"
        f"for name in {['tx_client', *modules]!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_public_api_mirrors_the_sdk() -> None:
    """Every client method and exception name the SDK exposes (bar admin/telemetry/console
    extras) exists here, with its ``*_async`` twin where the SDK has one."""
    skip = {"get_telemetry", "get_console_url", "holder", "on_queue_state_change",
            "get_sampler_handle", "from_sampler_handle", "create_custom_loss", "copy_weights",
            "save_weights_external", "save_weights_external_async", "create",
            "get_audit_log", "get_audit_log_async", "copy_weights_async", "whoami",
            "get_external_weights_urls", "get_external_weights_urls_async", "export_session_trace",
            "export_session_trace_async", "assign_session_project", "assign_session_project_async",
            "search_sessions", "get_billing_usage", "get_billing_usage_async",
            "get_current_checkpoint_storage_usage", "get_current_checkpoint_storage_usage_async"}  # fmt: skip
    for name in ("ServiceClient", "TrainingClient", "SamplingClient", "RestClient"):
        theirs = {m for m in dir(getattr(tinker, name)) if not m.startswith("_")} - skip
        ours = {m for m in dir(getattr(tx_client, name)) if not m.startswith("_")}
        assert theirs - ours == set(), name
    for name in ("TinkerError", "APIError", "APIStatusError", "BadRequestError",
                 "AuthenticationError", "PermissionDeniedError", "NotFoundError", "ConflictError",
                 "UnprocessableEntityError", "RateLimitError", "InternalServerError",
                 "APIConnectionError", "APITimeoutError", "RequestFailedError", "APIFuture"):  # fmt: skip
        assert hasattr(tx_client, name), name
    assert tx_client.types.Datum is tx_client.Datum
