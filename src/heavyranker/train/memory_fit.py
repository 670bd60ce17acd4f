"""Whether a training batch fits in memory, estimated before the first batch is read (an out-of-memory that
still happens becomes one line naming the setting to lower: memory.out_of_memory_as_user_error).

The estimate counts what a step surely holds at once, so that it refuses only batches that cannot fit:
- the batch: each feature as the batch holds it (its shape and dtype, after preprocessing), and a float32
  label and weight per task;
- the activations the backward pass needs: the output of every leaf module of the model (Linear, ReLU,
  BatchNorm, LayerNorm, ...), measured by a forward of two zero examples, once per example;
- the model's state: its parameters, their gradients and Adam's two moments (4 copies).
It leaves out what depends on timing or on the data (the records read and decoded ahead by the pipeline,
the columns before truncate_and_slice, the gradients of the activations, the allocator's slack): the real
peak is higher, and a batch the estimate lets through may still run out of memory."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..data.batch import Spec
from ..errors import UserError
from ..memory import memory_limit

GiB = 2**30
FLOAT32 = 4
MODEL_STATE_COPIES = 4  # parameters, gradients, Adam's first and second moments
PROBE_EXAMPLES = 2  # examples in the forward that measures the activations


def example_bytes(specs: Mapping[str, Spec], tasks: int) -> int:
    """Bytes of one example in a batch: its features (shape x dtype), a float32 label and weight per task."""
    features = sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs.values())
    return features + 2 * tasks * FLOAT32


def activation_bytes(model: nn.Module, specs: Mapping[str, Spec]) -> int:
    """Bytes of the outputs of the model's leaf modules for one example: about what autograd keeps for the
    backward pass. Measured by a forward of zero examples without gradients (no state changes)."""
    total = 0

    def count(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        for tensor in output if isinstance(output, tuple | list) else (output,):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()

    leaves = [module for module in model.modules() if not any(module.children())]
    hooks = [leaf.register_forward_hook(count) for leaf in leaves]
    device = next(model.parameters()).device
    features = {
        name: torch.zeros((PROBE_EXAMPLES, *spec.shape), dtype=spec.dtype, device=device)
        for name, spec in specs.items()
    }
    was_training = model.training
    try:
        model.eval()  # BatchNorm's running statistics stay as they are
        with torch.no_grad():
            model(features)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total // PROBE_EXAMPLES


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, their gradients and Adam's two moments."""
    return MODEL_STATE_COPIES * sum(p.numel() * p.element_size() for p in model.parameters())


def check_batch_fits(
    specs: Mapping[str, Spec],
    tasks: int,
    model: nn.Module,
    batch_size: int,
    world_size: int = 1,
    limit: tuple[int, str] | None = None,
) -> None:
    """Raises UserError naming train_data.global_batch_size when a training batch of `batch_size` examples
    per process cannot fit in `limit` (bytes, and where the limit comes from; default: memory_limit()).
    On a GPU the model's part (its state and activations) is compared with the GPU's memory instead."""
    batch, activations = example_bytes(specs, tasks), activation_bytes(model, specs)
    state = state_bytes(model)
    host = limit or memory_limit()
    device = next(model.parameters()).device
    if device.type == "cuda":
        gpu = (torch.cuda.get_device_properties(device).total_memory, f"the memory of {device}")
        budgets = [(batch, 0, host, "the batch"), (activations, state, gpu, "the activations")]
    else:
        budgets = [(batch + activations, state, host, "the batch and the activations")]
    for per_example, fixed, (limit_bytes, source), counted in budgets:
        need = fixed + batch_size * per_example
        if need > limit_bytes:
            fits = max(0, (limit_bytes - fixed) // per_example) * world_size
            raise UserError(
                f"train_data.global_batch_size: {batch_size * world_size:,} examples need at least "
                f"{need / GiB:.1f} GiB ({per_example / 1024:.1f} KiB per example for {counted}), more than "
                f"the {limit_bytes / GiB:.1f} GiB of {source}; lower train_data.global_batch_size (this "
                f"estimate allows at most {fits:,})"
            )
