"""The one place that knows how each distributed backend reduces, accumulates and stores gradients and weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def micro_batch_context(accelerator, model, *, sync: bool) -> Iterator[None]:
    """Where one micro-batch's forward and backward run; `sync` on the step's last micro-batch only.

    Until then gradients only accumulate locally: DDP skips its all-reduce (`no_sync`), FSDP2 its
    reduce-scatter. DeepSpeed steps its optimizer inside `backward` whenever `sync_gradients` is set, so it
    is cleared for the other micro-batches (ZeRO-2/3 still reduce in each backward, which is correct).
    """
    if sync:
        yield
        return
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    if deepspeed:
        accelerator.sync_gradients = False
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        if deepspeed:
            accelerator.sync_gradients = True


def configure_deepspeed(accelerator, *, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config from mftune's before `accelerator.prepare` (no-op for other backends).

    mftune prepares no data loader, so DeepSpeed learns the micro-batch from here; it clips gradients
    itself (by its own `gradient_clipping`), so that is `train.max_grad_norm`; mftune accumulates by
    itself, so DeepSpeed's accumulation is 1. With the optimizer offloaded to the CPU, mftune's own
    AdamW runs there (DeepSpeed refuses a client optimizer unless told it may).
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = micro_batch_size * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in (None, "none"):
        config["zero_force_ds_cpu_optimizer"] = False


def shards_state(accelerator) -> bool:
    """Whether no single rank holds the whole model's weights or optimizer state (ZeRO, FSDP).

    Such runs save and restore checkpoints collectively (`accelerator.save_state`/`load_state`) and
    gather the final weights from all ranks.
    """
    name = accelerator.distributed_type.name
    return name == "FSDP" or name == "DEEPSPEED"


def quiet_other_ranks(accelerator) -> None:
    """Keep transformers' progress bars and warnings to the main process; the others print nothing."""
    if accelerator.is_main_process:
        return
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
