"""model.large_embeddings split over the ranks by torchrec (training.embedding_sharding: torchrec).

The large tables go into one torchrec EmbeddingBagCollection under DistributedModelParallel, which places
them with torchrec's planner and keeps the rest of the ranker on DDP. Each table's id mapping stays the
ranker's (LargeEmbedding.bag): only the lookup moves. The tables use torchrec's dense compute kernel, so
that their parameters train with the same optimizer and schedule as in a replicated run (the fused kernels
would apply a sparse optimizer of their own inside backward).

Each rank checkpoints its own shards (train/sharded_checkpoint.py), under the replicated model's state-dict
keys and parameter order, so a sharded run's checkpoint is evaluated and exported on one machine, and
either mode resumes from either's."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import TableShards, load_model_weights
from ..config.training import TrainingConfig
from ..data.batch import Spec
from ..errors import UserError
from ..model import Ranker
from ..model.embeddings import bag_mean
from ..runtime import Runtime
from .shard_init import fill_shards, parameter_order
from .sharded_eval import InStep
from .table_optim import ColumnSplit

# The versions that work together: fbgemm's operators are compiled against one torch release, and a
# mismatch shows up as an undefined symbol when torchrec is imported.
PINS = {"torch": "2.13", "torchrec": "1.8.0", "fbgemm": "1.8.0"}
INSTALL = (
    "pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 && pip install 'heavyranker[torchrec]' "
    "(fbgemm-gpu==1.8.0 instead of fbgemm-gpu-cpu on CUDA; see docs/sharding.md)"
)
log = logging.getLogger(__name__)

WHERE = "training.embedding_sharding: torchrec"


def version_problem(
    torch_version: str, torchrec_version: str | None, fbgemm_version: str | None
) -> str | None:
    """What is wrong with these installed versions (None: not installed), in one line; None when they fit."""
    if torchrec_version is None or fbgemm_version is None:
        missing = " and ".join(
            n for n, v in (("torchrec", torchrec_version), ("fbgemm-gpu", fbgemm_version)) if v is None
        )
        return f"{WHERE} needs {missing}, which is not installed: {INSTALL}"
    found = {"torch": torch_version, "torchrec": torchrec_version, "fbgemm": fbgemm_version}
    wrong = [f"{name} {found[name]}" for name, pin in PINS.items() if not _release_matches(found[name], pin)]
    if wrong:
        pinned = f"torch {PINS['torch']}.x, torchrec {PINS['torchrec']}, fbgemm-gpu(-cpu) {PINS['fbgemm']}"
        return f"{WHERE} works with {pinned}, found {', '.join(wrong)}: {INSTALL}"
    return None


def _release_matches(version: str, pin: str) -> bool:
    """Whether the release numbers start with the pin's: 2.13.0+cpu fits 2.13 and 2.13.0, not 2.13.1."""
    release = version.split("+")[0].split(".")
    return release[: len(pin.split("."))] == pin.split(".")


