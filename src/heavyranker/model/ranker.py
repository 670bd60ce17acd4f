"""The multi-task ranker: featurize -> [embeddings] -> backbone -> one tower per task -> logits
-> probabilities -> calibrated probabilities."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from ..config.data import TaskData
from ..config.embeddings import Combiner
from ..config.model import ArchitectureConfig, ModelConfig, MultiTaskType
from ..data.batch import Spec
from ..errors import UserError
from .calibration import calibrate, downsampling_ratios
from .dcn import build_dcn
from .dlrm import Slice, build_dlrm
from .embeddings import LargeEmbedding, PositionDebias, SmallEmbedding
from .experts import Experts, build_experts
from .featurize import Featurizer, build_featurizer
from .id_mapping import RangeMapping, build_id_mapping
from .linear import DEFAULT_MATMUL, LayerTooLarge, Matmul
from .masknet import build_mask_net
from .mlp import build_mlp

# The pretrained TwHIN embeddings the data may carry, each through its own LayerNorm (the reference's order).
TWHIN_FEATURES = ("user_embedding", "user_eng_embedding", "author_embedding")


def module_name(task: str) -> str:
    """Torch module names cannot hold "."."""
    return task.replace(".", "__")


class Ranker(nn.Module):
    """Built by build_model. forward(features) -> logits, probabilities, calibrated_probabilities [B, T] in
    task_names order (and the towers' input as "backbone" on request: [B, width], or with experts each
    task's own as [B, T, width])."""

    def __init__(
        self,
        task_names: list[str],
        featurizer: Featurizer,
        large_embeddings: dict[str, LargeEmbedding],
        small_embeddings: dict[str, SmallEmbedding],
        twhin_norms: dict[str, nn.LayerNorm],
        position_debias: PositionDebias | None,
        backbone: nn.Module | None,
        multi_task_type: MultiTaskType,
        experts: Experts | None,
        towers: dict[str, nn.Module],
        affine_maps: dict[str, nn.Linear],
        calibration_ratios: torch.Tensor,
        wide: dict[str, nn.Linear] | None = None,
    ):
        super().__init__()
        self.task_names = list(task_names)
        self.featurizer = featurizer
        self.large_embeddings = nn.ModuleDict(large_embeddings)
        self.small_embeddings = nn.ModuleDict(small_embeddings)
        self.twhin_norms = nn.ModuleDict(twhin_norms)
        self.position_debias = position_debias
        self.backbone = backbone
        self.share_partial = multi_task_type == MultiTaskType.SHARE_PARTIAL
        self.experts = experts
        self.towers = nn.ModuleDict(towers)  # module name = task name with "." -> "__"
        self.affine_maps = nn.ModuleDict(affine_maps)
        self.wide = nn.ModuleDict(wide or {})  # the towers with a wide path: a linear logit on the input
        # From the config, not the checkpoint: the data's downsampling rates are not learned.
        self.register_buffer("calibration_ratios", calibration_ratios, persistent=False)

    def inputs(
        self, features: dict[str, torch.Tensor], large: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """[B, input width]: featurized dense features, then each embedding block (see `input_layout`).
        `large`: the large tables' vectors when they were looked up elsewhere (sharded: train/sharding.py)."""
        parts = [self.featurizer(features)]
        if large is None:
            large = [table(features[table.feature_name]) for table in self.large_embeddings.values()]
        parts += large
        parts += [table(features["discrete"]) for table in self.small_embeddings.values()]
        parts += [norm(features[name]) for name, norm in self.twhin_norms.items()]
        if self.position_debias is not None:
            parts.append(self.position_debias(features["discrete"]))
        return torch.cat(parts, dim=1)

    def forward(
        self,
        features: dict[str, torch.Tensor],
        return_backbone: bool = False,
        large: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        x = self.inputs(features, large)
        nets = self._tower_inputs(x)
        logits = torch.cat(
            [self._logit(name, net, x) for name, net in zip(self.towers, nets, strict=True)], dim=1
        )
        if len(self.affine_maps) > 0:
            logits = self._affine(logits)
        probabilities = torch.sigmoid(logits)
        out = {
            "logits": logits,
            "probabilities": probabilities,
            "calibrated_probabilities": calibrate(probabilities, self.calibration_ratios),
        }
        if return_backbone:
            out["backbone"] = nets[0] if self.experts is None else torch.stack(nets, dim=1)
        return out

    def _tower_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What each task's tower reads, in task order."""
        if self.experts is not None:
            return self.experts(x)
        net = x
        if self.backbone is not None:
            net = self.backbone(x)
            if self.share_partial:
                net = torch.cat([x, net], dim=1)
        return [net] * len(self.task_names)

    def _logit(self, name: str, net: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B, 1]: the tower's logit on its input `net`, plus its wide path's on the model's input `x`."""
        logit = self.towers[name](net)
        return logit + self.wide[name](x) if name in self.wide else logit

    def _affine(self, logits: torch.Tensor) -> torch.Tensor:
        columns = []
        for i, task in enumerate(self.task_names):
            column = logits[:, i : i + 1]
            name = module_name(task)
            columns.append(self.affine_maps[name](column) if name in self.affine_maps else column)
        return torch.cat(columns, dim=1)

    def ids_out_of_range(self) -> dict[str, int]:
        """Table name -> ids outside its range that training met since the process started (range tables)."""
        tables = {**self.large_embeddings, **self.small_embeddings}
        return {
            name: table.mapping.out_of_range
            for name, table in tables.items()
            if isinstance(table.mapping, RangeMapping)
        }

    def table_parameters(self) -> list[nn.Parameter]:
        """The weights of the id embedding tables (large and small), which optimizer.embedding trains."""
        tables = [*self.large_embeddings.values(), *self.small_embeddings.values()]
        return [table.embedding.weight for table in tables]

    def tower_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Task name -> the parameters of its tower, affine map and wide path; every other parameter is
        shared."""
        out = {}
        for task in self.task_names:
            name = module_name(task)
            params = list(self.towers[name].parameters())
            for extra in (self.affine_maps, self.wide):
                if name in extra:
                    params += list(extra[name].parameters())
            out[task] = params
        return out


def build_model(
    model: ModelConfig,
    feature_specs: Mapping[str, Spec],
    label_rates: Mapping[str, TaskData] | None = None,
    *,
    matmul: Matmul = DEFAULT_MATMUL,
    allocate_large_tables: bool = True,
) -> Ranker:
    """The ranker `model` describes, reading features of these per-example specs (the training data's:
    data.columns.feature_specs; only the shapes matter). No file is read: the specs may come from anywhere.
    `label_rates`: the rates the training data kept each task's positives and negatives at (its `tasks`),
    which the calibrated probabilities undo; None: every example was kept.
    `matmul` is where the dense layers' products run on CPU (model.linear): the same parameters and
    checkpoints either way; "onednn" needs a torch with oneDNN's linear kernel.
    `allocate_large_tables` False builds the large tables without their rows (LargeEmbedding's `allocate`):
    train/sharding.py allocates them as shards."""
    input_shapes = {name: spec.shape for name, spec in feature_specs.items()}
    task_names = list(model.tasks)
    _check_module_names([(f"model.tasks.{task}", task) for task in task_names])
    _check_module_names(_table_names(model))
    featurizer = build_featurizer(model.featurization_config, input_shapes)
    large, small, twhin, position = _embeddings(model, input_shapes, allocate_large_tables)
    widths = [featurizer.out_features] + [m.out_features for m in (*large.values(), *small.values())]
    widths += [input_shapes[name][-1] for name in twhin]
    if position is not None:
        widths.append(position.out_features)
    in_features, vectors = input_layout(widths)

    backbone, experts = None, None
    tower_in, tower_vectors = in_features, vectors
    if model.experts is not None:  # mmoe or ple
        build = partial(build_architecture, matmul=matmul)
        try:
            experts = build_experts(
                model.multi_task_type,
                model.experts,
                [module_name(t) for t in task_names],
                in_features,
                vectors,
                build,
                matmul=matmul,
            )
        except LayerTooLarge as e:  # a gate's (an expert's names its own path)
            raise UserError(f"model.experts.gate_mlp: {e}") from None
        tower_in, tower_vectors = experts.out_features, []
    elif model.multi_task_type != MultiTaskType.SHARE_NONE:
        assert model.backbone is not None  # the config requires one when sharing
        backbone = build_architecture(model.backbone, in_features, vectors, "model.backbone", matmul)
        if model.multi_task_type == MultiTaskType.SHARE_ALL:
            tower_in, tower_vectors = backbone.out_features, []
        else:
            tower_in = in_features + backbone.out_features

    towers, affine_maps, wide = {}, {}, {}
    for task, task_model in model.tasks.items():
        tower = build_architecture(task_model, tower_in, tower_vectors, f"model.tasks.{task}", matmul)
        if tower.out_features != 1:
            raise UserError(
                f"model.tasks.{task}: the tower must end in one output (a logit), not {tower.out_features}"
            )
        towers[module_name(task)] = tower
        if task_model.affine_map is not None:
            affine_maps[module_name(task)] = _affine_map(
                task_model.affine_map.scale, task_model.affine_map.bias
            )
        if task_model.wide:
            wide[module_name(task)] = _wide_path(in_features)
    if label_rates is None:
        ratios = torch.ones(len(task_names))
    else:
        ratios = downsampling_ratios(label_rates, task_names)
    return Ranker(
        task_names,
        featurizer,
        large,
        small,
        twhin,
        position,
        backbone,
        model.multi_task_type,
        experts,
        towers,
        affine_maps,
        ratios,
        wide,
    )


def input_layout(widths: list[int]) -> tuple[int, list[Slice]]:
    """Total width and the (first column, width) of each embedding block: every block after the first
    (the featurized dense features) is an embedding vector for DLRM's interactions."""
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return sum(widths), list(zip(starts[1:], widths[1:], strict=True))


def build_architecture(
    task: ArchitectureConfig, in_features: int, vector_slices: list[Slice], where: str, matmul: Matmul
) -> nn.Module:
    """The one architecture a backbone, tower or expert config names; `where` is its config path, for
    errors."""
    try:
        if task.mlp_config is not None:
            return build_mlp(in_features, task.mlp_config, matmul=matmul)
        if task.mask_net_config is not None:
            return build_mask_net(
                in_features, task.mask_net_config, f"{where}.mask_net_config", matmul=matmul
            )
        if task.dcn_config is not None:
            return build_dcn(in_features, task.dcn_config, matmul=matmul)
        assert task.dlrm_config is not None  # the config allows exactly one architecture
        return build_dlrm(in_features, task.dlrm_config, vector_slices, f"{where}.dlrm_config", matmul=matmul)
    except LayerTooLarge as e:
        raise UserError(f"{where}: {e}") from None


def _affine_map(scale: float, bias: float) -> nn.Linear:
    # A Linear(1, 1) as in the reference: trainable, starting at the configured scale and bias.
    layer = nn.Linear(1, 1)
    with torch.no_grad():
        layer.weight.fill_(scale)
        layer.bias.fill_(bias)
    return layer


def _wide_path(in_features: int) -> nn.Linear:
    # No bias (the tower's last layer has one); zero weights, so the model starts as the deep one alone, and
    # no random draws (skip_init), so every other layer is initialised as without it.
    layer = nn.utils.skip_init(nn.Linear, in_features, 1, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


def _embeddings(
    model: ModelConfig, input_shapes: dict[str, tuple[int, ...]], allocate_large: bool
) -> tuple[
    dict[str, LargeEmbedding], dict[str, SmallEmbedding], dict[str, nn.LayerNorm], PositionDebias | None
]:
    large = {}
    for i, t in enumerate(model.large_embeddings.tables if model.large_embeddings else []):
        feature = t.feature_name or t.name
        if feature not in input_shapes:
            raise UserError(
                f"model.large_embeddings.tables[{i}] ({t.name}): no id feature {feature!r} in train_data "
                f"(it has {', '.join(input_shapes)})"
            )
        mapping = build_id_mapping(t, t.padding_id)
        mean = t.combiner == Combiner.MEAN
        large[module_name(t.name)] = LargeEmbedding(
            t.num_embeddings, t.embedding_dim, feature, mapping, mean, allocate_large
        )

    discrete = input_shapes.get("discrete")
    small = {}
    for i, t in enumerate(model.small_embeddings.tables if model.small_embeddings else []):
        _check_column(discrete, t.index, f"model.small_embeddings.tables[{i}].index")
        mapping = build_id_mapping(t, None)
        mean = t.combiner == Combiner.MEAN
        small[module_name(t.name)] = SmallEmbedding(t.num_embeddings, t.embedding_dim, t.index, mapping, mean)

    twhin = {name: nn.LayerNorm(input_shapes[name][-1]) for name in TWHIN_FEATURES if name in input_shapes}

    position = None
    if (p := model.position_debias_config) is not None:
        _check_column(
            discrete, p.position_feature_index, "model.position_debias_config.position_feature_index"
        )
        position = PositionDebias(p.max_position, p.num_dims, p.drop_probability, p.position_feature_index)
    return large, small, twhin, position


def _table_names(model: ModelConfig) -> list[tuple[str, str]]:
    """(config path, name) of every embedding table, large then small."""
    named = []
    for section, tables in (("large", model.large_embeddings), ("small", model.small_embeddings)):
        for i, table in enumerate(tables.tables if tables else []):
            named.append((f"model.{section}_embeddings.tables[{i}]", table.name))
    return named


def _check_module_names(named: list[tuple[str, str]]) -> None:
    """Each (config path, name) must have a module name of its own: two tasks or tables under one name would
    be one module, the other silently dropped (a table) or a tower short (a task)."""
    first: dict[str, str] = {}
    for where, name in named:
        other = first.setdefault(module_name(name), where)
        if other != where:
            raise UserError(
                f"{where}: the name {name!r} is also {other}'s (as module names, '.' and '__' are the same); "
                "give each its own"
            )


def _check_column(discrete: tuple[int, ...] | None, index: int, where: str) -> None:
    if discrete is None:
        raise UserError(f"{where}: train_data has no `discrete` feature to read column {index} of")
    if index >= discrete[-1]:
        raise UserError(f"{where}: column {index} is outside the discrete tensor ({discrete[-1]} columns)")
