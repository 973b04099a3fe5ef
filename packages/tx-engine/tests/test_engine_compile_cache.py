"""The persistent compilation cache: a second process compiles nothing it can read back.

Each run is a fresh interpreter on one CPU device (jax's cache is process-global; the
``run_on_simulated_devices`` fixture), doing one forward_backward and one optim_step on the
tiny model; jax's own monitoring events count cache hits and misses.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from jax import monitoring
    from tx_engine.compile_cache import enable_compilation_cache
    from tx_engine.config import EngineConfig
    from tx_engine.engine import AdamParams, AdapterBatch, DatumArrays, TrainingEngine

    counts = {"hits": 0, "misses": 0}
    names = {"/jax/compilation_cache/cache_hits": "hits",
             "/jax/compilation_cache/cache_misses": "misses"}
    monitoring.register_event_listener(
        lambda event, **kw: names.get(event) and counts.__setitem__(names[event], counts[names[event]] + 1)
    )
    enable_compilation_cache(sys.argv[2], min_compile_seconds=0.0)
    eng = TrainingEngine(sys.argv[1], EngineConfig(max_lora_rank=8))
    slot = eng.create_adapter(8, seed=1)
    data = [DatumArrays(np.arange(100, 112), {"target_tokens": np.arange(101, 113)})]
    loss = eng.forward_backward([AdapterBatch(slot, data)])[0].metrics["loss:sum"]
    eng.optim_step(slot, AdamParams(1e-2))
    print(json.dumps({**counts, "loss": loss}))
    """
)


def test_a_second_process_reads_every_program_back(
    tiny_qwen3_dir: Path, tmp_path: Path, run_on_simulated_devices: Callable[..., dict[str, Any]]
) -> None:
    cache = tmp_path / "jax-cache"
    first = run_on_simulated_devices(SCRIPT, str(tiny_qwen3_dir), str(cache), devices=1)
    second = run_on_simulated_devices(SCRIPT, str(tiny_qwen3_dir), str(cache), devices=1)
    assert first["misses"] > 0
    assert any(cache.iterdir())
    assert second["misses"] == 0, second
    assert second["hits"] == first["hits"] + first["misses"]  # (one program recurs in a run)
    assert second["loss"] == first["loss"]  # the cached programs compute the same thing


def test_the_first_directory_stays_in_effect(
    tmp_path: Path, run_on_simulated_devices: Callable[..., dict[str, Any]]
) -> None:
    script = textwrap.dedent(
        """
        import json, sys
        from tx_engine.compile_cache import enable_compilation_cache
        first = enable_compilation_cache(sys.argv[1])
        print(json.dumps({"kept": first == enable_compilation_cache(sys.argv[2])}))
        """
    )
    result = run_on_simulated_devices(script, str(tmp_path / "a"), str(tmp_path / "b"), devices=1)
    assert result == {"kept": True}
    assert not (tmp_path / "b").exists()