def _installed(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def require_torchrec() -> None:
    """A UserError saying what to install, before an import that would fail with an undefined symbol."""
    torchrec_version = _installed("torchrec")
    problem = version_problem(torch.__version__, torchrec_version, _installed("fbgemm-gpu-cpu", "fbgemm-gpu"))
    if problem:
        raise UserError(problem)
    try:
        import torchrec  # noqa: F401
    except ImportError as e:
        raise UserError(f"{WHERE}: cannot import torchrec ({e}): {INSTALL}") from None


class _TablesAndRanker(nn.Module):
    """The ranker with its large tables' lookups done by `tables` (an EmbeddingBagCollection, one table and
    one feature key per large embedding, keyed by its module name)."""

    def __init__(self, ranker: Ranker, tables: nn.Module):
        super().__init__()
        self.ranker = ranker
        self.tables = tables

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.ranker(features, large=self.large(features))

    def large(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The large tables' vectors [B, D] each, as LargeEmbedding.forward's. Collective: every rank."""
        from torchrec import KeyedJaggedTensor

        names, rows, weights, counts = [], [], [], []
        for name, table in self.ranker.large_embeddings.items():
            bag_rows, bag_weights, counted = table.bag(features[table.feature_name])
            names.append(name)
            rows.append(bag_rows)
            weights.append(bag_weights)
            counts.append(counted)
        lengths = [torch.full((r.shape[0],), r.shape[1], dtype=torch.int64, device=r.device) for r in rows]
        ids = KeyedJaggedTensor(
            keys=names,
            values=torch.cat([r.flatten() for r in rows]),
            weights=torch.cat([w.flatten() for w in weights]),
            lengths=torch.cat(lengths),
        )
        summed = self.tables(ids).to_dict()
        return [bag_mean(summed[name], c) for name, c in zip(names, counts, strict=True)]


class _OptimizerView:
    """What build_optimizer reads of a model: the towers' parameters and every parameter, here in the
    replicated ranker's order with each table's local shard at its table's place, so that optimizer state
    indices mean the same in both modes."""

    def __init__(self, ranker: Ranker, ordered: list[nn.Parameter], tables: list[nn.Parameter]):
        self.ranker = ranker
        self.ordered = ordered
        self.tables = tables

    def tower_parameters(self) -> dict[str, list[nn.Parameter]]:
        return self.ranker.tower_parameters()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.ordered)

    def table_parameters(self) -> list[nn.Parameter]:
        """As Ranker.table_parameters: the large tables' (their local shards here), then the small ones'."""
        return list(self.tables)


def weight_key(name: str) -> str:
    """A large table's key in the replicated ranker's state dict."""
    return f"large_embeddings.{name}.embedding.weight"


class ShardedTables:
    """The ranker's large tables, moved into torchrec shards: `module` is what to train (a forward runs
    collectives: every rank calls it on each step), `optimizer_view` what to build the optimizer over."""

    def __init__(self, ranker: Ranker, runtime: Runtime, sharding_types: dict[str, str] | None = None):
        """`sharding_types`: table name -> the one torchrec sharding type it may take (tests pin plans);
        by default the planner picks among those this device offers."""
        require_torchrec()
        if not runtime.distributed:
            raise UserError(f"{WHERE} splits tables over the ranks of a torchrun job: run `train --nproc N`")
        if not ranker.large_embeddings:
            raise UserError(f"{WHERE}: the model has no model.large_embeddings tables to shard")
        self.ranker = ranker
        self.runtime = runtime
        tables = ranker.large_embeddings
        # Built with their rows (tests): they are copied into the shards. Built without (train: build_model's
        # allocate_large_tables=False): each rank fills its shards alone, holding no whole table.
        built = {name: table.embedding for name, table in tables.items() if table.embedding is not None}
        full = {name: embedding.weight.detach() for name, embedding in built.items()}
        order = parameter_order(ranker)
        for table in tables.values():
            table.embedding = None  # its rows live in the shards from here on
        shapes = {name: (table.num_embeddings, table.out_features) for name, table in tables.items()}
        self.wrapper = _TablesAndRanker(ranker, _collection(shapes))
        self.module = _distribute(self.wrapper, runtime, sharding_types)
        if full:
            state = {weight_key(n): w for n, w in full.items()} | ranker.state_dict()
            self.load_model_state(state, "the model")
        else:
            fill_shards(self.sharded_weights(), ranker)
        own = dict(ranker.named_parameters())
        # embedding_bags.<name>.weight: this rank's part of the table (an empty parameter where it has none)
        self.table_params = {n.split(".")[1]: p for n, p in self.wrapper.tables.named_parameters()}
        by_key = own | {weight_key(n): p for n, p in self.table_params.items()}
        small = [table.embedding.weight for table in ranker.small_embeddings.values()]
        large = [self.table_params[name] for name in tables]
        self.optimizer_view = _OptimizerView(ranker, [by_key[key] for key in order], large + small)

    def sharded_weights(self) -> dict[str, Any]:
        """Table name -> its weight as a torchrec ShardedTensor (its shards here, and where the rest is)."""
        state = self.wrapper.tables.state_dict()
        return {name: state[f"embedding_bags.{name}.weight"] for name in self.ranker.large_embeddings}

    def column_splits(self) -> dict[nn.Parameter, ColumnSplit]:
        """The tables whose columns are split over the ranks (a column-wise plan): their local parameters
        (empty where a rank holds none of it) and whole sizes, as RowWiseAdagrad takes them."""
        splits = {}
        for name, weight in self.sharded_weights().items():
            rows, columns = weight.size()
            if any(m.shard_sizes[1] < columns for m in weight.metadata().shards_metadata):
                splits[self.table_params[name]] = ColumnSplit(rows, columns)
        return splits

    def in_step(self, specs: dict[str, Spec]) -> InStep:
        """How an evaluation scores its batches here: each rank its own share of a split on its shards, every
        rank in step (train/sharded_eval.py); `specs`: the features the ranker reads."""
        return InStep(self.wrapper, self.runtime, specs)

    def load_model_state(
        self, state: dict[str, torch.Tensor], source: str, shards: TableShards | None = None
    ) -> None:
        """Replicated-layout weights (a checkpoint's "model", from `source`) into the ranker and this rank's
        shards, every name and shape checked. `shards`: a sharded checkpoint's tables, of which this rank
        reads the parts its own shards hold (the overlapping parts of several files where the plan
        changed), never a whole table."""
        tables = {weight_key(name): name for name in self.ranker.large_embeddings}
        in_files = shards.tables if shards is not None else {}
        missing = [key for key, name in tables.items() if key not in state and name not in in_files]
        if missing:
            raise UserError(f"{source} does not fit this model: missing {', '.join(missing)}")
        load_model_weights(self.ranker, {k: v for k, v in state.items() if k not in tables}, source)
        for name, weight in self.sharded_weights().items():
            full = state.get(weight_key(name))
            shape = tuple(full.shape) if name not in in_files else in_files[name].shape
            if shape != tuple(weight.size()):
                raise UserError(
                    f"{source} does not fit this model: {weight_key(name)}: shape {shape} "
                    f"in the checkpoint, {tuple(weight.size())} in the model"
                )
            with torch.no_grad():
                for shard in weight.local_shards():
                    if name in in_files:
                        shards.read_into(name, "weight", shard.tensor, shard.metadata.shard_offsets)
                    else:
                        shard.tensor.copy_(_slice(full, shard.metadata))

    def table_indices(self, optimizer: torch.optim.Optimizer) -> dict[int, str]:
        """Index in the optimizer's state dict -> table name, for the tables' parameters."""
        names = {id(param): name for name, param in self.table_params.items()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: names[id(p)] for i, p in enumerate(params) if id(p) in names}

    def local_optimizer_state(
        self,
        optimizer: torch.optim.Optimizer,
        full: dict[str, Any],
        shards: TableShards | None = None,
        kind: str = "optimizer",
    ) -> dict[str, Any]:
        """A replicated-layout optimizer state (a checkpoint's `kind`: "optimizer", or "table_optimizer"
        for optimizer.embedding's) with each table's per-row state cut to this rank's shards: what
        optimizer.load_state_dict takes here. `shards`: a sharded checkpoint's tables, whose per-row state
        this rank reads for its own shards only (where that checkpoint kept it in `kind`)."""
        entries = dict(full["state"])
        sharded = self.sharded_weights()
        for index, name in self.table_indices(optimizer).items():
            param, entry, one_per_row = self.table_params[name], entries.pop(index, None), set()
            if shards is not None and name in shards.tables:
                record = shards.tables[name].optimizer
                entry = None if record is None or record.get("in", "optimizer") != kind else record
                if entry is not None:
                    one_per_row = set(record.get("one_per_row", []))
                    entry = record["scalars"] | dict.fromkeys(record["per_row"])
            if entry is None or param.numel() == 0:
                continue
            local = {}
            for key, value in entry.items():
                whole = torch.is_tensor(value) and tuple(value.shape) in _per_row_shapes(sharded[name])
                if value is None or whole:
                    local[key] = self._local_part(name, key, value, key in one_per_row, shards)
                else:
                    local[key] = value
            entries[index] = local
        return {"state": entries, "param_groups": full["param_groups"]}

    def _local_part(
        self, name: str, key: str, whole: torch.Tensor | None, one_per_row: bool, shards: TableShards | None
    ) -> torch.Tensor:
        """Table `name`'s per-row state `key` for this rank's shards: cut from `whole` (the table's, shaped
        as its weight or one value per row), else read from the shard files (`one_per_row`: a value a
        row)."""
        param, weight = self.table_params[name], self.sharded_weights()[name]
        rows_only = one_per_row if whole is None else whole.dim() == 1
        local = torch.zeros(
            param.shape[0] if rows_only else param.shape, dtype=param.dtype, device=param.device
        )
        for shard in weight.local_shards():
            part = shard_view(local, param, shard.tensor)
            if whole is None:
                shards.read_into(name, key, part, shard.metadata.shard_offsets)
            else:
                part.copy_(_slice(whole, shard.metadata))
        return local


def _per_row_shapes(weight: Any) -> tuple[tuple[int, ...], ...]:
    """The shapes a table's whole per-row optimizer state takes: its weight's (Adam's moments, Adagrad's
    sum), or one value per row (row-wise Adagrad's sum)."""
    return tuple(weight.size()), (weight.size()[0],)


def _collection(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """An EmbeddingBagCollection with a table (and a feature key) per large embedding (name -> its rows and
    columns), on the meta device: DistributedModelParallel allocates each rank's shards only."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

    configs = [
        EmbeddingBagConfig(
            name=name,
            num_embeddings=rows,
            embedding_dim=columns,
            feature_names=[name],
            pooling=PoolingType.SUM,  # weighted by LargeEmbedding.bag's weights; bag_mean divides
        )
        for name, (rows, columns) in shapes.items()
    ]
    return EmbeddingBagCollection(tables=configs, is_weighted=True, device=torch.device("meta"))


def _distribute(wrapper: nn.Module, runtime: Runtime, sharding_types: dict[str, str] | None) -> nn.Module:
    """DistributedModelParallel over `wrapper`: its tables placed by torchrec's planner, the rest on DDP."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    from torchrec.distributed.types import ShardingType

    offered = [ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value]
    if runtime.device.type == "cuda":  # fbgemm's row-wise sharding needs its CUDA kernels
        offered.append(ShardingType.ROW_WISE.value)
    constraints = {}
    for name in wrapper.ranker.large_embeddings:
        pinned = (sharding_types or {}).get(name)
        if pinned is not None and pinned not in offered:
            raise UserError(f"{WHERE}: sharding type {pinned!r} is not offered on {runtime.device.type}")
        dim = wrapper.ranker.large_embeddings[name].out_features
        constraints[name] = ParameterConstraints(
            sharding_types=[pinned] if pinned else offered,
            min_partition=dim // runtime.world_size if pinned == ShardingType.COLUMN_WISE.value else None,
        )
    sharder = EmbeddingBagCollectionSharder()
    trainer = TrainerConfig(
        world_size=runtime.world_size,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", runtime.world_size)),  # torchrun sets it
    )
    topology = TopologyFactory.create_topology(
        trainer, kernel_config=KernelConfig(compute_device=runtime.device.type)
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(wrapper, [sharder], dist.GroupMember.WORLD)
    # The planner only offers fused kernels off data-parallel (their sparse optimizer runs inside backward);
    # the dense kernel keeps its placement and exposes plain gradients to the run's optimizer.
    for module_plan in plan.plan.values():
        for name, parameter_sharding in module_plan.items():
            parameter_sharding.compute_kernel = EmbeddingComputeKernel.DENSE.value
            log.info(
                "table %s: %s on ranks %s", name, parameter_sharding.sharding_type, parameter_sharding.ranks
            )
    return DistributedModelParallel(wrapper, device=runtime.device, plan=plan, sharders=[sharder])


def _slice(full: torch.Tensor, metadata: Any) -> torch.Tensor:
    """The part of a full table a shard holds (its offsets and sizes in rows and columns); of a value per
    row (a 1-D `full`), its rows'."""
    (row, column), (rows, columns) = metadata.shard_offsets, metadata.shard_sizes
    if full.dim() == 1:
        return full[row : row + rows]
    return full[row : row + rows, column : column + columns]


def shard_view(like_param: torch.Tensor, param: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """The part of `like_param` (a tensor shaped as `param`, as Adam's moments are, or a value per row of
    `param`, as row-wise Adagrad's sum) that `shard`, a view into `param`, is of `param`."""
    offset = shard.storage_offset() - param.storage_offset()
    if like_param.dim() == 1 and param.dim() == 2:  # the shard's rows
        first = offset // param.stride(0)
        return like_param[first : first + shard.shape[0]]
    return like_param.as_strided(shard.shape, shard.stride(), like_param.storage_offset() + offset)


def sharded_tables(training: TrainingConfig, ranker: Ranker, runtime: Runtime) -> ShardedTables | None:
    """The ranker's large tables sharded as training.embedding_sharding says; None: they stay replicated."""
    if training.embedding_sharding == "replicated":
        return None
    return ShardedTables(ranker, runtime)
