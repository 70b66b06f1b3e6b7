"""The one place that knows how each distributed backend averages gradients."""

from __future__ import annotations

# Backends that average gradients over ranks (DDP's all-reduce mean, FSDP's and ZeRO's reduce-scatter mean),
# by accelerate's `DistributedType` name.
_AVERAGING = {
    "MULTI_CPU",
    "MULTI_GPU",
    "MULTI_XPU",
    "MULTI_NPU",
    "MULTI_MLU",
    "MULTI_HPU",
    "DEEPSPEED",
    "FSDP",
}


def backend_loss_scale(accelerator) -> float:
    """The factor to multiply a rank's loss by before `backward`, so the gradient is exactly ∇ Σ c_i ℓ_i.

    mftune's per-token coefficients are already normalised over the whole step and all ranks, so each
    rank's loss is its share of a global sum: the gradients must add up across ranks. Backends that
    average instead divide by the world size, which this undoes. `accelerator.backward` divides by its
    own accumulation steps, which mftune keeps at 1 (it accumulates by itself).
    """
    if accelerator.distributed_type.name in _AVERAGING:
        return float(accelerator.num_processes)
    return 1.0
