"""Client-side custom losses for ``forward_backward_custom`` (spec §7, mode A).

Two passes over the same chunks: a forward-only ``cross_entropy`` pass returns each datum's
target logprobs ``p``; the user's loss ``L(p)`` is evaluated here and differentiated; a second,
real backward pass sends ``weights = −∂L/∂p`` so the server's surrogate ``Σ −p·w`` has exactly
the gradient of ``L``. How ``∂L/∂p`` is obtained (``backend``):

* ``"torch"`` — the official SDK's contract: ``loss_fn(data, logprobs)`` gets torch leaf tensors
  and returns ``(loss_tensor, metrics)``; autograd gives the gradient. Default when torch is
  importable.
* ``"jax"`` — same signature with ``jax.numpy`` arrays; ``jax.value_and_grad`` gives the gradient.
* ``"numpy"`` — ``loss_fn(data, logprobs)`` gets numpy arrays and must return
  ``(loss, metrics, grads)`` with one ``∂loss/∂logprobs`` array per datum. Default without torch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from tx_types import Datum, ForwardBackwardOutput, TensorData

__all__ = ["Backend", "CustomLossResult", "compute_custom_loss", "forward_data"]

Backend = Literal["torch", "jax", "numpy"]
CustomLossFn = Callable[[list[Datum], list[Any]], Any]


@dataclass(frozen=True)
class CustomLossResult:
    backward_data: list[Datum]
    metrics: dict[str, float]
    loss_sum: float


def forward_data(data: Sequence[Datum]) -> list[Datum]:
    """The forward pass's data: targets and weights only (zeros when absent)."""
    out = []
    for i, datum in enumerate(data):
        target = datum.loss_fn_inputs.get("target_tokens")
        if target is None:
            raise ValueError(f"data[{i}].loss_fn_inputs.target_tokens is required")
        weights = datum.loss_fn_inputs.get("weights")
        if weights is None:
            weights = TensorData.from_numpy(np.zeros(target.to_numpy().shape, np.float32))
        out.append(_with_inputs(datum, {"target_tokens": target, "weights": weights}))
    return out


def _with_inputs(datum: Datum, inputs: dict[str, TensorData]) -> Datum:
    return Datum(
        model_input=datum.model_input,
        loss_fn_inputs=inputs,
        model_input_spans=datum.model_input_spans,
        loss_fn_input_spans=datum.loss_fn_input_spans,
    )


def default_backend() -> Backend:
    return "torch" if importlib.util.find_spec("torch") is not None else "numpy"


def _logprob_arrays(forward: ForwardBackwardOutput) -> list[npt.NDArray[np.float32]]:
    arrays = []
    for i, out in enumerate(forward.loss_fn_outputs):
        if "logprobs" not in out:
            raise ValueError(f"forward output {i} has no 'logprobs' (server must return them)")
        arrays.append(np.asarray(out["logprobs"].to_numpy(), dtype=np.float32))
    return arrays


def _grads_torch(
    fn: CustomLossFn, data: list[Datum], arrays: list[npt.NDArray[np.float32]]
) -> tuple[float, dict[str, Any], list[npt.NDArray[Any]]]:
    import torch

    leaves = [torch.tensor(a).requires_grad_(True) for a in arrays]
    loss, metrics = fn(data, leaves)
    loss.backward()
    grads = []
    for leaf in leaves:
        if leaf.grad is None:
            raise ValueError("No gradient computed for logprob tensor")
        grads.append(leaf.grad.detach().numpy())
    return float(loss.detach().sum().item()), metrics, grads


def _grads_jax(
    fn: CustomLossFn, data: list[Datum], arrays: list[npt.NDArray[np.float32]]
) -> tuple[float, dict[str, Any], list[npt.NDArray[Any]]]:
    import jax
    import jax.numpy as jnp

    def scalar_loss(logprobs: list[Any]) -> tuple[Any, Any]:
        loss, metrics = fn(data, logprobs)
        return jnp.sum(loss), metrics

    (loss, metrics), grads = jax.value_and_grad(scalar_loss, has_aux=True)(
        [jnp.asarray(a) for a in arrays]
    )
    return float(loss), metrics, [np.asarray(g) for g in grads]


def _grads_numpy(
    fn: CustomLossFn, data: list[Datum], arrays: list[npt.NDArray[np.float32]]
) -> tuple[float, dict[str, Any], list[npt.NDArray[Any]]]:
    result = fn(data, [a.copy() for a in arrays])
    if not (isinstance(result, tuple) and len(result) == 3):
        raise TypeError(
            "with backend='numpy' the loss function must return (loss, metrics, grads), "
            "grads being d(loss)/d(logprobs) per datum; install torch or pass backend='jax' "
            "to have the gradient computed for you"
        )
    loss, metrics, grads = result
    return float(np.sum(loss)), metrics, [np.asarray(g) for g in grads]


_BACKENDS = {"torch": _grads_torch, "jax": _grads_jax, "numpy": _grads_numpy}


def compute_custom_loss(
    data: list[Datum], fn: CustomLossFn, forward: ForwardBackwardOutput, backend: Backend
) -> CustomLossResult:
    """Evaluate and differentiate the user's loss; build the backward pass's data."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    arrays = _logprob_arrays(forward)
    if len(arrays) != len(data):
        raise ValueError(f"forward returned {len(arrays)} outputs for {len(data)} datums")
    loss_sum, metrics, grads = _BACKENDS[backend](fn, data, arrays)
    backward = []
    for i, (datum, grad, lp) in enumerate(zip(data, grads, arrays, strict=True)):
        if grad.shape != lp.shape:
            raise ValueError(f"grads[{i}] has shape {grad.shape}, logprobs {lp.shape}")
        weights = TensorData.from_numpy((-grad).astype(np.float32))
        inputs = {"target_tokens": datum.loss_fn_inputs["target_tokens"], "weights": weights}
        backward.append(_with_inputs(datum, inputs))
    clean = {str(k): float(v) for k, v in dict(metrics or {}).items()}
    return CustomLossResult(backward, clean, loss_sum)
