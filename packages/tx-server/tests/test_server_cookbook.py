"""tinker-cookbook recipes, unmodified, trained against a live tx server (``nox -s cookbook``).

The cookbook is the SDK's main user: its recipes are what researchers run. The tests share one
API + worker serving the kit's tiny model as ``Qwen/Qwen3-8B`` (``cookbook_server`` in
``conftest.py``: the cookbook picks its ``qwen3`` renderer and finds the tokenizer by name,
offline). Each runs a recipe's own command line (or, where a recipe's CLI offers no local
dataset, a short script calling the recipe's trainer, as its docstring advises) in a
subprocess, pointed at the server only through ``TINKER_BASE_URL`` and ``TINKER_API_KEY``, as
a user would (``run_cookbook``). The recipes need torch and a transformers older than the
workspace's, so the session installs them with pip in a venv of its own (see ``noxfile.py``);
elsewhere these tests skip.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tinker

from tx_server.testing import API_KEY, RunningServer

pytestmark = pytest.mark.cookbook
cookbook = pytest.importorskip("tinker_cookbook", reason="installed by `nox -s cookbook` only")

MODEL = "Qwen/Qwen3-8B"  # conftest.COOKBOOK_MODEL, what cookbook_server serves


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_trainer_script(
    run: Callable[..., None], tmp_path: Path, name: str, source: str, *args: str
) -> list[dict[str, Any]]:
    """Run ``source`` (a script calling a recipe's trainer) as ``python <name>.py <args> <log
    dir>`` (with the ``run_cookbook`` fixture ``run``); the ``metrics.jsonl`` rows the trainer
    logged."""
    script, log = tmp_path / f"{name}.py", tmp_path / name
    script.write_text(source)
    run(str(script), *args, str(log))
    return jsonl(log / "metrics.jsonl")


def test_sl_basic_trains_on_a_conversation_file_and_saves_usable_checkpoints(
    cookbook_server: RunningServer, run_cookbook: Callable[..., None], tmp_path: Path
) -> None:
    """``recipes.sl_basic`` with the cookbook's example conversations (the dataset its
    docstring suggests swapping in): held-out NLL falls, and the checkpoints it records are
    real: the sampler checkpoint samples and the state checkpoint starts a new client."""
    data = Path(cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    log = tmp_path / "sl"
    common = "dataset_builder.common_config."
    run_cookbook(
        "-m",
        "tinker_cookbook.recipes.sl_basic",
        f"model_name={MODEL}",
        f"log_path={log}",
        "max_steps=4",
        "eval_every=2",
        "save_every=2",
        "lora_rank=8",
        "learning_rate=1e-3",
        "dataset_builder=tinker_cookbook.supervised.data:FromConversationFileBuilder",
        f"dataset_builder.file_path={data}",
        "dataset_builder.test_size=8",
        f"{common}model_name_for_tokenizer={MODEL}",
        f"{common}renderer_name=qwen3",
        f"{common}max_length=256",
        f"{common}batch_size=8",
    )
    metrics = jsonl(log / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [1.0, 2.0, 3.0, 4.0]
    assert all(math.isfinite(row["train_mean_nll"]) for row in metrics)
    held_out = [row["test/nll"] for row in metrics if "test/nll" in row]
    assert len(held_out) >= 2, metrics
    assert held_out[-1] < held_out[0] - 0.05, held_out

    checkpoints = {row["name"]: row for row in jsonl(log / "checkpoints.jsonl")}
    assert set(checkpoints) == {"000002", "final"}
    final = checkpoints["final"]
    service = tinker.ServiceClient(base_url=cookbook_server.url, api_key=API_KEY)
    try:
        sampler = service.create_sampling_client(model_path=final["sampler_path"]).result()
        prompt = tinker.types.ModelInput.from_ints([5, 17, 42])
        params = tinker.types.SamplingParams(max_tokens=4, temperature=0.0)
        result = sampler.sample(prompt, 1, params).result(timeout=300)
        assert len(result.sequences[0].tokens) == 4
        resumed = service.create_training_client_from_state(final["state_path"]).result()
        assert resumed.get_info().model_data.model_name == MODEL
    finally:
        service.holder.close()


def test_multi_turn_rl_recipe_runs_and_sampler_logprobs_equal_the_trainers(
    cookbook_server: RunningServer,
    run_cookbook: Callable[..., None],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``recipes.multiplayer_rl.guess_number``: multi-turn rollouts (10 turns, prompts growing
    to ~500 tokens), importance-sampling training and per-step sampler refresh. The recipe's
    own ``kl_sample_train`` metrics compare the sampler's logprobs with the trainer's for the
    same tokens: they must agree to float32 rounding. Later turns continue earlier ones from
    the prefix cache (the worker logs it), so this also checks reused prefixes against the
    trainer."""
    caplog.set_level(logging.INFO, logger="tx_server.worker.sampling")
    log = tmp_path / "rl"
    run_cookbook(
        "-m",
        "tinker_cookbook.recipes.multiplayer_rl.guess_number.train",
        f"model_name={MODEL}",
        "renderer_name=qwen3",
        "group_size=2",
        "batch_size=2",
        "max_tokens=8",
        "max_steps=2",
        "eval_every=0",
        "save_every=0",
        f"log_path={log}",
        "behavior_if_log_dir_exists=delete",
    )
    metrics = jsonl(log / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [1.0, 2.0]
    for row in metrics:
        assert row["env/all/total_episodes"] == 4
        assert abs(row["optim/kl_sample_train_v1"]) < 1e-5, row["optim/kl_sample_train_v1"]
        assert 0 <= row["optim/kl_sample_train_v2"] < 1e-8, row["optim/kl_sample_train_v2"]
    assert any("prefix cache:" in r.getMessage() for r in caplog.records)


DPO_SCRIPT = """
import sys

from tinker_cookbook.preference import train_dpo
from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

model, data, log = sys.argv[1:]
common = ChatDatasetBuilderCommonConfig(
    model_name_for_tokenizer=model, renderer_name="qwen3", max_length=256, batch_size=8
)
train_dpo.main(
    train_dpo.Config(
        log_path=log,
        model_name=model,
        recipe_name="tx_dpo_check",
        renderer_name="qwen3",
        dataset_builder=DPODatasetBuilderFromComparisons(
            common_config=common, comparison_builder=ComparisonBuilderFromJsonl(train_path=data)
        ),
        learning_rate=1e-3,
        lr_schedule="constant",
        num_epochs=2,
        lora_rank=8,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
    )
)
"""


def comparisons(n: int) -> list[dict[str, Any]]:
    """``n`` labelled comparisons with one consistent preference (a courteous reply over a
    curt one), the preferred side alternating between A and B so that labels matter."""
    polite, curt = "Certainly, here is a careful answer.", "No."
    rows = []
    for i in range(n):
        chosen_first = i % 2 == 0
        a, b = (polite, curt) if chosen_first else (curt, polite)
        rows.append({
            "comparison": {
                "prompt_conversation": [{"role": "user", "content": f"Question {i}: help me?"}],
                "completion_A": [{"role": "assistant", "content": a}],
                "completion_B": [{"role": "assistant", "content": b}],
            },
            "label": "A" if chosen_first else "B",
        })  # fmt: skip
    return rows


def test_dpo_starts_at_log_two_and_learns_the_preference(
    cookbook_server: RunningServer, run_cookbook: Callable[..., None], tmp_path: Path
) -> None:
    """The cookbook's DPO trainer (``preference.train_dpo.main``, driven by a script as its
    recipe's docstring advises for a custom dataset) on a local comparison file. Its
    reference is a sampling client of the initial weights (``compute_logprobs``) and its
    policy logprobs come from ``forward_backward_custom``: at the first step the two are the
    same weights, so the loss is exactly ``ln 2`` and the margin 0 unless the sampler's
    logprobs differ from the trainer's. Then the preference is learnt."""
    data = tmp_path / "comparisons.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in comparisons(32)))
    metrics = run_trainer_script(run_cookbook, tmp_path, "dpo", DPO_SCRIPT, MODEL, str(data))
    assert [row["step"] for row in metrics] == list(range(8)), metrics
    first, last = metrics[0], metrics[-1]
    assert abs(first["dpo_loss"] - math.log(2)) < 1e-5, first
    assert abs(first["margin"]) < 1e-5, first
    assert last["dpo_loss"] < 0.5 * math.log(2), [row["dpo_loss"] for row in metrics]
    assert last["accuracy"] == 1.0, last


DISTILL_SCRIPT = """
import asyncio
import sys

import chz
from tinker_cookbook import renderers
from tinker_cookbook.distillation import train_on_policy
from tinker_cookbook.distillation.datasets import (
    DistillationDatasetConfig,
    PromptOnlyDataset,
    TeacherConfig,
)
from tinker_cookbook.rl.types import RLDatasetBuilder
from tinker_cookbook.tokenizer_utils import get_tokenizer

model, teacher_path, log = sys.argv[1:]


@chz.chz
class LocalPrompts(RLDatasetBuilder):
    topic: str
    groups_per_batch: int = 4
    group_size: int = 4

    async def __call__(self):
        tokenizer = get_tokenizer(model)
        renderer = renderers.get_renderer("qwen3", tokenizer=tokenizer)
        prompts = [f"Tell me about {self.topic} number {i}." for i in range(32)]
        dataset = PromptOnlyDataset(
            prompts, self.groups_per_batch, self.group_size, renderer, tokenizer
        )
        return dataset, None


asyncio.run(
    train_on_policy.main(
        train_on_policy.Config(
            learning_rate=1e-2,
            dataset_configs=[
                DistillationDatasetConfig(
                    dataset_builder=LocalPrompts(topic="rivers"),
                    teacher_config=TeacherConfig(base_model=model),
                    groups_per_batch=4,
                ),
                DistillationDatasetConfig(
                    dataset_builder=LocalPrompts(topic="mountains"),
                    teacher_config=TeacherConfig(
                        base_model=model, load_checkpoint_path=teacher_path
                    ),
                    groups_per_batch=4,
                ),
            ],
            model_name=model,
            recipe_name="tx_distillation_check",
            renderer_name="qwen3",
            max_tokens=16,
            lora_rank=8,
            log_path=log,
            eval_every=0,
            save_every=0,
        )
    )
)
"""


def trained_teacher(server: RunningServer) -> str:
    """A sampler checkpoint that has learnt to repeat one token whatever came before: a
    teacher far from the base model. (Token ids, not text: a tokenizer looked up by hub name
    in this process would miss the offline aliases, which huggingface_hub reads at import.)"""
    from tinker import types

    tokens = [1000] * 25
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=tokens[1:], dtype="int64")},
    )
    service = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    try:
        tc = service.create_lora_training_client(MODEL, rank=8, seed=5).result(timeout=300)
        for _ in range(12):
            tc.forward_backward([datum], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2))
        return str(tc.save_weights_for_sampler("repeat-teacher").result(timeout=300).path)
    finally:
        service.holder.close()


