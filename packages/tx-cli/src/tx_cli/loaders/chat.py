"""`tx.loaders.chat`: conversations in a ``messages`` column, loss on assistant turns only.

Each row is a list of ``{"role", "content"}`` dicts rendered with the tokenizer's own chat
template, so training sees exactly the text the model will be prompted with at inference.

Which tokens are the assistant's: templates rarely carry ``{% generation %}`` markers, so we
find the character spans instead. For assistant message ``i`` the template rendered on
``messages[:i]`` with ``add_generation_prompt=True`` must be a prefix of the full rendering;
its length is where the assistant's turn starts (after its header). The span runs to the end of
the message content plus the EOS token when the template puts it right after (Qwen's
``<|im_end|>``, Llama's ``<|eot_id|>``), so the model learns to stop. Tokens whose first
character lies in a span get weight 1, every other token (system, user, headers) weight 0.
"""

from __future__ import annotations

from typing import Any

from tx_cli.loaders.base import Example, TrainInputError, require_column, shifted_example

MESSAGES_COLUMN = "messages"


def _render(tokenizer: Any, messages: list[dict[str, Any]], prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    return str(text)


def _check_messages(row: int, messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise TrainInputError(f"row {row}: column 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise TrainInputError(
                f"row {row}: each message needs a 'role' and a string 'content', got {m!r}"
            )
    return messages


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[range]]:
    """The full rendering and the character ranges of every assistant turn in it."""
    full = _render(tokenizer, messages, prompt=False)
    eos = tokenizer.eos_token or ""
    spans: list[range] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], prompt=True) if i else ""
        if not full.startswith(prefix):
            raise TrainInputError(
                "the chat template is not prefix-stable, so assistant turns cannot be located"
            )
        start = full.find(m["content"], len(prefix))
        if start < 0:
            raise TrainInputError(f"assistant message {i} does not appear in the rendered chat")
        end = start + len(m["content"])
        if eos and full.startswith(eos, end):
            end += len(eos)
        spans.append(range(len(prefix), end))
    return full, spans


def load_chat(dataset: Any, tokenizer: Any, max_length: int) -> list[Example]:
    """One :class:`Example` per conversation that has at least one assistant token."""
    require_column(dataset, MESSAGES_COLUMN)
    if not getattr(tokenizer, "is_fast", False):
        raise TrainInputError("tx.loaders.chat needs a fast tokenizer (character offsets)")
    examples: list[Example] = []
    for row, raw in enumerate(dataset[MESSAGES_COLUMN]):
        messages = _check_messages(row, raw)
        full, spans = assistant_spans(tokenizer, messages)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        weights = [
            1.0 if any(start in s for s in spans) and end > start else 0.0
            for start, end in enc["offset_mapping"]
        ]
        tokens = list(enc["input_ids"])[: max_length + 1]
        ex = shifted_example(tokens, weights[: max_length + 1])
        if ex is not None:
            examples.append(ex)
    return examples
