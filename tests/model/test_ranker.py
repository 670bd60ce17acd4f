from pathlib import Path

import pytest
import torch

from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.data.shapes import feature_shapes
from heavyranker.errors import UserError
from heavyranker.model import build_model, module_name
from heavyranker.model.linear import HAS_ONEDNN, Linear
from heavyranker.model.summary import print_summary

TASKS = [
    "recap.engagement.is_favorited",
    "recap.engagement.is_good_clicked_convo_desc_favorited_or_replied",
    "recap.engagement.is_good_clicked_convo_desc_v2",
    "recap.engagement.is_negative_feedback_v2",
    "recap.engagement.is_profile_clicked_and_profile_engaged",
    "recap.engagement.is_replied",
    "recap.engagement.is_replied_reply_engaged_by_author",
    "recap.engagement.is_report_tweet_clicked",
    "recap.engagement.is_retweeted",
    "recap.engagement.is_video_playback_50",
]
# local_small: continuous 48 + binary 16, then three 16-wide TwHIN embeddings
SMALL_INPUT = 48 + 16 + 3 * 16


# is_replied's negatives kept at 1%, its positives at 50%: r = 0.02
REPLIED_RATES = (
    "train_data.tasks.recap.engagement.is_replied={pos_downsampling_rate: 0.5, neg_downsampling_rate: 0.01}"
)


def _config(path, *overrides):
    return load_config(path, list(overrides))


def _build(config):
    torch.manual_seed(0)
    return build_model(config.model, feature_specs(config.train_data), config.train_data.tasks)