def test_on_policy_distillation_scores_the_students_samples_as_its_sampler_does(
    cookbook_server: RunningServer, run_cookbook: Callable[..., None], tmp_path: Path
) -> None:
    """The cookbook's on-policy distillation (``distillation.train_on_policy.main``, driven by
    a script with local prompts, as the recipe's docstring advises) with two teachers: the
    base model itself, and a checkpoint taught to repeat one token (by its ``tinker://``
    path).

    The student starts as the base model, so at the first step its sampled logprobs minus
    the base teacher's ``compute_logprobs`` of the same tokens (the recipe's ``teacher_kl``)
    are 0 unless the sampler and the scorer disagree: measured 1e-8. The other teacher is
    far off (~4 nats per token), which shows its checkpoint is the one scoring. Every step
    trains the student (its distance from the base grows). That it also nears the far teacher
    is not asserted: reverse KL from a teacher whose tokens the student never samples moves
    slowly (measured flat over 8 steps on this random tiny model, at 1e-3 and 1e-2)."""
    teacher = trained_teacher(cookbook_server)
    metrics = run_trainer_script(run_cookbook, tmp_path, "distill", DISTILL_SCRIPT, MODEL, teacher)
    assert [row["progress/batch"] for row in metrics] == list(range(8)), metrics
    base_kl = [row["teacher_kl/dataset_0"] for row in metrics]
    far_kl = [row["teacher_kl/dataset_1"] for row in metrics]
    assert abs(base_kl[0]) < 1e-5, base_kl
    assert min(far_kl) > 1.0, far_kl
    assert base_kl[-1] > 0.01, base_kl
