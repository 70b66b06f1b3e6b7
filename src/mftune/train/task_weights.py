"""Task weights during training: each task's `loss_weight`, or convergence balancing (CoBa) re-weighting them.

CoBa scores a fixed probe set (the first `coba.probe_batches` validation rows of every task) every
`coba.update_interval` steps. Every rank scores the whole probe, so the weights are identical on all ranks
without communication, and the probe is one forward pass over a few rows, which keeps its cost small.
"""

from __future__ import annotations

import torch

from mftune.config import Config
from mftune.data.pipeline import MultiTaskData, Row
from mftune.loss.coba import CobaBalancer
from mftune.loss.weighting import per_task_sums
from mftune.train.batches import collate, to_device
from mftune.train.step import LossSpec, token_losses


class TaskBalancer:
    """The per-task weights the loss uses, updated by CoBa when `train.loss` is `coba`."""

    def __init__(self, cfg: Config, data: MultiTaskData, pad_id: int):
        self.static = torch.tensor([t.loss_weight for t in data.tasks], dtype=torch.float32)
        self.coba = None
        if cfg.train.loss == "coba":
            c = cfg.coba
            self.coba = CobaBalancer(
                len(data.tasks),
                warmup=c.warmup,
                history=c.history,
                tau=c.tau,
                update_interval=c.update_interval,
                floor=c.floor,
            )
            self.probe = probe_rows(data, c.probe_batches)
        self.data, self.pad_id = data, pad_id
        self.micro_batch = cfg.train.micro_batch_size

    @property
    def weights(self) -> torch.Tensor:
        """(K,) task weights for the next step."""
        return self.static if self.coba is None else self.coba.weights

    def after_step(self, step: int, model, device) -> dict[str, float]:
        """Score the probe and update CoBa's weights when due (step 0: the losses before training).

        Returns:
            Values to log (empty when nothing was updated).
        """
        if self.coba is None or (step > 0 and not self.coba.due(step)):
            return {}
        weights = self.coba.observe(
            step, probe_losses(model, self.data, self.probe, self.pad_id, self.micro_batch, device)
        )
        logged = {f"coba/{t.name}/weight": float(w) for t, w in zip(self.data.tasks, weights, strict=True)}
        diagnostics = self.coba.diagnostics()
        if diagnostics.get("df"):
            logged["coba/df"] = float(diagnostics["df"][-1])
        return logged

    def state_dict(self) -> dict:
        return {} if self.coba is None else {"coba": self.coba.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.coba is not None and "coba" in state:
            self.coba.load_state_dict(state["coba"])


def probe_rows(data: MultiTaskData, rows_per_task: int) -> list[Row]:
    """The fixed probe: the first `rows_per_task` validation rows of every task."""
    probe = []
    for task in data.tasks:
        probe += data.valid_rows(task.task_id)[:rows_per_task]
    return probe


@torch.no_grad()
def probe_losses(
    model, data: MultiTaskData, rows: list[Row], pad_id: int, micro_batch: int, device
) -> list[float | None]:
    """Mean token loss of every task on the probe rows (None for a task without probe tokens)."""
    was_training = model.training
    model.eval()
    num_tasks = len(data.tasks)
    loss_sum = torch.zeros(num_tasks, dtype=torch.float64)
    tokens = torch.zeros(num_tasks, dtype=torch.float64)
    for i in range(0, len(rows), micro_batch):
        batch = to_device(collate(data, rows[i : i + micro_batch], pad_id, valid=True), device)
        out = token_losses(model, batch, LossSpec.chunk_size)
        sums = per_task_sums(out.loss, out.correct, out.targets, num_tasks)
        loss_sum += sums["loss_sum"].cpu()
        tokens += sums["num_tokens"].cpu()
    if was_training:
        model.train()
    return [float(s / n) if n else None for s, n in zip(loss_sum, tokens, strict=True)]