def _features(config, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in feature_shapes(config.train_data).items():
        size = (batch, *shape)
        if name in ("discrete",) or name.startswith("meta__"):
            out[name] = torch.randint(0, 50, size, generator=gen)
        elif name == "binary":
            out[name] = torch.randint(0, 2, size, generator=gen).float()
        else:
            out[name] = torch.randn(size, generator=gen) * 3
    return out


def test_seed_config_parameter_shapes():
    config = _config(Path(__file__).resolve().parents[2] / "configs" / "local_prod.yaml")
    model = _build(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    # input: 2117 continuous + 59 binary (featurized) + 3 x 200 TwHIN = 2776
    backbone = {}
    for k in range(4):
        block = f"backbone.mask_blocks.{k}"
        backbone |= {
            f"{block}.mask_layer.0.weight": (1024, 2776),
            f"{block}.mask_layer.0.bias": (1024,),
            f"{block}.mask_layer.2.weight": (2776, 1024),
            f"{block}.mask_layer.2.bias": (2776,),
            f"{block}.hidden_layer.weight": (1024, 2776),
            f"{block}.hidden_layer.bias": (1024,),
            f"{block}.layer_norm.weight": (1024,),
            f"{block}.layer_norm.bias": (1024,),
        }
    backbone |= {"backbone.mlp.layers.0.weight": (2048, 4096), "backbone.mlp.layers.0.bias": (2048,)}
    inputs = {
        "featurizer.transform.2.weight": (2117,),
        "featurizer.transform.2.bias": (2117,),
        "featurizer.layer_norm.weight": (2176,),
        "featurizer.layer_norm.bias": (2176,),
    }
    for name in ("user_embedding", "user_eng_embedding", "author_embedding"):
        inputs |= {f"twhin_norms.{name}.weight": (200,), f"twhin_norms.{name}.bias": (200,)}
    fav = "towers.recap__engagement__is_favorited.layers"
    tower = {
        f"{fav}.0.weight": (256, 2048),
        f"{fav}.0.bias": (256,),
        f"{fav}.3.weight": (128, 256),
        f"{fav}.3.bias": (128,),
        f"{fav}.6.weight": (1, 128),
        f"{fav}.6.bias": (1,),
    }
    assert {n: s for n, s in shapes.items() if not n.startswith("towers.")} == inputs | backbone
    assert {n: s for n, s in shapes.items() if n.startswith(fav)} == tower
    # a tower with dropout has the dropout in its layer list, as the reference: Linear, BN, ReLU, Dropout, ...
    neg = "towers.recap__engagement__is_negative_feedback_v2.layers"
    assert [n for n in shapes if n.startswith(neg)] == [
        f"{neg}.{i}.{p}" for i in (0, 4, 8) for p in ("weight", "bias")
    ]
    # tower batch norms are not affine: running statistics only
    buffers = {n: tuple(b.shape) for n, b in model.named_buffers() if n.startswith(fav)}
    assert buffers == {
        f"{fav}.1.running_mean": (256,),
        f"{fav}.1.running_var": (256,),
        f"{fav}.1.num_batches_tracked": (),
        f"{fav}.4.running_mean": (128,),
        f"{fav}.4.running_var": (128,),
        f"{fav}.4.num_batches_tracked": (),
    }
    assert len([n for n in shapes if n.startswith("towers.")]) == 10 * 6
    assert sum(p.numel() for p in model.parameters()) == 48_115_108


def test_outputs_in_task_order_with_probabilities(small_config_path):
    config = _config(small_config_path)
    model = _build(config)
    assert model.task_names == TASKS
    out = model(_features(config, batch=5), return_backbone=True)
    assert set(out) == {"logits", "probabilities", "calibrated_probabilities", "backbone"}
    for key in ("logits", "probabilities", "calibrated_probabilities"):
        assert out[key].shape == (5, 10)
    torch.testing.assert_close(out["probabilities"], torch.sigmoid(out["logits"]))
    torch.testing.assert_close(out["calibrated_probabilities"], out["probabilities"])  # rates are all 1
    assert out["backbone"].shape == (5, 128)
    assert "backbone" not in model(_features(config, batch=5))


@pytest.mark.parametrize(
    ("sharing", "tower_in"),
    [("share_all", 128), ("share_partial", SMALL_INPUT + 128), ("share_none", SMALL_INPUT)],
)
def test_sharing_modes_input_widths(small_config_path, sharing, tower_in):
    overrides = [f"model.multi_task_type={sharing}"] + (
        ["model.backbone=null"] if sharing == "share_none" else []
    )
    config = _config(small_config_path, *overrides)
    model = _build(config)
    if sharing == "share_none":
        assert model.backbone is None
    else:
        assert model.backbone.mask_blocks[0].hidden_layer.in_features == SMALL_INPUT
    for tower in model.towers.values():
        assert tower.layers[0].in_features == tower_in
    out = model(_features(config), return_backbone=True)
    assert out["backbone"].shape == (8, tower_in) and out["logits"].shape == (8, 10)


def test_calibrated_probabilities_use_each_tasks_rates(small_config_path):
    config = _config(
        small_config_path,
        REPLIED_RATES,
    )
    out = _build(config).eval()(_features(config))
    p, q = out["probabilities"], out["calibrated_probabilities"]
    replied = TASKS.index("recap.engagement.is_replied")
    torch.testing.assert_close(
        q[:, replied], p[:, replied] * 0.02 / (1 - p[:, replied] + 0.02 * p[:, replied])
    )
    others = [i for i in range(10) if i != replied]
    torch.testing.assert_close(q[:, others], p[:, others])


def test_affine_map_scales_the_logit(small_config_path):
    task = "recap.engagement.is_retweeted"
    config = _config(small_config_path, f"model.tasks.{task}.affine_map={{scale: 2.0, bias: -1.0}}")
    model = _build(config).eval()
    out = model(_features(config), return_backbone=True)
    raw = model.towers[module_name(task)](out["backbone"])[:, 0]
    torch.testing.assert_close(out["logits"][:, TASKS.index(task)], 2.0 * raw - 1.0)
    affine = model.affine_maps[module_name(task)]
    assert {id(affine.weight), id(affine.bias)} <= {id(p) for p in model.tower_parameters()[task]}


def test_tower_parameters_partition(small_config_path):
    model = _build(_config(small_config_path))
    towers = model.tower_parameters()
    assert list(towers) == TASKS
    by_id = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for task, params in towers.items():
        names = {by_id[id(p)] for p in params}
        assert names == {n for n in by_id.values() if n.startswith(f"towers.{module_name(task)}.")}
        assert not seen & names
        seen |= names
    rest = set(by_id.values()) - seen
    assert rest and all(n.startswith(("featurizer.", "twhin_norms.", "backbone.")) for n in rest)


def test_embeddings_and_dlrm_towers_read_the_input_layout(small_config_path):
    """share_none with DLRM towers: the small embedding, the three TwHIN vectors (all 16 wide) and the
    position embedding are the vectors the bottom MLP's output is dotted with."""
    overrides = [
        "model.multi_task_type=share_none",
        "model.backbone=null",
        "model.small_embeddings={tables: [{name: a.b, num_embeddings: 10, embedding_dim: 16, index: 3}]}",
        "model.position_debias_config={max_position: 8, num_dims: 16, position_feature_index: 0}",
    ]
    dlrm = "{bottom_mlp: {layer_sizes: [16]}, top_mlp: {layer_sizes: [1]}}"
    for task in TASKS:
        overrides += [f"model.tasks.{task}.mlp_config=null", f"model.tasks.{task}.dlrm_config={dlrm}"]
    config = _config(small_config_path, *overrides)
    model = _build(config)
    tower = model.towers[module_name(TASKS[0])]
    width = SMALL_INPUT + 16 + 16
    assert tower.vector_slices == [(64, 16), (80, 16), (96, 16), (112, 16), (128, 16)]
    assert tower.dense_slices == [(0, 64)] and tower.bottom_mlp.layers[0].in_features == 64
    assert tower.top_mlp.layers[0].in_features == 16 + 6 * 5 // 2
    assert model.small_embeddings["a__b"].embedding.weight.shape == (11, 16)
    features = _features(config)
    assert model.inputs(features).shape == (8, width)
    model.train()
    train = model(features)["logits"]
    model.eval()
    assert train.shape == model(features)["logits"].shape == (8, 10)


@pytest.mark.parametrize(
    "matmul",
    ["aten", pytest.param("onednn", marks=pytest.mark.skipif(not HAS_ONEDNN, reason="no oneDNN kernel"))],
)
def test_matmul_reaches_every_dense_layer(small_config_path, matmul):
    """local_small's MaskNet backbone (2 blocks of 3 layers, an MLP of 1) and MLP towers (3 layers), with one
    DCN tower (a projected cross layer: 2, an output MLP: 1) and one DLRM tower (bottom and top MLPs: 2)."""
    dcn = "{poly_degree: 1, projection_dim: 8, output_mlp: {layer_sizes: [1]}}"
    dlrm = "{bottom_mlp: {layer_sizes: [4]}, top_mlp: {layer_sizes: [1]}}"
    config = _config(
        small_config_path,
        f"model.tasks.{TASKS[0]}.mlp_config=null",
        f"model.tasks.{TASKS[0]}.dcn_config={dcn}",
        f"model.tasks.{TASKS[1]}.mlp_config=null",
        f"model.tasks.{TASKS[1]}.dlrm_config={dlrm}",
    )
    torch.manual_seed(0)
    specs = feature_specs(config.train_data)
    model = build_model(config.model, specs, config.train_data.tasks, matmul=matmul)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 2 * 3 + 1 + 8 * 3 + 3 + 2
    assert all(type(layer) is Linear and layer.matmul == matmul for layer in layers)
    # the same parameters, under the same names, whichever the backend
    default = _build(config).state_dict()
    assert model.state_dict().keys() == default.keys()
    assert all(torch.equal(tensor, default[name]) for name, tensor in model.state_dict().items())


def test_build_errors_name_the_field(small_config_path):
    task = TASKS[2]
    config = _config(small_config_path, f"model.tasks.{task}.mlp_config.layer_sizes=[4, 2]")
    with pytest.raises(UserError, match=rf"model.tasks.{task}: the tower must end in one output.*not 2"):
        _build(config)
    config = _config(small_config_path, "model.position_debias_config={position_feature_index: 8}")
    with pytest.raises(
        UserError, match=r"position_feature_index: column 8 is outside the discrete tensor \(8"
    ):
        _build(config)
    config = _config(
        small_config_path,
        "model.large_embeddings={tables: [{name: ids, num_embeddings: 5, embedding_dim: 4}]}",
    )
    with pytest.raises(UserError, match=r"large_embeddings.tables\[0\] \(ids\): no id feature 'ids'"):
        _build(config)


def test_large_embedding_reads_its_feature(small_config_path):
    config = _config(
        small_config_path,
        "model.large_embeddings={tables: [{name: authors, num_embeddings: 100, "
        "embedding_dim: 4, feature_name: meta__author_id}]}",
    )
    model = _build(config)
    features = _features(config)
    table = model.large_embeddings["authors"]
    x = model.inputs(features)
    torch.testing.assert_close(x[:, 64:68], table.embedding.weight[features["meta__author_id"]])


def test_torch_export_matches_eager(small_config_path):
    config = _config(small_config_path)
    model = _build(config)
    model(_features(config, batch=16))  # move the batch-norm statistics off their initial values
    model.eval()
    example = _features(config, batch=4)
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(
        model, (example,), dynamic_shapes={"features": {k: {0: batch} for k in example}}
    )
    features = _features(config, batch=9, seed=1)
    got, want = exported.module()(features), model(features)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_summary_prints_each_module_and_the_total(small_config_path, capsys):
    config = _config(small_config_path)
    print_summary(config.model, feature_specs(config.train_data))
    lines = capsys.readouterr().out.splitlines()
    total = sum(p.numel() for p in _build(config).parameters())
    assert lines[-1].split() == ["total", f"{total:,}"]
    assert any(line.split()[:2] == ["backbone", "(MaskNet)"] for line in lines)
    tower = next(line for line in lines if "recap__engagement__is_favorited (Mlp)" in line)
    assert tower.split()[-1] == f"{128 * 64 + 64 + 64 * 32 + 32 + 32 * 1 + 1:,}"
    assert sum("(MaskBlock)" in line for line in lines) == 2


def test_a_model_builds_from_specs_alone(tmp_path, monkeypatch):
    """build_model takes its section and the feature specs, which may come from anywhere: no config file, no
    schema file. Widths and calibration follow from the specs and the label rates given here."""
    from heavyranker.config.data import TaskData
    from heavyranker.config.model import ModelConfig
    from heavyranker.data.batch import Spec
    from heavyranker.model.calibration import calibrate

    monkeypatch.chdir(tmp_path)  # an empty folder: nothing to read even by a relative path
    model_config = ModelConfig.model_validate(
        {
            "featurization_config": {"log1p_abs_config": {}, "feature_names_to_concat": ["binary"]},
            "tasks": {
                "a": {"mlp_config": {"layer_sizes": [5, 1]}},
                "b": {"mlp_config": {"layer_sizes": [1]}},
            },
        }
    )
    specs = {"continuous": Spec((4,), torch.float32), "binary": Spec((3,), torch.float32)}
    rates = {"a": TaskData(), "b": TaskData(pos_downsampling_rate=0.5, neg_downsampling_rate=0.01)}
    model = build_model(model_config, specs, rates)

    assert model.task_names == ["a", "b"]
    assert model.towers["a"].layers[0].in_features == 4 + 3  # continuous, then the concatenated binary
    features = {"continuous": torch.randn(6, 4), "binary": torch.ones(6, 3)}
    out = model.eval()(features)
    assert out["logits"].shape == (6, 2)
    ratios = torch.tensor([1.0, 0.01 / 0.5])
    torch.testing.assert_close(out["calibrated_probabilities"], calibrate(out["probabilities"], ratios))
    uncalibrated = build_model(model_config, specs).eval()  # no label rates: every example was kept
    uncalibrated.load_state_dict(model.state_dict())
    torch.testing.assert_close(uncalibrated(features)["calibrated_probabilities"], out["probabilities"])


ONE_LAYER = {"mlp_config": {"layer_sizes": [1]}}


def _table(name, index):
    return {"name": name, "num_embeddings": 5, "embedding_dim": 2, "index": index}


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"tasks": {"a.b": ONE_LAYER, "a__b": ONE_LAYER}},
            r"model.tasks.a__b: the name 'a__b' is also model.tasks.a.b's",
        ),
        (
            {"small_embeddings": {"tables": [_table("x", 0), _table("x", 1)]}},
            r"model.small_embeddings.tables\[1\]: the name 'x' is also model.small_embeddings.tables\[0\]'s",
        ),
        (
            {
                "large_embeddings": {
                    "tables": [
                        {"name": "v.w", "feature_name": "ids", "num_embeddings": 5, "embedding_dim": 2}
                    ]
                },
                "small_embeddings": {"tables": [_table("v__w", 0)]},
            },
            r"small_embeddings.tables\[0\]: the name 'v__w' is also model.large_embeddings.tables\[0\]'s",
        ),
    ],
)
def test_two_tasks_or_tables_under_one_module_name_are_refused(sections, message):
    """Before: a second table of a name silently replaced the first (one table fewer, no error), and two
    tasks under one module name failed at the first batch with zip()'s ValueError."""
    from heavyranker.config.model import ModelConfig
    from heavyranker.data.batch import Spec

    config = ModelConfig.model_validate(
        {"featurization_config": {"log1p_abs_config": {}}, "tasks": {"a": ONE_LAYER}, **sections}
    )
    specs = {
        "continuous": Spec((4,), torch.float32),
        "binary": Spec((3,), torch.float32),
        "discrete": Spec((2,), torch.int64),
        "ids": Spec((3,), torch.int64),
    }
    with pytest.raises(UserError, match=message):
        build_model(config, specs)


