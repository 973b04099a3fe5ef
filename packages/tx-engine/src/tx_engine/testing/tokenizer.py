"""Tiny tokenizers that behave like Qwen3's and Llama 3's, trained locally and deterministically.

Each is a byte-level BPE trained with the `tokenizers` library on `corpus.CORPUS`, using the
family's real normalizer, pre-tokenizer regex, decoder and post-processor, followed by the
family's added tokens in their real order (so `<|im_end|>` follows `<|im_start|>` exactly as in
Qwen3, and `<|eot_id|>` comes after the header tokens as in Llama 3.1). Only the BPE part is
small: the behaviour clients depend on (special tokens encoding to one id, no BOS for Qwen,
BOS from a TemplateProcessing post-processor for Llama, the real chat template) is the real one.

Training is deterministic across processes (the BPE trainer breaks ties by content), which a
test checks by building in a subprocess.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    processors,
    trainers,
)
from tokenizers import pre_tokenizers as pre

from tx_engine.testing import chat_templates
from tx_engine.testing.corpus import CORPUS

BPE_VOCAB_SIZE = 2048  # 256 byte symbols + merges; the corpus supports ~2180 before saturating

_QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_LLAMA_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# (content, special) in Qwen3's order: ids 151643.. on the hub, BPE_VOCAB_SIZE.. here.
_QWEN3_ADDED: tuple[tuple[str, bool], ...] = (
    *((t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    *((t, True) for t in ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>")),
    *((t, True) for t in ("<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>")),
    *((t, True) for t in ("<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")),
    *((t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>")),
    *((t, False) for t in ("<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")),
    *((t, False) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")),
)

# Llama 3.1's first special tokens (ids 128000..128015 on the hub), all special. The real
# tokenizer continues with reserved tokens up to 128255; a handful stand in for them.
_LLAMA3_ADDED: tuple[tuple[str, bool], ...] = tuple(
    (t, True)
    for t in (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        *(f"<|reserved_special_token_{k}|>" for k in range(3, 8)),
    )
)


@dataclass(frozen=True)
class TokenizerFamily:
    """What differs between the two tokenizer families."""

    name: str
    split_regex: str
    added: tuple[tuple[str, bool], ...]
    bos: str | None  # the tokenizer's bos_token (Qwen has none)
    eos: str  # the tokenizer's eos_token (end of an assistant turn)
    pad: str | None
    chat_template: str


TOKENIZER_FAMILIES: dict[str, TokenizerFamily] = {
    "qwen3": TokenizerFamily(
        name="qwen3",
        split_regex=_QWEN_SPLIT,
        added=_QWEN3_ADDED,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=chat_templates.QWEN3,
    ),
    "llama3": TokenizerFamily(
        name="llama3",
        split_regex=_LLAMA_SPLIT,
        added=_LLAMA3_ADDED,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
        chat_template=chat_templates.LLAMA3,
    ),
}


def tokenizer_family(family: str) -> TokenizerFamily:
    """The tokenizer family of a model family (`qwen3_moe` shares Qwen3's tokenizer)."""
    key = "qwen3" if family == "qwen3_moe" else family
    if key not in TOKENIZER_FAMILIES:
        raise ValueError(f"family: unknown tokenizer family {family!r}; choose qwen3 or llama3")
    return TOKENIZER_FAMILIES[key]


def train_tokenizer(family: str) -> Tokenizer:
    """A fresh copy of the family's trained tokenizer (trained once per process, then cached)."""
    return Tokenizer.from_str(_trained_json(tokenizer_family(family).name))


@functools.cache
def _trained_json(name: str) -> str:
    fam = TOKENIZER_FAMILIES[name]
    is_qwen = name == "qwen3"
    tok = Tokenizer(
        models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False, ignore_merges=not is_qwen)
    )
    if is_qwen:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(fam.split_regex), behavior="isolated", invert=False),
            pre.ByteLevel(add_prefix_space=False, trim_offsets=not is_qwen, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=0,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    for content, special in fam.added:
        # One at a time so ids follow the real order, whatever mix of special / non-special.
        token = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    tok.post_processor = _post_processor(tok, fam)
    return str(tok.to_str())


def _post_processor(tok: Tokenizer, fam: TokenizerFamily) -> Any:
    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if fam.bos is None:
        return byte_level
    bos_id = tok.token_to_id(fam.bos)
    template = processors.TemplateProcessing(
        single=f"{fam.bos} $A",
        pair=f"{fam.bos} $A {fam.bos}:1 $B:1",
        special_tokens=[(fam.bos, bos_id)],
    )
    return processors.Sequence(
        [processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True), template]
    )


def special_token_ids(family: str) -> dict[str, Any]:
    """The `bos/eos/pad_token_id` values the model config must carry, as the hub configs do.

    Qwen3: bos = eos-of-text `<|endoftext|>` (config only; the tokenizer adds no BOS), eos =
    `<|im_end|>`, pad = `<|endoftext|>`. Llama 3.1 Instruct: bos `<|begin_of_text|>`, eos the
    list [`<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`], no pad.
    """
    fam = tokenizer_family(family)
    tok = train_tokenizer(fam.name)
    ids = {content: tok.token_to_id(content) for content, _ in fam.added}
    if fam.name == "qwen3":
        return {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        }
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    return {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": eos, "pad_token_id": None}


def build_tokenizer(family: str, out_dir: Path | str) -> Path:
    """Write the family's tokenizer files (as its hub repo has them) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fam = tokenizer_family(family)
    tok = train_tokenizer(fam.name)
    (out / "tokenizer.json").write_text(
        json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n"
    )
    config = _tokenizer_config(tok, fam)
    _write_json(out / "tokenizer_config.json", config)
    if fam.name == "qwen3":
        # Qwen repos also ship the slow-tokenizer files; older loaders read them.
        tok.model.save(str(out))
    else:
        special_map = {"bos_token": _token_entry(fam.bos), "eos_token": _token_entry(fam.eos)}
        _write_json(out / "special_tokens_map.json", special_map)
    return out


def _tokenizer_config(tok: Tokenizer, fam: TokenizerFamily) -> dict[str, Any]:
    decoder = {
        str(tok.token_to_id(content)): {**_token_entry(content), "special": special}
        for content, special in fam.added
    }
    if fam.name == "qwen3":
        return {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": [c for c, s in fam.added if s and c != "<|endoftext|>"],
            "bos_token": None,
            "chat_template": fam.chat_template,
            "clean_up_tokenization_spaces": False,
            "eos_token": fam.eos,
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": fam.pad,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
    return {
        "added_tokens_decoder": decoder,
        "bos_token": fam.bos,
        "chat_template": fam.chat_template,
        "clean_up_tokenization_spaces": True,
        "eos_token": fam.eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _token_entry(content: str | None) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
