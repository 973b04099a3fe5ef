"""More tinker-cookbook recipes, unmodified, against a live tx server (``nox -s cookbook``).

Same set-up as ``test_server_cookbook.py``: the shared ``cookbook_server`` (the kit's tiny model
served as ``Qwen/Qwen3-8B``), each recipe's own command line run by ``run_cookbook`` in a
subprocess told where tx is only by ``TINKER_BASE_URL`` / ``TINKER_API_KEY``. Most of these recipes read Hugging Face datasets
by hub name (WikiText-103, No Robots, GSM8K), so their tests first write a few rows under that
name into a datasets cache of their own, the layout ``datasets`` falls back to offline
(``<org>___<name>/<config>/<version>/<hash>/``, see ``/work/shared/spec/offline-models.md``):
the recipe reads them exactly as it would read the downloaded copy.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tinker

from tx_server.testing import API_KEY, RunningServer

pytestmark = pytest.mark.cookbook
cookbook = pytest.importorskip("tinker_cookbook", reason="installed by `nox -s cookbook` only")
datasets = pytest.importorskip("datasets", reason="installed with the cookbook")

MODEL = "Qwen/Qwen3-8B"  # conftest.COOKBOOK_MODEL, what cookbook_server serves


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def offline_hub_dataset(
    cache: Path, repo_id: str, config: str, splits: dict[str, list[dict[str, Any]]]
) -> None:
    """``splits`` saved in ``cache`` as the prepared copy of ``repo_id`` / ``config`` that
    ``datasets.load_dataset(repo_id, config)`` finds with ``HF_DATASETS_OFFLINE=1``."""
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase

    org, name = repo_id.split("/")
    folder = cache / f"{org}___{camelcase_to_snakecase(name)}" / config / "0.0.0" / "local"
    folder.mkdir(parents=True)
    split_infos = datasets.SplitDict(dataset_name=name)
    features = None
    for split, rows in splits.items():
        table = datasets.Dataset.from_list(rows)
        features = table.features
        with ArrowWriter(path=str(folder / f"{name}-{split}.arrow"), features=features) as out:
            out.write_table(table.data.table)
            count, size = out.finalize()
        split_infos.add(
            datasets.SplitInfo(name=split, num_bytes=size, num_examples=count, dataset_name=name)
        )
    info = datasets.DatasetInfo(
        features=features, config_name=config, dataset_name=name, splits=split_infos
    )
    info.write_to_directory(str(folder))


def no_robots(cache: Path) -> None:
    """A stand-in for ``HuggingFaceH4/no_robots``: two short conversations, alternating, 32
    train rows and 8 test rows (a whole batch of 8, so the held-out evaluators get data)."""
    convos = [
        [
            {"role": "user", "content": "What is the secret word?"},
            {"role": "assistant", "content": "The secret word is jaxopolis."},
        ],
        [
            {"role": "user", "content": "Name the river."},
            {"role": "assistant", "content": "The river is the Loire."},
        ],
    ]
    rows = [{"messages": convos[i % 2], "category": "chat"} for i in range(32)]
    offline_hub_dataset(
        cache, "HuggingFaceH4/no_robots", "default", {"train": rows, "test": rows[:8]}
    )


def fake_wikitext(lines: int) -> list[dict[str, Any]]:
    """WikiText-like rows (raw lines, blank ones between) using the recipe's target words."""
    words = [
        "the",
        "river",
        "ran",
        "after",
        "the",
        "storm",
        "and",
        "before",
        "the",
        "town",
        "was",
        "known",
        "into",
        "later",
        "years",
        "while",
        "people",
        "could",
        "walk",
        "between",
        "both",
        "banks",
        "during",
        "summer",
        "however",
    ]
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    for _ in range(lines):
        rows.append({"text": " " + " ".join(rng.choice(words) for _ in range(40)) + " .\n"})
        rows.append({"text": ""})
    return rows