def _spec_model(continuous, featurization, task, **sections):
    """A model of one task on `continuous` features alone, built from specs (no data, no file)."""
    from heavyranker.config.model import ModelConfig
    from heavyranker.data.batch import Spec

    featurization = {**featurization, "feature_names_to_concat": []}
    config = ModelConfig.model_validate(
        {"featurization_config": featurization, "tasks": {"a": task}, **sections}
    )
    return build_model(config, {"continuous": Spec((continuous,), torch.float32)})


LOG = {"log1p_abs_config": {}}
WIDE_MASK_NET = {"mask_blocks": [{"output_size": 1, "reduction_factor": 16, "input_layer_norm": False}]}
WIDE_GATE = {"num_experts": 2, "expert": ONE_LAYER, "gate_mlp": {"layer_sizes": [2**15]}}


@pytest.mark.parametrize(
    ("continuous", "featurization", "task", "sections", "message"),
    [
        (
            2**24,
            LOG,
            {"dcn_config": {"poly_degree": 1, "output_mlp": {"layer_sizes": [1]}}},
            {},
            r"^model.tasks.a: a dense layer of 16,777,216 inputs x 16,777,216 units would hold "
            r"281,474,976,710,656 weights, over 2\*\*30",
        ),
        (
            2**14,
            LOG,
            {"mask_net_config": WIDE_MASK_NET},
            {},
            r"^model.tasks.a: a dense layer of 16,384 inputs x 262,144",
        ),
        (
            2**20,
            LOG,
            ONE_LAYER,
            {"multi_task_type": "mmoe", "experts": WIDE_GATE},
            r"^model.experts.gate_mlp: a dense layer of 1,048,576 inputs x 32,768 units",
        ),
        (
            2117,
            {"periodic_config": {"n_frequencies": 256, "embedding_dim": 2**15}},
            ONE_LAYER,
            {},
            r"^model.featurization_config.periodic_config: 2,117 features x 2 x 256 frequencies x 32768 "
            r"dimensions would be 35,517,366,272 weights",
        ),
    ],
)
def test_a_layer_beyond_2_30_weights_from_a_derived_width_is_refused_before_it_is_allocated(
    continuous, featurization, task, sections, message
):
    """The config bounds each width it names (2**15), so a layer holds at most 2**30 weights; widths from
    elsewhere (the input's, a MaskNet's aggregation from reduction_factor, the periodic encoding's layers)
    were not bounded: torch's allocator failed with a RuntimeError traceback (these sizes, all over 23 GiB),
    or a size the machine could just commit took all its memory. Now each names its config path."""
    with pytest.raises(UserError, match=message):
        _spec_model(continuous, featurization, task, **sections)


def test_a_layer_of_2_30_weights_is_allowed():
    from heavyranker.model.linear import MAX_LAYER_WEIGHTS, Linear

    assert MAX_LAYER_WEIGHTS == 2**30
    with torch.device("meta"):  # the bound is checked before the allocation: none needed to see it pass
        assert Linear(2**15, 2**15).weight.shape == (2**15, 2**15)


@pytest.mark.parametrize("config_name", ["local_small.yaml", "local_small_ids.yaml"])
def test_a_batch_of_no_rows_scores_to_no_rows(config_name):
    """Before: the featurizer's and the large tables' reshape(B, -1) could not resolve -1 for B = 0, a
    RuntimeError; the dense layers already took an empty batch (model/linear.py)."""
    config = _config(Path(__file__).resolve().parents[2] / "configs" / config_name)
    model = _build(config).eval()
    out = model(_features(config, batch=0))
    assert out["calibrated_probabilities"].shape == (0, len(config.model.tasks))
