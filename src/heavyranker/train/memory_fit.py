"""Whether the model and a training batch fit in memory, estimated before either is allocated (an
out-of-memory that still happens becomes one line naming the setting to lower:
memory.out_of_memory_as_user_error).

The model's state is counted first, on a model built on torch's meta device (shapes, no memory): id tables
too large for the machine are refused in one line instead of the kernel's OOM killer ending the process
while it fills them. Then the batch, against what the state leaves.

The estimate counts what a step surely holds at once, so that it refuses only batches that cannot fit:
- the batch: each feature as the batch holds it (its shape and dtype, after preprocessing), and a float32
  label and weight per task;
- the activations the backward pass needs: the output of every leaf module of the model (Linear, ReLU,
  BatchNorm, LayerNorm, ...), measured by a forward of two zero examples, once per example;
- the model's state: its parameters and buffers (the managed id tables' maps), each parameter's gradient
  and its optimizer's state (Adam's two moments; the tables' own optimizer's, optimizer.embedding).
It leaves out what depends on timing or on the data (the records read and decoded ahead by the pipeline,
the columns before truncate_and_slice, the gradients of the activations, the allocator's slack): the real
peak is higher, and a batch the estimate lets through may still run out of memory."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..config.model import ModelConfig
from ..config.optimizer import OptimizerConfig, TableOptimizerType
from ..data.batch import Spec
from ..errors import UserError
from ..memory import memory_limit
from ..model import Ranker, build_model
from ..model.embeddings import INIT_BLOCK_ROWS

CPU = torch.device("cpu")
GiB = 2**30
FLOAT32 = 4
ADAM_MOMENTS = 2
# The copies of a table's weight its own optimizer keeps (row-wise Adagrad: a value per row, counted apart).
TABLE_OPTIMIZER_COPIES = {
    TableOptimizerType.ROWWISE_ADAGRAD: 0,
    TableOptimizerType.ADAGRAD: 1,
    TableOptimizerType.SGD: 0,
    TableOptimizerType.ADAM: 2,
}
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
            model(features, **_large_elsewhere(model, features))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total // PROBE_EXAMPLES


def _large_elsewhere(model: nn.Module, features: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """For a ranker built without its large tables' rows (sharded: train/sharding.py looks them up in the
    shards), zero vectors in their place, after each table's bag (its id mapping's outputs, which the sharded
    lookup makes too); {} for a model that looks its tables up itself."""
    tables = list(model.large_embeddings.values()) if isinstance(model, Ranker) else []
    if all(table.embedding is not None for table in tables):
        return {}
    for table in tables:
        table.bag(features[table.feature_name])
    device = next(model.parameters()).device
    return {"large": [torch.zeros(PROBE_EXAMPLES, table.out_features, device=device) for table in tables]}


def state_bytes(model: Ranker, optimizer: OptimizerConfig, table_shards: int = 1) -> int:
    """Bytes of the model's state in one training process: its parameters and buffers, and each parameter's
    gradient and optimizer state. `table_shards`: the processes the large tables are split over
    (training.embedding_sharding: torchrec); each holds its share of a table, and at start one block of the
    table's rows beside it while it fills its shards (model/embeddings.py init_rows)."""
    own = optimizer.embedding.type if optimizer.embedding is not None else None  # the tables' optimizer
    tables = {id(p) for p in model.table_parameters()}
    large = {id(table.embedding.weight) for table in model.large_embeddings.values()}
    total = sum(b.numel() * b.element_size() for b in model.buffers())
    for p in model.parameters():
        weight = p.numel() * p.element_size()
        if id(p) in tables and own is not None:
            copies = 2 + TABLE_OPTIMIZER_COPIES[own]
            if own == TableOptimizerType.ROWWISE_ADAGRAD:
                total += p.shape[0] * p.element_size()  # one value per row
        else:  # in Adam
            copies = 2 + ADAM_MOMENTS
        if id(p) in large:  # at start its share and a block of rows; in a step the share's copies
            block = min(INIT_BLOCK_ROWS, p.shape[0]) * p.shape[1] * p.element_size()
            total += max(weight // table_shards + block, copies * weight // table_shards)
        else:
            total += copies * weight
    return total


def check_model_fits(
    config: ModelConfig,
    specs: Mapping[str, Spec],
    optimizer: OptimizerConfig,
    table_shards: int = 1,
    device: torch.device = CPU,
    processes_here: int = 1,
    limit: tuple[int, str] | None = None,
) -> int:
    """The bytes of the model's training state in one process (state_bytes), counted on a model built on the
    meta device; raises UserError, naming the largest id table, when the `processes_here` (this host's ranks)
    need more than `limit` (default: memory_limit()). On a GPU the state is compared with the GPU's memory,
    and the host needs the model once per process (it is built there)."""
    with torch.device("meta"):
        model = build_model(config, specs)
    state = state_bytes(model, optimizer, table_shards)
    host = limit or memory_limit()
    budgets = [(state * processes_here, host, "weights, gradients and optimizer state")]
    if device.type == "cuda":
        built = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        budgets = [(built * processes_here, host, "weights"), (state, _gpu_memory(device), budgets[0][2])]
    for need, (limit_bytes, source), what in budgets:
        if need > limit_bytes:
            raise UserError(
                f"model: its {what} need at least {need / GiB:.1f} GiB{_per(processes_here)}, more than "
                f"the {limit_bytes / GiB:.1f} GiB of {source}{_largest_table(config)}"
            )
    return state


def _per(processes: int) -> str:
    return " per process" if processes == 1 else f" for the {processes} processes on this host"


def _gpu_memory(device: torch.device) -> tuple[int, str]:
    return torch.cuda.get_device_properties(device).total_memory, f"the memory of {device}"


def _largest_table(config: ModelConfig) -> str:
    """Where to lower the size: the id table with the most weights, if the model has any."""
    tables = [
        (f"model.{kind}.tables[{i}] ({table.name})", table.num_embeddings * table.embedding_dim * FLOAT32)
        for kind in ("large_embeddings", "small_embeddings")
        if (section := getattr(config, kind)) is not None
        for i, table in enumerate(section.tables)
    ]
    if not tables:
        return ""
    where, weights = max(tables, key=lambda table: table[1])
    size = f"{weights / GiB:.1f} GiB"
    return f"; the largest id table, {where}, holds {size} of weights: lower its num_embeddings"


def check_batch_fits(
    specs: Mapping[str, Spec],
    tasks: int,
    model: nn.Module,
    batch_size: int,
    state: int,
    world_size: int = 1,
    limit: tuple[int, str] | None = None,
) -> None:
    """Raises UserError naming train_data.global_batch_size when a training batch of `batch_size` examples
    per process cannot fit in `limit` (bytes, and where the limit comes from; default: memory_limit()) beside
    the model's `state` (bytes: check_model_fits). On a GPU the model's part (its state and activations) is
    compared with the GPU's memory instead."""
    batch, activations = example_bytes(specs, tasks), activation_bytes(model, specs)
    host = limit or memory_limit()
    device = next(model.parameters()).device
    if device.type == "cuda":
        gpu = _gpu_memory(device)
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
