"""A checkpoint of a run with sharded tables (training.embedding_sharding: torchrec), written without
gathering a table anywhere.

Each rank writes its own shards of the large tables (their rows or columns of the weight and of the per-row
optimizer state: Adam's moments, or optimizer.embedding's, such as row-wise Adagrad's value per row) to
checkpoints/step_<N>.shards/rank-<K>.<save>.pt; then rank 0 writes step_<N>.pt with the rest (the dense
weights, the optimizers' other state, scheduler, step, rng, stream position) and, under
checkpoint.SHARDED_TABLES, where each table's shards are. Every file is written
atomically, and step_<N>.pt last: its presence is what makes the checkpoint exist (a save killed before it
leaves a shard folder that run_folder.py sweeps). Readers: checkpoint.TableShards.

<save> is a name drawn for each save: a save that replaces step_<N>.pt (a stop right after the checkpoint
of its step, maybe under another plan after a resume) never rewrites the files the step_<N>.pt it replaces
points at; rank 0 removes those once the new step_<N>.pt is in place. No rank writes shards before the
next save's first collective, which rank 0 joins only after that: the removal never meets a writer."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_atomically, shard_key
from ..errors import UserError
from ..run_folder import RunFolder
from .sharding import ShardedTables, shard_view, weight_key


@dataclass(frozen=True)
class WrittenShards:
    """A save's shards, written by every rank. On rank 0, what step_<N>.pt holds in their place: the
    model's state without the large tables, the optimizer's without their entries, and `index` (under
    checkpoint.SHARDED_TABLES); on the other ranks these are empty."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    index: dict[str, Any]
    folder: Path
    table_optimizer: dict[str, Any] | None = None  # optimizer.embedding's, without the large tables' entries

    def remove_replaced(self) -> None:
        """Once step_<N>.pt is written (rank 0): remove the files of the shard folder its index does not
        name: the replaced step_<N>.pt's, or those of a save of this step killed before its step_<N>.pt."""
        named = {Path(s["file"]).name for record in self.index.values() for s in record["shards"]}
        for file in self.folder.iterdir() if self.folder.is_dir() else []:
            if file.name not in named:
                file.unlink(missing_ok=True)


def write_shards(
    sharded: ShardedTables,
    optimizer: torch.optim.Optimizer,
    checkpoints: Path,
    step: int,
    table_optimizer: torch.optim.Optimizer | None = None,
) -> WrittenShards:
    """Every rank writes its shards of checkpoint `step` in `checkpoints`, with the per-row state of the
    optimizer that trains each table (`table_optimizer`, optimizer.embedding's, where set). A rank that
    cannot write (a full disk) makes every rank raise its one-line UserError. Collective: every rank."""
    runtime = sharded.runtime
    save = runtime.broadcast(secrets.token_hex(4))
    folder = RunFolder.of_checkpoints(checkpoints).shards(step)
    optimizers = {"optimizer": optimizer, "table_optimizer": table_optimizer}
    optimizers = {kind: o for kind, o in optimizers.items() if o is not None}
    content, written, moments = _own_shards(sharded, optimizers)
    shard_file = folder / f"rank-{runtime.rank}.{save}.pt"
    problem = save_atomically(shard_file, content, "the checkpoint's shards") if content else None
    reports = runtime.gather((problem, written, moments))
    problems = [problem for problem, _, _ in reports if problem]
    if problems:
        raise UserError(problems[0])
    if not runtime.is_main:
        return WrittenShards({}, {}, {}, folder)
    files = [f"{folder.name}/rank-{rank}.{save}.pt" for rank in range(len(reports))]
    indices, rest = {}, {}
    for kind, held in optimizers.items():
        own = {name: (kind, index) for index, name in sharded.table_indices(held).items()}
        state = held.state_dict()
        others = {i: entry for i, entry in state["state"].items() if (kind, i) not in own.values()}
        rest[kind] = {"state": others, "param_groups": state["param_groups"]}
        indices |= own
    index = _index(sharded, files, reports, indices)
    model = sharded.ranker.state_dict()
    return WrittenShards(model, rest["optimizer"], index, folder, rest.get("table_optimizer"))


def _index(
    sharded: ShardedTables, files: list[str], reports: list[tuple], indices: dict[str, tuple[str, int]]
) -> dict[str, Any]:
    """checkpoint.SHARDED_TABLES: per table, its shards (in the file of the rank that holds each, `files`)
    as every rank's report says, and where its optimizer state is (`indices`: which optimizer's, at which
    index) with its scalars."""
    index = {}
    for name, weight in sharded.sharded_weights().items():
        index[name] = {
            "key": weight_key(name),
            "shape": list(weight.size()),
            "dtype": str(weight.dtype).removeprefix("torch."),
            "shards": [
                {"file": files[rank], "offsets": offsets, "sizes": sizes}
                for rank, (_, written, _) in enumerate(reports)
                for table, offsets, sizes in written
                if table == name
            ],
        }
        owners = [moments[name] for _, _, moments in reports if name in moments]
        if owners:  # absent before the first step
            per_row, one_per_row, scalars = owners[0]
            kind, at = indices[name]
            index[name]["optimizer"] = {
                "index": at,
                "per_row": per_row,
                "one_per_row": one_per_row,
                "scalars": scalars,
                "in": kind,
            }
    return index


def _own_shards(
    sharded: ShardedTables, optimizers: dict[str, torch.optim.Optimizer]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[tuple[str, list[int], list[int]]], dict[str, Any]]:
    """This rank's shard file's content (checkpoint.SHARDED_TABLES says its layout), which shards it holds
    (table, offsets, sizes), and per table whose optimizer state it holds: the names of the per-row states,
    those of them that are a value per row, and the others (Adam's step)."""
    content, written, moments = {}, [], {}
    for name, weight in sharded.sharded_weights().items():
        param = sharded.table_params[name]
        state = next((o.state[param] for o in optimizers.values() if param in o.state), {})
        per_row = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
        if per_row and param.numel() > 0:
            scalars = {k: v for k, v in state.items() if k not in per_row}
            one_per_row = sorted(k for k, v in per_row.items() if v.dim() == 1 and param.dim() == 2)
            moments[name] = (sorted(per_row), one_per_row, scalars)
        for shard in weight.local_shards():
            offsets, sizes = list(shard.metadata.shard_offsets), list(shard.metadata.shard_sizes)
            tensors = {"weight": shard.tensor.detach()}
            tensors |= {key: shard_view(value, param, shard.tensor) for key, value in per_row.items()}
            content[shard_key(name, offsets)] = {key: _alone(t) for key, t in tensors.items()}
            written.append((name, offsets, sizes))
    return content, written, moments


def _alone(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it where it is a part of a larger storage: torch.save writes a view's whole
    storage (the rank's other shards of the table, with a column-wise plan)."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole and tensor.is_contiguous() and tensor.storage_offset() == 0 else tensor.clone()
