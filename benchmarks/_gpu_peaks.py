"""Dense peak FLOP/s of NVIDIA GPUs, by exact device name, for MFU.

Figures are the vendor data sheets' dense (no structured sparsity) tensor-core rates, and the
plain (non-tensor-core) fp32 rate. A name is matched whole, after dropping "NVIDIA " and case:
``L4`` is not ``L40S``, and an H100 PCIe or NVL is not an H100 SXM. A GPU not in the table
(or whose variant the name does not tell) gets no peak: better no MFU than a wrong one.

    peak("NVIDIA H100 80GB HBM3").bf16   # 989.4e12
    peak("NVIDIA L40S")                  # its own figures, not L4's
    peak("NVIDIA H100 NVL")              # None: not in the table
"""

from __future__ import annotations

import dataclasses
import re

SOURCE = "NVIDIA data sheet, dense (no sparsity)"


@dataclasses.dataclass(frozen=True)
class Peak:
    """One GPU's dense peaks (FLOP/s) and the name the table knows it by."""

    gpu: str
    bf16: float  # tensor cores
    tf32: float  # tensor cores
    fp32: float  # without tensor cores


# (pattern matched against the whole upper-cased name without "NVIDIA ", peak)
_TABLE = (
    (r"H100( 80GB HBM3| SXM5?( 80GB)?)", Peak("H100 SXM", 989.4e12, 494.7e12, 66.9e12)),
    (r"H100 PCIE", Peak("H100 PCIe", 756.0e12, 378.0e12, 51.2e12)),
    (r"H200( 141GB HBM3E)?", Peak("H200 SXM", 989.4e12, 494.7e12, 66.9e12)),
    (r"A100(-SXM4-|-PCIE-| )(40|80)GB( PCIE)?", Peak("A100", 312e12, 156e12, 19.5e12)),
    (r"L4", Peak("L4", 121e12, 60e12, 30.3e12)),
    (r"L40", Peak("L40", 181e12, 90.5e12, 90.5e12)),
    (r"L40S", Peak("L40S", 362e12, 183e12, 91.6e12)),
)  # fmt: skip


def peak(device_name: str) -> Peak | None:
    """The dense peaks of the GPU named ``device_name`` (as jax's ``device_kind`` or
    ``torch.cuda.get_device_name`` give it), or ``None`` when it is not known exactly."""
    name = re.sub(r"^(CUDA:)?(NVIDIA )?", "", device_name.strip().upper())
    return next((p for pattern, p in _TABLE if re.fullmatch(pattern, name)), None)