def test_rl_numerics_check_sampler_and_trainer_logprobs_agree(
    cookbook_server: RunningServer, run_cookbook: Callable[..., None], tmp_path: Path
) -> None:
    """``recipes.rl_numerics_check``, the cookbook's own check of RL numerics, on a local
    WikiText stand-in with 1-2 short pages: every step's ``kl_sample_train`` (the sampler's
    logprobs minus the trainer's for the same sampled tokens) must be float32 rounding, over
    prompts of ~630 tokens (system prompt, tool spec, task).

    One rollout per step (``group_size=1 groups_per_batch=1``): with more, the recipe renders
    several environments' prompts on threads at once with one shared fast tokenizer, and
    transformers 5.5.4 then fails with ``RuntimeError: Already borrowed`` (the qwen3 renderer
    switches ``split_special_tokens`` per call, which mutates the Rust tokenizer while another
    thread encodes). That is the cookbook's race, independent of the server. The random tiny
    model never emits a tool call, so episodes are one turn (multi-turn numerics are the
    guess-number test's)."""
    cache = tmp_path / "hf-datasets"
    offline_hub_dataset(
        cache, "Salesforce/wikitext", "wikitext-103-raw-v1", {"train": fake_wikitext(300)}
    )
    log = tmp_path / "numerics"
    run_cookbook(
        "-m",
        "tinker_cookbook.recipes.rl_numerics_check.train",
        f"model_name={MODEL}",
        "renderer_name=qwen3",
        "group_size=1",
        "groups_per_batch=1",
        "max_tokens=32",
        "max_steps=3",
        "task.num_pages_min=1",
        "task.num_pages_max=2",
        "task.page_chars=200",
        "max_trajectory_tokens=1000",
        "lora_rank=8",
        "save_every=0",
        f"log_path={log}",
        "behavior_if_log_dir_exists=delete",
        datasets_cache=cache,
    )
    metrics = jsonl(log / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [1.0, 2.0, 3.0]
    for row in metrics:
        assert row["env/all/total_episodes"] == 1, row
        assert row["env/all/ob_tokens_per_turn"] > 500, row
        assert abs(row["optim/kl_sample_train_v1"]) < 1e-5, row["optim/kl_sample_train_v1"]
        assert 0 <= row["optim/kl_sample_train_v2"] < 1e-8, row["optim/kl_sample_train_v2"]


def test_shorter_preference_rl_trains_and_sampler_logprobs_stay_equal_to_the_trainers(
    cookbook_server: RunningServer, run_cookbook: Callable[..., None], tmp_path: Path
) -> None:
    """``recipes.preference.shorter``: RL from pairwise preferences (a local preference
    model preferring the shorter reply, on the recipe's own dummy prompts; fully offline).
    Its rewards differ within each group, so unlike the recipes above every step really
    trains (rank-32 LoRA, the recipe's default) and the sampler is refreshed from the updated
    weights: the weights move (``update_norm``, and ``kl_pre_post``, the recipe's
    ``compute_post_kl`` between the sampler before and after the step, are non-zero), while
    ``kl_sample_train`` stays float32 rounding at every step, also after updates."""
    log = tmp_path / "shorter"
    run_cookbook(
        "-m",
        "tinker_cookbook.recipes.preference.shorter.train",
        f"model_name={MODEL}",
        "renderer_name=qwen3",
        "batch_size=2",
        "group_size=4",
        "max_tokens=16",
        "max_steps=3",
        "eval_every=0",
        f"log_path={log}",
        "behavior_if_log_dir_exists=delete",
    )
    metrics = jsonl(log / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [1.0, 2.0, 3.0]
    for row in metrics:
        assert row["env/all/total_episodes"] == 8, row
        assert row["update_norm"] > 0, row
        assert row["kl_pre_post_v2"] > 1e-9, row
        assert abs(row["optim/kl_sample_train_v1"]) < 1e-5, row["optim/kl_sample_train_v1"]
        assert 0 <= row["optim/kl_sample_train_v2"] < 1e-8, row["optim/kl_sample_train_v2"]


def test_sl_loop_memorises_a_reply_from_the_no_robots_layout(
    cookbook_server: RunningServer, run_cookbook: Callable[..., None], tmp_path: Path
) -> None:
    """``recipes.sl_loop`` (the flat supervised loop: ``conversation_to_datum``,
    ``forward_backward`` + ``optim_step`` pipelined, linear LR decay, a final ``both``
    checkpoint) on a local stand-in for ``HuggingFaceH4/no_robots``: two short conversations,
    repeated (8 batches of 4), so the logged ``train_mean_nll`` (computed from the returned logprobs) must fall
    well below where it started, and the final checkpoint is recorded."""
    cache = tmp_path / "hf-datasets"
    no_robots(cache)
    log = tmp_path / "sl_loop"
    run_cookbook(
        "-m",
        "tinker_cookbook.recipes.sl_loop",
        f"model_name={MODEL}",
        f"log_path={log}",
        "batch_size=4",
        "learning_rate=1e-2",
        "max_length=128",
        "lora_rank=8",
        "save_every=0",
        datasets_cache=cache,
    )
    metrics = jsonl(log / "metrics.jsonl")
    nll = [row["train_mean_nll"] for row in metrics]
    assert len(nll) == 8, metrics
    assert all(math.isfinite(x) for x in nll), nll
    assert nll[-1] < 0.5 * nll[0], nll
    (final,) = jsonl(log / "checkpoints.jsonl")
    assert final["name"] == "final"
    assert final["state_path"].startswith("tinker://")
    assert final["sampler_path"].startswith("tinker://")


def test_chat_sl_evaluates_held_out_nll_and_deletes_its_rolling_checkpoints(
    cookbook_server: RunningServer, run_cookbook: Callable[..., None], tmp_path: Path
) -> None:
    """``recipes.chat_sl`` with ``dataset=no_robots`` (a local stand-in) and
    ``rolling_save_every=1``: the held-out NLL (the recipe's sampler-based evaluator) falls, and
    each rolling state checkpoint is deleted through the REST API once the next one is saved,
    so on the server only the final checkpoints remain."""
    cache = tmp_path / "hf-datasets"
    no_robots(cache)
    log = tmp_path / "chat_sl"
    run_cookbook(
        "-m",
        "tinker_cookbook.recipes.chat_sl.train",
        f"model_name={MODEL}",
        "renderer_name=qwen3",
        "dataset=no_robots",
        f"log_path={log}",
        "batch_size=8",
        "learning_rate=1e-2",
        "max_length=256",
        "lora_rank=8",
        "save_every=0",
        "eval_every=2",
        "rolling_save_every=1",
        "max_steps=4",
        "behavior_if_log_dir_exists=delete",
        datasets_cache=cache,
    )
    metrics = jsonl(log / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [1.0, 2.0, 3.0, 4.0]
    held_out = [row["test/nll"] for row in metrics if "test/nll" in row]
    assert len(held_out) == 2, metrics
    assert all(math.isfinite(x) for x in held_out), held_out
    assert held_out[-1] < held_out[0] - 0.5, held_out

    recorded = jsonl(log / "checkpoints.jsonl")
    assert [row["name"] for row in recorded if row.get("rolling")] == ["000001", "000002", "000003"]
    final = next(row for row in recorded if row["name"] == "final")
    run_id = final["state_path"].removeprefix("tinker://").split("/")[0]
    rest = tinker.RestClient(base_url=cookbook_server.url, api_key=API_KEY)
    listed = rest.list_checkpoints(run_id).result(timeout=60)
    assert sorted(c.checkpoint_id for c in listed.checkpoints) == [
        "sampler_weights/final",
        "weights/final",
    ]


def test_sdft_distils_top_k_teacher_logprobs_from_a_local_arrow_dataset(
    cookbook_server: RunningServer, run_cookbook: Callable[..., None], tmp_path: Path
) -> None:
    """``recipes.sdft`` (self-distillation fine-tuning) on a local ToolAlpaca-format Arrow
    dataset (``toolalpaca_data_path``, the paper's format): the student samples, the same
    base model prompted with the golden answer scores those tokens through
    ``topk_prompt_logprobs``, and the student trains with ``cross_entropy`` on ``(N, K)``
    target tokens weighted by the renormalised teacher distribution. Checks: every sampled
    token got top-K teacher logprobs (entropy within ``(0, ln K]``, none truncated), the 2-D
    cross-entropy produced a real gradient and moved the weights each step."""
    data = tmp_path / "toolalpaca"
    datasets.Dataset.from_dict({
        "prompt": [f"Get the weather for city number {i}." for i in range(12)],
        "golden_response": [
            f'Action: get_weather\nAction Input: {{"city": "{i}"}}' for i in range(12)
        ],
    }).save_to_disk(str(data))  # fmt: skip
    log = tmp_path / "sdft"
    topk, batch, max_tokens = 5, 2, 16
    run_cookbook(
        "-m",
        "tinker_cookbook.recipes.sdft.train",
        f"model_name={MODEL}",
        "dataset=toolalpaca",
        f"toolalpaca_data_path={data}",
        f"groups_per_batch={batch}",
        f"max_tokens={max_tokens}",
        f"topk={topk}",
        "max_steps=3",
        "lora_rank=8",
        "learning_rate=1e-3",
        "eval_every=0",
        "save_every=0",
        "max_context_length=1024",
        f"log_path={log}",
        "behavior_if_log_dir_exists=delete",
    )
    metrics = jsonl(log / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [1.0, 2.0, 3.0]
    for row in metrics:
        assert row["sdft/num_datums"] == batch, row
        # at most max_tokens each: a sample may stop earlier on the model's EOS (seen once in
        # CI at step 3, 30 of 32); that tokens were generated at all is what matters here
        assert 0 < row["sdft/total_completion_tokens"] <= batch * max_tokens, row
        assert row["sdft/teacher_truncated_count"] == 0, row
        assert 0 < row["sdft/mean_teacher_entropy"] <= math.log(topk) + 1e-6, row
        assert math.isfinite(row["grad_norm"]), row
        assert row["grad_norm"] > 0, row
        assert row["update_norm"] > 0, row
    assert {row["name"] for row in jsonl(log / "checkpoints.jsonl")} == {"final"}


def test_prompt_distillation_student_learns_the_labels(
    cookbook_server: RunningServer, run_cookbook: Callable[..., None], tmp_path: Path
) -> None:
    """``recipes.prompt_distillation.train`` on a distillation file in the format its
    ``create_data`` step writes (a query, the teacher's label; generating it needs the
    teacher's real classifications, so the test writes it; ``create_data`` itself is
    hard-wired to ``Qwen/Qwen3.6-35B-A3B`` and a cwd-relative data path): two epochs at a
    constant LR, and the student's training NLL on the labels falls by more than half."""
    sentences = {
        "en": ["The cat sleeps on the warm mat.", "We will meet at noon tomorrow."],
        "fr": ["Le chat dort sur le tapis.", "Nous partirons demain matin."],
        "de": ["Die Katze schläft auf der Matte.", "Wir treffen uns morgen früh."],
    }
    rows = [
        {"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": label}]}
        for label, group in sentences.items()
        for s in group
    ] * 6
    data = tmp_path / "prompt_distillation_lang.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    log = tmp_path / "prompt_distillation"
    run_cookbook(
        "-m",
        "tinker_cookbook.recipes.prompt_distillation.train",
        f"file_path={data}",
        f"model_name={MODEL}",
        f"log_path={log}",
        "learning_rate=1e-2",
        "lr_schedule=constant",
        "num_epochs=2",
        "lora_rank=8",
        "batch_size=6",
        "max_length=128",
        "save_every=0",
        "eval_every=2",
        "behavior_if_log_dir_exists=delete",
    )
    metrics = jsonl(log / "metrics.jsonl")
    train = [row["train_mean_nll"] for row in metrics]
    assert all(math.isfinite(x) for x in train), train
    assert train[-1] < 0.5 * train[0], train


def test_rl_basic_on_gsm8k_sampler_and_trainer_logprobs_agree(
    cookbook_server: RunningServer, run_cookbook: Callable[..., None], tmp_path: Path
) -> None:
    """``recipes.rl_basic`` (GSM8K with ``rl.train``) on a local stand-in for
    ``openai/gsm8k``, groups of 4 sampled as one request per rollout: each step's
    ``kl_sample_train`` is float32 rounding. Needs the cookbook's ``math-rl`` extra (its
    grader), which the nox session does not install: skipped without it."""
    pytest.importorskip("math_verify", reason="tinker-cookbook[math-rl] not installed")
    rows = [
        {"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}
        for i in range(16)
    ]
    cache = tmp_path / "hf-datasets"
    offline_hub_dataset(cache, "openai/gsm8k", "main", {"train": rows, "test": rows[:4]})
    log = tmp_path / "rl_basic"
    builder = "dataset_builder."
    run_cookbook(
        "-m",
        "tinker_cookbook.recipes.rl_basic",
        f"model_name={MODEL}",
        f"log_path={log}",
        "dataset_builder=tinker_cookbook.recipes.math_rl.math_env:Gsm8kDatasetBuilder",
        f"{builder}batch_size=2",
        f"{builder}group_size=4",
        f"{builder}model_name_for_tokenizer={MODEL}",
        f"{builder}renderer_name=qwen3",
        "max_tokens=16",
        "lora_rank=8",
        "save_every=0",
        "max_steps=2",
        datasets_cache=cache,
    )
    metrics = jsonl(log / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [1.0, 2.0]
    for row in metrics:
        assert row["env/all/total_episodes"] == 8, row
        assert abs(row["optim/kl_sample_train_v1"]) < 1e-5, row["optim/kl_sample_train_v1"]
        assert 0 <= row["optim/kl_sample_train_v2"] < 1e-8, row["optim/kl_sample_train_v2"]
