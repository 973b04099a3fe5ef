"""`tx.loaders.text`: causal language modelling on the ``text`` column.

Every token of the text is a target (after the first, which nothing predicts). The tokenizer's
own special tokens are kept (Llama prepends ``<|begin_of_text|>``), and the EOS token is
appended so the model also learns where a document ends; sequences longer than
``max_length`` are truncated rather than dropped.
"""

from __future__ import annotations

from typing import Any

from tx_cli.loaders.base import Example, TrainInputError, require_column, shifted_example

TEXT_COLUMN = "text"


def load_text(dataset: Any, tokenizer: Any, max_length: int) -> list[Example]:
    """One :class:`Example` per non-empty row of ``dataset["text"]``."""
    require_column(dataset, TEXT_COLUMN)
    texts = list(dataset[TEXT_COLUMN])
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TrainInputError(f"row {i}: column 'text' must be a string, got {type(text)}")
    eos = tokenizer.eos_token_id
    examples: list[Example] = []
    # one batched call: fast tokenizers encode a list in parallel in Rust
    for ids in tokenizer(texts)["input_ids"] if texts else []:
        tokens = list(ids)
        if eos is not None and (not tokens or tokens[-1] != eos):
            tokens.append(eos)
        tokens = tokens[: max_length + 1]  # +1: the shift turns N+1 tokens into N predictions
        ex = shifted_example(tokens, [1.0] * len(tokens))
        if ex is not None:
            examples.append(ex)
    return examples
