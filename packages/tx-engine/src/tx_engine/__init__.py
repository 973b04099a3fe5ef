"""tx-engine: JAX/Flax NNX models, multi-tenant LoRA, losses, optimizers and sampling for tx.

Shape-letter legend used in names of numeric code (``x_btd``, ``logits_btv``, ``lora_a_adr``)
and in einsum strings:

* ``B`` batch, ``T`` time (sequence), ``S`` cache slots (keys),
* ``D`` model width, ``N`` attention heads, ``K`` kv heads, ``H`` head dim,
* ``F`` MLP width, ``V`` vocabulary,
* ``E`` experts, ``A`` adapter slots, ``R`` LoRA rank.

MoE code adds ``M`` tokens (B·T flattened), ``n`` (token, expert) pairs and ``G`` (expert,
adapter) groups; attention uses ``G`` for the N/K query heads sharing one kv head.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("tx-engine")
except PackageNotFoundError:  # a source checkout on PYTHONPATH (e.g. an accelerator box)
    __version__ = "0+source"
