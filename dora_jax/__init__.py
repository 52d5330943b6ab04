"""dora_jax: DoRA, LoRA and friends for any JAX/Flax model, as pure functions over pytrees."""

from dora_jax import analysis, checkpoint, peft, sharding
from dora_jax.adapters import DoRA, DVoRA, LoRA, Magnitude, VeRA, column_norm_sq, is_adapter
from dora_jax.checkpoint import CheckpointError
from dora_jax.forward import FallbackWarning, apply, infer_axes
from dora_jax.optim import only_trainable
from dora_jax.quant import QuantizedArray, quantize, quantize_base
from dora_jax.sharding import mesh_from_string
from dora_jax.tree import Axes, combine, merge, partition, summary, trainable_mask, wrap

__all__ = [
    "Axes",
    "CheckpointError",
    "DoRA",
    "DVoRA",
    "FallbackWarning",
    "LoRA",
    "Magnitude",
    "QuantizedArray",
    "VeRA",
    "analysis",
    "apply",
    "checkpoint",
    "column_norm_sq",
    "combine",
    "infer_axes",
    "is_adapter",
    "merge",
    "mesh_from_string",
    "only_trainable",
    "peft",
    "partition",
    "quantize",
    "quantize_base",
    "sharding",
    "summary",
    "trainable_mask",
    "wrap",
]
