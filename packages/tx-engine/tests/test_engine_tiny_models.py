"""The tiny-model kit: determinism, hub layout, tokenizers, chat templates, offline HF cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from tx_engine.testing import (
    KIT_VERSION,
    PRESETS,
    build_model,
    count_parameters,
    ensure_model,
    get_preset,
    install_into_hf_cache,
    read_all_tensors,
    tensor_shapes,
)
from tx_engine.testing.corpus import CORPUS


def _words(text: str) -> set[str]:
    return set(text.split())


SAMPLE = "Hello, world! 12345 Grüße, Привет, 你好 🙂 def f(x): return x**2\n\tTabs  and  spaces."

# The keys of the real hub config.json files (Qwen/Qwen3-8B, Qwen/Qwen3-30B-A3B,
# meta-llama/Llama-3.1-8B-Instruct + Llama 3.2's head_dim), written out independently.
QWEN3_KEYS = _words(
    """architectures attention_bias attention_dropout bos_token_id eos_token_id head_dim
    hidden_act hidden_size initializer_range intermediate_size max_position_embeddings
    max_window_layers model_type num_attention_heads num_hidden_layers num_key_value_heads
    rms_norm_eps rope_scaling rope_theta sliding_window tie_word_embeddings torch_dtype
    transformers_version use_cache use_sliding_window vocab_size"""
)
QWEN3_MOE_KEYS = QWEN3_KEYS | _words(
    """decoder_sparse_step mlp_only_layers moe_intermediate_size norm_topk_prob num_experts
    num_experts_per_tok output_router_logits router_aux_loss_coef"""
)
LLAMA3_KEYS = _words(
    """architectures attention_bias attention_dropout bos_token_id eos_token_id head_dim
    hidden_act hidden_size initializer_range intermediate_size max_position_embeddings mlp_bias
    model_type num_attention_heads num_hidden_layers num_key_value_heads pretraining_tp
    rms_norm_eps rope_scaling rope_theta tie_word_embeddings torch_dtype transformers_version
    use_cache vocab_size"""
)


def _config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def _digests(model_dir: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(model_dir.iterdir())
        if f.is_file()
    }


def _run_python(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def all_tiny_dirs(
    tiny_qwen3_dir: Path, tiny_llama3_dir: Path, tiny_qwen3_moe_dir: Path
) -> dict[str, Path]:
    return {
        "tiny-qwen3": tiny_qwen3_dir,
        "tiny-llama3": tiny_llama3_dir,
        "tiny-qwen3-moe": tiny_qwen3_moe_dir,
    }


# --- determinism -------------------------------------------------------------------------


def test_same_seed_builds_are_byte_identical(tiny_llama3_dir: Path, tmp_path: Path) -> None:
    again = build_model("tiny-llama3", tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_llama3_dir)
    assert len(_digests(again)) == 6


def test_tokenizer_training_is_identical_in_a_fresh_process(
    tiny_qwen3_dir: Path, tiny_llama3_dir: Path
) -> None:
    # Rust hash maps are seeded per process; a tie broken by hash order would show up here.
    out = _run_python(
        """
        import hashlib
        from tx_engine.testing import train_tokenizer
        for fam in ("qwen3", "llama3"):
            print(hashlib.sha256(train_tokenizer(fam).to_str().encode()).hexdigest())
        """
    )
    from tx_engine.testing import train_tokenizer

    here = [
        hashlib.sha256(train_tokenizer(f).to_str().encode()).hexdigest()
        for f in ("qwen3", "llama3")
    ]
    assert out.split() == here


def test_different_seeds_change_every_random_tensor_only(
    tiny_qwen3_dir: Path, tmp_path: Path
) -> None:
    other = build_model("tiny-qwen3", tmp_path / "seed1", seed=1)
    a, b = read_all_tensors(tiny_qwen3_dir), read_all_tensors(other)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("norm.weight"):
            np.testing.assert_array_equal(a[name], b[name])
        else:
            assert not np.allclose(a[name], b[name]), name
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (other / f).read_bytes() == (tiny_qwen3_dir / f).read_bytes()


def test_sharded_and_single_file_hold_the_same_tensors(
    tiny_qwen3_moe_dir: Path, tiny_qwen3_moe_sharded_dir: Path
) -> None:
    index = json.loads((tiny_qwen3_moe_sharded_dir / "model.safetensors.index.json").read_text())
    shards = sorted(tiny_qwen3_moe_sharded_dir.glob("model-*-of-*.safetensors"))
    assert [s.name for s in shards] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (tiny_qwen3_moe_sharded_dir / "model.safetensors").exists()
    for shard in shards:
        held = set(safetensors.numpy.load_file(shard))
        assert held == {n for n, f in index["weight_map"].items() if f == shard.name}
    single = read_all_tensors(tiny_qwen3_moe_dir)
    sharded = read_all_tensors(tiny_qwen3_moe_sharded_dir)
    assert set(index["weight_map"]) == single.keys() == sharded.keys()
    for name, value in single.items():
        np.testing.assert_array_equal(sharded[name], value, err_msg=name)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in single.values())


def test_shard_plan_is_contiguous_and_exact_for_every_count(tmp_path: Path) -> None:
    from tx_engine.testing.weights import _plan_shards

    shapes = tensor_shapes(_config_for("tiny-qwen3"))
    for n in range(1, len(shapes) + 1):
        groups = _plan_shards(shapes, n, 4)
        assert len(groups) == n
        assert all(groups)
        assert [name for g in groups for name in g] == list(shapes)
    # Rebuilding in place with the other layout leaves no stale weight files behind.
    out = build_model("tiny-qwen3", tmp_path / "m", sharded=True)
    build_model("tiny-qwen3", out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


# --- weights: hub names, shapes, init, sizes ---------------------------------------------


def test_hub_key_names_and_shapes(all_tiny_dirs: dict[str, Path]) -> None:
    for preset, model_dir in all_tiny_dirs.items():
        cfg, tensors = _config(model_dir), read_all_tensors(model_dir)
        assert {n: v.shape for n, v in tensors.items()} == tensor_shapes(cfg)
        assert all(v.dtype == np.float32 for v in tensors.values())
        h, d = cfg["head_dim"], cfg["hidden_size"]
        assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (
            cfg["num_attention_heads"] * h,
            d,
        )
        assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (
            cfg["num_key_value_heads"] * h,
            d,
        )
        assert ("lm_head.weight" in tensors) is not cfg["tie_word_embeddings"], preset
        assert ("model.layers.0.self_attn.q_norm.weight" in tensors) is (preset != "tiny-llama3")
        has_experts = "model.layers.0.mlp.experts.7.down_proj.weight" in tensors
        assert has_experts is (preset == "tiny-qwen3-moe")
    moe = read_all_tensors(all_tiny_dirs["tiny-qwen3-moe"])
    assert moe["model.layers.1.mlp.gate.weight"].shape == (8, 128)
    assert moe["model.layers.1.mlp.experts.3.gate_proj.weight"].shape == (64, 128)
    assert moe["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (128, 64)
    assert not any(".mlp.gate_proj" in n for n in moe)


def test_init_matches_hf_statistics(tiny_llama3_dir: Path) -> None:
    tensors = read_all_tensors(tiny_llama3_dir)
    for name, value in tensors.items():
        if name.endswith("norm.weight"):
            assert np.all(value == 1.0), name
    embed = tensors["model.embed_tokens.weight"]
    assert abs(float(embed.mean())) < 1e-3
    assert float(embed.std()) == pytest.approx(0.02, rel=0.02)
    # Seeded per name: the same tensor in two presets with equal shapes gets different values.
    assert not np.allclose(
        tensors["model.layers.0.mlp.up_proj.weight"][:64],
        tensors["model.layers.1.mlp.up_proj.weight"][:64],
    )


def test_small_preset_has_41_6m_parameters() -> None:
    p = get_preset("small")
    assert (p.family, p.hidden_size, p.num_hidden_layers, p.head_dim, p.vocab_size) == (
        "qwen3",
        512,
        8,
        64,
        32000,
    )
    cfg = _config_for("small")
    v, d, f, h = 32000, 512, 1536, 64
    per_layer = d * 8 * h + 2 * d * 4 * h + 8 * h * d + 3 * d * f + 2 * d + 2 * h
    assert count_parameters(cfg) == v * d + 8 * per_layer + d == 41_559_552
    assert cfg["tie_word_embeddings"] is True
    assert cfg["torch_dtype"] == "float32"


def _config_for(preset: str) -> dict[str, Any]:
    from tx_engine.testing import make_config, special_token_ids

    return make_config(get_preset(preset), special_token_ids(get_preset(preset).family))


@pytest.mark.slow
def test_small_preset_builds_with_the_counted_parameters(tmp_path: Path) -> None:
    out = build_model("small", tmp_path / "small")
    assert sum(v.size for v in read_all_tensors(out).values()) == 41_559_552


def test_tiny_presets_are_tiny_and_varied() -> None:
    tiny = [p for p in PRESETS.values() if p.name.startswith("tiny-")]
    assert {p.family for p in tiny} == {"qwen3", "llama3", "qwen3_moe"}
    assert {p.tie_word_embeddings for p in tiny} == {True, False}
    for p in tiny:
        assert 200_000 <= count_parameters(_config_for(p.name)) <= 2_000_000, p.name
        assert p.num_hidden_layers >= 2
        assert p.num_key_value_heads < p.num_attention_heads


# --- configs and tokenizers through transformers -----------------------------------------


def test_configs_use_hub_spelling_and_load_with_autoconfig(all_tiny_dirs: dict[str, Path]) -> None:
    from transformers import AutoConfig

    expected = {
        "tiny-qwen3": QWEN3_KEYS,
        "tiny-llama3": LLAMA3_KEYS,
        "tiny-qwen3-moe": QWEN3_MOE_KEYS,
    }
    for preset, model_dir in all_tiny_dirs.items():
        raw = _config(model_dir)
        assert set(raw) == expected[preset], preset
        hf = AutoConfig.from_pretrained(model_dir)
        assert hf.model_type == raw["model_type"]
        assert hf.architectures == raw["architectures"]
        assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim) == (
            raw["hidden_size"],
            raw["num_key_value_heads"],
            raw["head_dim"],
        )
    llama = AutoConfig.from_pretrained(all_tiny_dirs["tiny-llama3"])
    assert llama.rope_parameters["rope_type"] == "llama3"
    assert llama.rope_parameters["rope_theta"] == 500000.0
    moe = AutoConfig.from_pretrained(all_tiny_dirs["tiny-qwen3-moe"])
    assert (moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob, moe.mlp_only_layers) == (
        8,
        2,
        True,
        [],
    )


def test_tokenizers_load_fast_and_agree_with_tokenizer_json(all_tiny_dirs: dict[str, Path]) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    for preset, model_dir in all_tiny_dirs.items():
        tok = AutoTokenizer.from_pretrained(model_dir)
        raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        assert tok.is_fast
        assert len(tok) < _config(model_dir)["vocab_size"], preset  # out-of-tokenizer ids exist
        for text in (SAMPLE, CORPUS[:2000]):
            ids = tok(text, add_special_tokens=False).input_ids
            assert ids == raw.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids) == text
        assert 2000 <= len(tok) <= 2100


def test_qwen3_special_tokens_match_config(tiny_qwen3_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    cfg = _config(tiny_qwen3_dir)
    gen = json.loads((tiny_qwen3_dir / "generation_config.json").read_text())
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>"]
    first = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.convert_tokens_to_ids(added) == list(range(first, first + 4))
    assert (
        tok.convert_tokens_to_ids(["<think>", "</think>"])
        == [first + 24, first + 25]
        == [len(tok) - 2, len(tok) - 1]
    )
    assert tok.bos_token is None
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert cfg["eos_token_id"] == tok.eos_token_id == tok.encode("<|im_end|>")[0]
    assert tok.encode("<|im_end|>") == [tok.eos_token_id]  # one token, no BOS added
    assert cfg["bos_token_id"] == gen["pad_token_id"] == tok.pad_token_id == first
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.pad_token_id]
    assert type(tok).__name__ == "Qwen2Tokenizer"


def test_llama3_special_tokens_match_config(tiny_llama3_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama3_dir)
    cfg = _config(tiny_llama3_dir)
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
    ]
    bos, eot, sh, eh, eom, eot_id = tok.convert_tokens_to_ids(names)
    assert (eot - bos, sh - bos, eh - bos, eom - bos, eot_id - bos) == (1, 6, 7, 8, 9)
    assert cfg["bos_token_id"] == tok.bos_token_id == bos
    assert cfg["eos_token_id"] == [eot, eom, eot_id]
    assert tok.eos_token_id == eot_id
    ids = tok("Hi there").input_ids
    assert ids[0] == bos
    assert bos not in ids[1:]
    assert tok("Hi there", add_special_tokens=False).input_ids == ids[1:]


# --- chat templates (need jinja2, which transformers imports lazily) -----------------------


def test_qwen3_chat_template_with_thinking(tiny_qwen3_dir: Path) -> None:
    pytest.importorskip("jinja2", reason="apply_chat_template needs jinja2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt
    no_think = tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == prompt + "<think>\n\n</think>\n\n"
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids == tok.encode(prompt)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    history = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    ]
    last = tok.apply_chat_template(history, tokenize=False)
    assert last.endswith("<|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>\n")
    # Reasoning of turns before the latest user query is dropped, as by the real template.
    later = tok.apply_chat_template(
        [*history, {"role": "user", "content": "And 3+3?"}], tokenize=False
    )
    assert "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?" in later
    assert "add them" not in later


def test_llama3_chat_template_headers(tiny_llama3_dir: Path) -> None:
    pytest.importorskip("jinja2", reason="apply_chat_template needs jinja2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama3_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids == tok(expected, add_special_tokens=False).input_ids
    assert ids.count(tok.bos_token_id) == 1


# --- HF cache, ensure_model, CLI, errors --------------------------------------------------


def test_hub_names_resolve_offline_from_the_hf_cache(
    tiny_hf_home: Path, tiny_qwen3_dir: Path
) -> None:
    # HF_HOME / HF_HUB_OFFLINE are read when huggingface_hub is imported: use a fresh process.
    out = _run_python(
        """
        import json
        from huggingface_hub import snapshot_download
        from transformers import AutoConfig, AutoTokenizer
        q = AutoTokenizer.from_pretrained("Qwen/Qwen3-8B")
        llama_tok = AutoTokenizer.from_pretrained("thinkingmachineslabinc/meta-llama-3-instruct-tokenizer")
        print(json.dumps({
            "qwen_eos": q.encode("<|im_end|>"),
            "qwen_type": AutoConfig.from_pretrained("Qwen/Qwen3-8B").model_type,
            "moe_type": AutoConfig.from_pretrained("Qwen/Qwen3-30B-A3B").model_type,
            "llama_type": AutoConfig.from_pretrained("meta-llama/Llama-3.1-8B-Instruct").model_type,
            "llama_bos": llama_tok("x").input_ids[0],
            "snapshot": snapshot_download("Qwen/Qwen3-8B", local_files_only=True),
        }))
        """,
        env={"HF_HOME": str(tiny_hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    got = json.loads(out.strip().splitlines()[-1])
    assert got["qwen_eos"] == [_config(tiny_qwen3_dir)["eos_token_id"]]
    assert (got["qwen_type"], got["moe_type"], got["llama_type"]) == ("qwen3", "qwen3_moe", "llama")
    assert got["llama_bos"] == 2048
    snapshot = Path(got["snapshot"])
    assert _digests(snapshot) == _digests(tiny_qwen3_dir)
    assert (snapshot.parent.parent / "refs" / "main").read_text() == snapshot.name


def test_install_is_deterministic_and_tokenizer_only_marks_config_missing(
    tiny_llama3_dir: Path, tmp_path: Path
) -> None:
    repo = "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer"
    a = install_into_hf_cache(tiny_llama3_dir, repo, tmp_path / "a", tokenizer_only=True)
    b = install_into_hf_cache(tiny_llama3_dir, repo, tmp_path / "b", tokenizer_only=True)
    assert a.name == b.name
    assert len(a.name) == 40
    assert int(a.name, 16) >= 0
    assert sorted(p.name for p in a.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (a.parent.parent / ".no_exist" / a.name / "config.json").is_file()
    with pytest.raises(ValueError, match="repo_id"):
        install_into_hf_cache(tiny_llama3_dir, "not-a-repo-id", tmp_path / "c")


def test_ensure_model_builds_once_per_key(tmp_path: Path) -> None:
    first = ensure_model("tiny-qwen3", tmp_path)
    assert first == tmp_path / f"tiny-qwen3-seed0-kit{KIT_VERSION}"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_model("tiny-qwen3", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert ensure_model("tiny-qwen3", tmp_path, seed=3) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_bad_inputs_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preset: unknown preset 'tiny-gpt'"):
        build_model("tiny-gpt", tmp_path)
    with pytest.raises(ValueError, match="seed"):
        build_model("tiny-qwen3", tmp_path, seed=-1)
    with pytest.raises(ValueError, match="num_shards"):
        build_model("tiny-qwen3", tmp_path, sharded=True, num_shards=0)


def test_cli_make_tiny_model(tmp_path: Path, tiny_qwen3_moe_sharded_dir: Path) -> None:
    pytest.importorskip("tx_cli")
    argv = ["make-tiny-model", "tiny-qwen3-moe", "--out", str(tmp_path / "m"), "--sharded"]
    argv += ["--hf-home", str(tmp_path / "hf"), "--repo-id", "Qwen/Qwen3-30B-A3B"]
    out = _run_python(
        f"import sys; from tx_cli.main import app; sys.argv = ['tx', *{argv!r}]; app()"
    )
    assert "1,035,008 parameters" in out
    assert "installed as Qwen/Qwen3-30B-A3B" in out
    assert _digests(tmp_path / "m") == _digests(tiny_qwen3_moe_sharded_dir)


# --- parity with transformers' own model classes (torch only) -----------------------------


@pytest.mark.parity
def test_transformers_loads_every_preset(all_tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    for preset, model_dir in all_tiny_dirs.items():
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
        assert not any(info.values()), (preset, info)
        logits = model(torch.tensor([[1, 2, 3]])).logits
        assert logits.shape == (1, 3, _config(model_dir)["vocab_size"])
        assert bool(torch.isfinite(logits).all())
        # transformers fuses MoE experts in memory; saving writes hub names back, so compare there.
        model.save_pretrained(tmp_path / preset)
        saved, ours = read_all_tensors(tmp_path / preset), read_all_tensors(model_dir)
        assert saved.keys() == ours.keys(), preset
        for name, value in ours.items():
            np.testing.assert_array_equal(saved[name], value, err_msg=f"{preset} {name}")
