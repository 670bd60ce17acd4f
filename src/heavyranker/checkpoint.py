"""Checkpoints that survive a kill: written with atomic_write (a temporary name, fsynced, renamed into place).

A checkpoint is one file `step_<N>.pt` in a run folder's checkpoints/ (run_folder.py: where they are, which
are kept, which is the best). A file of that name is complete by construction (os.replace is atomic), so the
newest one is always safe to resume from. Loading uses `torch.load(weights_only=True)`: a checkpoint holds
tensors and plain containers, never code.

A run with sharded tables (train/sharded_checkpoint.py) leaves its large tables out of step_<N>.pt: each rank
writes its shards (weights and per-row optimizer state) to step_<N>.shards/, and step_<N>.pt, written last,
holds where they are under SHARDED_TABLES. TableShards reads them, mapped, a part of a table at a time."""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import torch
from torch import nn

from .atomic import atomic_write, refuse_link
from .errors import UserError
from .run_folder import RunFolder


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` as folder/step_<step>.pt. A write that fails (a full disk) raises UserError naming the
    file and the OS error; the file is left as it was. A symbolic link at the file's name is refused."""
    final = refuse_link(RunFolder.of_checkpoints(folder).checkpoint(step))
    problem = save_atomically(final, state, "the checkpoint")
    if problem:
        raise UserError(problem) from None
    return final


def save_atomically(path: Path, content: Any, what: str) -> str | None:
    """torch.save `content` to `path` with atomic_write; a write that fails (a full disk) leaves the file as
    it was and is one line saying so ("PATH: cannot write WHAT: ..."), returned; None when written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            torch.save(content, f)
    except Exception as e:
        cause = os_error_in(e)
        if cause is None:
            raise
        return f"{path}: cannot write {what}: {cause.strerror or cause}"
    return None


def os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError that `error` is, or that it was raised while handling: torch.save raises a RuntimeError of
    its own when it closes an archive after a failed write."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


def load_checkpoint(path: str | Path, *, mapped: bool = False, assemble: bool = True) -> dict[str, Any]:
    """The checkpoint's state. `mapped`: its tensors are mapped from the file (private pages), not read, so
    that what the caller never touches (the optimizer's state, for a command that needs the weights only) is
    never read into memory. Only for a caller that drops the state once it copied what it needs: a mapped
    file removed on a network file system by another host can fault (SIGBUS) when a page is read. A file
    torch cannot map (a legacy, non-zip torch.save; an empty or damaged one) is read whole, as it always was:
    it loads, or fails with its own message, not torch's advice to save it again.

    A checkpoint with sharded tables comes in the replicated layout: each table's weight assembled from its
    shard files under the replicated model's key, and (unless `mapped`: the weights are all such a caller
    reads) its per-row optimizer state under the replicated optimizer's index. With `assemble` False the
    tables stay in their files: SHARDED_TABLES then holds their TableShards (a sharded resume reads its
    own parts of them)."""
    try:
        state = _mapped(path) if mapped else torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as e:  # a truncated or foreign file: say which one
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):  # torch.save of a bare tensor or list: a file of another program
        raise UserError(
            f"{path}: not a heavyranker checkpoint (it holds a {type(state).__name__}, not a dict)"
        )
    if SHARDED_TABLES in state:
        shards = TableShards(state[SHARDED_TABLES], Path(path))
        state[SHARDED_TABLES] = shards
        if assemble:
            shards.assemble(state, mapped)
    return state


# Where an open file can be opened again by its descriptor: the same file, whatever its name points to now.
OPEN_FILES = Path("/proc/self/fd")


def _mapped(path: str | Path) -> Any:
    """torch.load with mmap opens the file by name twice (its zip directory, then the mapping): through the
    descriptor of one open both are the same file, where an atomic save replacing the name in between would
    pair one file's directory with the other's bytes (the weights of another checkpoint, silently)."""
    with open(path, "rb") as file:
        if not zipfile.is_zipfile(file):
            file.seek(0)  # is_zipfile read its end
            return torch.load(file, map_location="cpu", weights_only=True)
        pinned = OPEN_FILES / str(file.fileno()) if OPEN_FILES.is_dir() else path
        return torch.load(pinned, map_location="cpu", weights_only=True, mmap=True)


# In a checkpoint of a run with sharded tables: table name -> where its shards are, as
# train/sharded_checkpoint.py writes it: {"key": the replicated model's state-dict key, "shape": [rows,
# columns], "dtype": "float32", "optimizer": {"index", "per_row": [names], "one_per_row": [those of them
# that are a value per row, not shaped as the weight], "scalars": {name: value}, "in": "optimizer" or
# "table_optimizer" (optimizer.embedding's; absent: "optimizer")} (absent before the first step), "shards":
# [{"file": relative to the checkpoint's folder, "offsets", "sizes"}]}. A shard file holds
# {"<table>@<row>,<column>": {"weight": tensor, <per-row optimizer state>: tensor}} (a value per row: the
# shard's rows').
SHARDED_TABLES = "sharded_tables"


def shard_key(table: str, offsets: list[int]) -> str:
    """A shard's name in its file: its table and where it starts."""
    return f"{table}@{offsets[0]},{offsets[1]}"


class TableShards:
    """The large tables of a checkpoint with sharded tables, left in their shard files: any part of a
    table's weight or per-row optimizer state is read from the shards it overlaps (mapped, one file at a
    time), never the whole table unless asked for."""

    def __init__(self, index: Any, checkpoint: Path):
        self.checkpoint = checkpoint
        try:
            self.tables = {str(name): _TableRecord.of(record) for name, record in index.items()}
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{checkpoint}: its {SHARDED_TABLES!r} is damaged ({type(e).__name__}: {e})"
            ) from None

    def read_into(self, table: str, key: str, out: torch.Tensor, offsets: list[int]) -> None:
        """Copy into `out` the part of `table`'s tensor `key` ("weight", or a per-row optimizer state such
        as "exp_avg") that starts at `offsets` (row, column) and has out's shape. A 1-D `out` is a value per
        row (row-wise Adagrad's sum), read from the shards of the table's first column."""
        record, covered, dims = self.tables[table], 0, out.dim()
        for shard in record.shards:
            if dims == 1 and shard["offsets"][1] != 0:  # the other columns' shards hold the same rows' values
                continue
            at, sizes = shard["offsets"][:dims], shard["sizes"][:dims]
            region = _overlap(offsets[:dims], list(out.shape), at, sizes)
            if region is None:
                continue
            file = self.checkpoint.parent / shard["file"]
            source = self._tensor(file, shard_key(table, shard["offsets"]), key, sizes)
            into, outof = _within(region, offsets[:dims]), _within(region, at)
            out[into].copy_(source[outof])
            covered += out[into].numel()
            del source  # unmaps the file before the next one is mapped
        if covered != out.numel():
            raise UserError(
                f"{self.checkpoint}: its {SHARDED_TABLES!r} is damaged ({table}'s shards do not cover it)"
            )

    def full(self, table: str, key: str, mapped: bool = False) -> torch.Tensor:
        """`table`'s tensor `key` whole, each shard copied in place. `mapped`: a table that one shard holds
        whole is that shard's tensor, mapped from its file (load_checkpoint's `mapped`)."""
        record = self.tables[table]
        if mapped and len(record.shards) == 1 and tuple(record.shards[0]["sizes"]) == record.shape:
            shard = record.shards[0]
            file = self.checkpoint.parent / shard["file"]
            return self._tensor(file, shard_key(table, shard["offsets"]), key, shard["sizes"])
        one_per_row = record.optimizer is not None and key in record.optimizer["one_per_row"]
        tensor = torch.empty(record.shape[:1] if one_per_row else record.shape, dtype=record.dtype)
        self.read_into(table, key, tensor, [0, 0])
        return tensor

    def assemble(self, state: dict[str, Any], mapped: bool) -> None:
        """Put the tables into `state` in the replicated layout (load_checkpoint's `assemble`): each table
        in memory once. `mapped`: the weights only, for a caller that reads nothing else."""
        for table, record in self.tables.items():
            if isinstance(state.get("model"), dict):
                state["model"][record.key] = self.full(table, "weight", mapped)
            optimizer_state = state.get(record.optimizer["in"]) if record.optimizer is not None else None
            entries = optimizer_state.get("state") if isinstance(optimizer_state, dict) else None
            if not mapped and isinstance(entries, dict):
                per_row = {key: self.full(table, key) for key in record.optimizer["per_row"]}
                entries[record.optimizer["index"]] = {**record.optimizer["scalars"], **per_row}
        del state[SHARDED_TABLES]

    def _tensor(self, file: Path, shard: str, key: str, sizes: list[int]) -> torch.Tensor:
        """Tensor `key` of `shard` in `file`, mapped; a one-line UserError naming the file if it is missing,
        unreadable, or not what the index says."""
        try:
            content = _mapped(file)
        except FileNotFoundError:
            raise UserError(f"{file}: a shard file of {self.checkpoint} is missing") from None
        except Exception as e:  # a truncated or foreign file
            why = " ".join(f"{type(e).__name__}: {e}".split())
            raise UserError(f"{file}: not a readable shard file of {self.checkpoint} ({why})") from None
        tensor = content.get(shard, {}).get(key) if isinstance(content, dict) else None
        if not isinstance(tensor, torch.Tensor) or list(tensor.shape) != list(sizes):
            raise UserError(
                f"{file}: not the shard file {self.checkpoint} names (no {key} of {shard} shaped {sizes})"
            )
        return tensor


class _TableRecord(NamedTuple):
    key: str
    shape: tuple[int, int]
    dtype: torch.dtype
    optimizer: dict[str, Any] | None
    shards: list[dict[str, Any]]

    @classmethod
    def of(cls, record: dict[str, Any]) -> _TableRecord:
        dtype = getattr(torch, record["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {record['dtype']!r}")
        shards = [
            {
                "file": _shard_file(s["file"]),
                "offsets": [int(n) for n in s["offsets"]],
                "sizes": [int(n) for n in s["sizes"]],
            }
            for s in record["shards"]
        ]
        optimizer = record.get("optimizer")
        if optimizer is not None:
            per_row = [str(name) for name in optimizer["per_row"]]
            optimizer = {
                "index": int(optimizer["index"]),
                "per_row": per_row,
                "one_per_row": [str(name) for name in optimizer.get("one_per_row", [])],
                "scalars": dict(optimizer["scalars"]),
                "in": str(optimizer.get("in", "optimizer")),
            }
        rows, columns = (int(n) for n in record["shape"])
        return cls(str(record["key"]), (rows, columns), dtype, optimizer, shards)


def _shard_file(name: object) -> str:
    """A shard file's name as the index holds it, relative to the checkpoint's folder: inside a folder
    `step_<N>.shards`, never elsewhere (an index naming `../x` or `/x` would have a load read any file)."""
    parts = PurePosixPath(str(name)).parts
    if len(parts) != 2 or not parts[0].endswith(".shards") or ".." in parts or parts[0].startswith("/"):
        raise ValueError(f"shard file {str(name)!r} is not in a step_<N>.shards folder")
    return str(name)


def _overlap(
    offsets: list[int], sizes: list[int], other_offsets: list[int], other_sizes: list[int]
) -> list[tuple[int, int]] | None:
    """The (start, end) per dimension that two blocks of a table share, or None where they share nothing."""
    region = []
    for start, size, other_start, other_size in zip(offsets, sizes, other_offsets, other_sizes, strict=True):
        begin, end = max(start, other_start), min(start + size, other_start + other_size)
        if begin >= end:
            return None
        region.append((begin, end))
    return region


def _within(region: list[tuple[int, int]], offsets: list[int]) -> tuple[slice, ...]:
    """`region` (of the table) as slices of a block that starts at `offsets`."""
    return tuple(slice(begin - at, end - at) for (begin, end), at in zip(region, offsets, strict=True))


# What a resume reads of a checkpoint besides the model weights (train/loop.py's Trainer.save writes them).
_RESUME_STATE = {"optimizer": dict, "scheduler": dict, "step": int, "rng": torch.Tensor}


def check_resumable(state: dict[str, Any], path: str | Path) -> None:
    """UserError naming `path` where `state` lacks what a resume reads (a checkpoint trimmed to its weights,
    or written by another program): a training run resumes from it or says why not, in one line."""
    for key, kind in _RESUME_STATE.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            found = "nothing" if key not in state else f"a {type(state[key]).__name__}"
            raise UserError(
                f"{path}: cannot resume from this checkpoint: its {key!r} is {found}, not of type "
                f"{kind.__name__}; move it out of the checkpoints folder to resume from an earlier one"
            )


def resolve_checkpoint(path: str | Path, best: bool = False) -> Path:
    """A checkpoint file, or of a run folder / checkpoints folder the one best.json marks (with `best`, where
    there is a marker), else the newest."""
    path = Path(path)
    if path.is_file():
        return path
    for run in (RunFolder(path), RunFolder.of_checkpoints(path)):
        found = (run.best_checkpoint() if best else None) or run.newest_checkpoint()
        if found is not None:
            return found
    raise UserError(f"no checkpoint at {path} (expected a step_<N>.pt file or a folder holding one)")


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights whose names and shapes must all match; a mismatch names the first few offending
    parameters of each kind (missing, unexpected, of another shape) and counts the rest."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: shape {tuple(state_dict[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [f"missing {_first(missing, ', ')}"] if missing else []
    problems += [f"unexpected {_first(unexpected, ', ')}"] if unexpected else []
    problems += [_first(shapes, "; ")] if shapes else []
    if problems:
        raise UserError(f"{source} does not fit this model: " + "; ".join(problems))
    model.load_state_dict(state_dict)


# A checkpoint of another model misfits in hundreds of names; the first few of each kind say what, and the
# line stays short.
SHOWN_PER_KIND = 3


def _first(items: list[str], separator: str) -> str:
    more = len(items) - SHOWN_PER_KIND
    shown = separator.join(items[:SHOWN_PER_KIND])
    return shown if more <= 0 else f"{shown} (and {more} more)"
