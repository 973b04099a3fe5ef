"""The repo's ``examples/`` scripts, run for a few steps against one real tx-server (API + worker).

They must not only run but learn: the supervised loop's loss falls every step and the RL
loop's mean reward ends clearly above where it started. The served model is the kit's tiny
Qwen3 under the hub name ``Qwen/Qwen3-8B``, whose chat template the examples render with.
The RL run uses one prompt with a group of 16 so that every step has the same shapes (one
compilation), and a learning rate at which the tiny model's reward rises within 8 steps.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tx_server.settings import EngineSettings
from tx_server.testing import RunningServer, run_hub_model_server

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
BASE = "Qwen/Qwen3-8B"
API_KEY = "tml-tx-client-examples-0001"


def _load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tx_examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def examples_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    engine = EngineSettings(max_lora_rank=8, max_lora_adapters=4, max_seq_len=128)
    root = tmp_path_factory.mktemp("examples")
    with run_hub_model_server(root, base_models=[BASE], engine=engine) as server:
        yield server


def _run(server: RunningServer, name: str, *args: str) -> str:
    """Run ``examples/<name>.py`` as a user would: its own process, talking HTTP to the server.

    A subprocess also gets the offline Hugging Face cache that ``run_hub_model_server`` set up
    (``HF_HOME`` / ``HF_HUB_OFFLINE``): huggingface_hub reads them once at import, so an
    in-process ``get_tokenizer()`` would see whatever cache the first importer saw.
    """
    argv = [sys.executable, str(EXAMPLES / f"{name}.py"), "--base-url", server.url]
    proc = subprocess.run(
        [*argv, "--api-key", API_KEY, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _values(out: str, label: str) -> list[float]:
    return [float(v) for v in re.findall(rf"^step +\d+  {label} (\S+)$", out, flags=re.M)]


def test_sl_loop_loss_falls(examples_server: RunningServer) -> None:
    # No --base-model: the example picks the first model the server lists (the one served).
    out = _run(examples_server, "sl_loop", "--steps", "5")
    losses = _values(out, "loss/token")
    assert len(losses) == 5, out
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.85 * losses[0], losses
    assert "sl-loop-final" in out
    assert f"base model: {BASE}" in out


def test_rl_loop_reward_rises(examples_server: RunningServer) -> None:
    argv = ["--base-model", BASE, "--steps", "8", "--num-prompts", "1"]
    out = _run(
        examples_server, "rl_loop", *argv, "--group-size", "16", "--lr", "3e-2", "--seed", "0"
    )
    rewards = _values(out, "mean reward")
    assert len(rewards) == 8, out
    assert all(0.0 <= r <= 1.0 for r in rewards)
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.15, rewards


def test_rl_reward_is_the_share_of_whole_words() -> None:
    """The verifier on real tokenizer output: ' cat' counts, 'cat' and ' 42' do not."""
    from tx_client._tokenizer import load_tokenizer
    from tx_engine.testing import ensure_model

    rl = _load("rl_loop")
    tokenizer = load_tokenizer(str(ensure_model("tiny-qwen3")))
    word = tokenizer.encode(" the", add_special_tokens=False)
    bare = tokenizer.encode("the", add_special_tokens=False)
    digits = tokenizer.encode(" 42", add_special_tokens=False)
    assert len(word) == 1
    assert rl.reward(tokenizer, word) == 1.0
    assert rl.reward(tokenizer, bare + digits) == 0.0
    assert rl.reward(tokenizer, word + bare) == pytest.approx(1 / (1 + len(bare)))
    assert rl.reward(tokenizer, []) == 0.0


def test_sl_render_weights_only_the_assistant_reply() -> None:
    """Rendered with the real chat template, the weighted targets are exactly the reply."""
    from tx_client._tokenizer import load_tokenizer
    from tx_engine.testing import ensure_model

    sl = _load("sl_loop")
    tokenizer = load_tokenizer(str(ensure_model("tiny-qwen3")))
    datum = sl.render(tokenizer, "What is the capital of France?", "Paris.")
    targets = datum.loss_fn_inputs["target_tokens"].data
    weights = datum.loss_fn_inputs["weights"].data
    assert len(targets) == len(weights) == datum.model_input.length
    weighted = [t for t, w in zip(targets, weights, strict=True) if w == 1.0]
    assert set(weights) == {0.0, 1.0}
    assert weights == sorted(weights)  # prompt first, then the reply
    assert tokenizer.decode(weighted) == "Paris.<|im_end|>\n"
    prompt = tokenizer.decode(datum.model_input.to_ints()[: len(weights) - len(weighted) + 1])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "What is the capital of France?" in prompt
