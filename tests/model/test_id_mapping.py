"""id_mapping: range tables count the ids they skip, hash tables hash any int64 id as the formula says,
managed tables admit after min_count sightings and evict by lru or lfu (traced by hand below)."""

import pytest
import torch

from heavyranker.config import dump_config, load_config
from heavyranker.config.embeddings import Eviction
from heavyranker.errors import UserError
from heavyranker.model.embeddings import LargeEmbedding, SmallEmbedding
from heavyranker.model.id_managed import ManagedMapping
from heavyranker.model.id_mapping import HASH_PRIME, HashMapping, RangeMapping
from tests.conftest import CONFIGS

EXTREME_IDS = [0, 1, -1, -2, 7, 2**21, 2**42 + 5, 1_234_567_890_123, -987_654_321, 2**63 - 1, -(2**63)]


def reference_hash(x: int, a0: int, a1: int, a2: int, b: int, rows: int) -> int:
    """docs/id-embeddings.md's formula on Python's unbounded integers (>> is arithmetic on negatives)."""
    c0, c1, c2 = x & (2**21 - 1), (x >> 21) & (2**21 - 1), (x >> 42) + 2**21
    return ((a0 * c0 + a1 * c1 + a2 * c2 + b) % (2**31 - 1)) % rows


def test_range_tables_count_the_ids_outside_them_in_training_only():
    large = LargeEmbedding(num_embeddings=4, embedding_dim=2, feature_name="ids")
    # -1 is padding (not counted); 4, -3 and 2**40 are outside [0, 4)
    large(torch.tensor([[0, 3, -1], [4, -3, 2**40], [-1, -1, -1]]))
    assert large.mapping.out_of_range == 3
    large.eval()(torch.tensor([[9, 9, 9]]))
    assert large.mapping.out_of_range == 3
    small = SmallEmbedding(num_embeddings=5, embedding_dim=2, column=1)
    small(torch.tensor([[7, 0], [7, 5], [7, -1], [7, 4]]))  # no padding in a column: 5 and -1 count
    assert small.mapping.out_of_range == 2


def test_hash_rows_match_the_formula_for_ids_of_every_sign_and_size():
    mapping = HashMapping(num_embeddings=1000, num_hashes=3, padding_id=-1)
    coefficients = mapping.coefficients.tolist()
    assert all(1 <= a < HASH_PRIME for row in coefficients for a in row[:3])
    assert len({tuple(row) for row in coefficients}) == 3  # three different functions
    rows, valid = mapping(torch.tensor([EXTREME_IDS]))
    expected = [[reference_hash(x, *c, 1000) for c in coefficients] for x in EXTREME_IDS]
    assert rows[0].tolist() == expected
    assert valid[0].tolist() == [x != -1 for x in EXTREME_IDS]


def test_hashed_table_sums_or_averages_an_ids_vectors_and_means_over_ids():
    ids = torch.tensor([[10**15, -5, -1], [-1, -1, -1]])
    for mean in (False, True):
        mapping = HashMapping(num_embeddings=50, num_hashes=2, padding_id=-1)
        table = LargeEmbedding(50, 3, "ids", mapping, mean=mean)
        weight = table.embedding.weight
        rows, _ = mapping(ids)
        per_id = [weight[rows[0, i]].sum(dim=0) / (2 if mean else 1) for i in (0, 1)]
        out = table(ids)
        torch.testing.assert_close(out[0], (per_id[0] + per_id[1]) / 2)
        torch.testing.assert_close(out[1], torch.zeros(3))  # only padding: zeros


def test_managed_admits_after_min_count_and_evicts_the_least_recently_seen():
    m = ManagedMapping(4, min_count=2, eviction=Eviction.LRU, padding_id=-1)  # rows 1..3 for ids
    trace = [
        ([10, 20, -1], [0, 0, 0], {}),  # 10 and 20 seen once: default row
        ([10, 30, 30], [1, 2, 2], {10: 1, 30: 2}),  # 10 twice in all, 30 twice here: admitted, id order
        ([20, 40, 40], [3, 1, 1], {20: 3, 30: 2, 40: 1}),  # 20 takes free row 3, 40 evicts 10 (row 1 < 2)
        ([50, 50, 10], [2, 2, 0], {20: 3, 40: 1, 50: 2}),  # 50 evicts 30 (seen at batch 2); 10 starts over
    ]
    for ids, rows, resident in trace:
        got, valid = m(torch.tensor([ids]))
        assert got[0, :, 0].tolist() == rows
        assert valid[0].tolist() == [i != -1 for i in ids]
        assert m.resident() == resident


def test_managed_lfu_evicts_the_least_often_seen():
    m = ManagedMapping(3, min_count=1, eviction=Eviction.LFU, padding_id=None)  # rows 1, 2
    m(torch.tensor([[5, 5, 5, 6]]))  # 5 (3 sightings) -> row 1, 6 (1) -> row 2
    m(torch.tensor([[6]]))  # 6 now has 2
    m(torch.tensor([[7]]))  # full: evicts 6 (2 < 3)
    assert m.resident() == {5: 1, 7: 2}
    m(torch.tensor([[8, 8, 8, 8]]))  # 7 has 1 sighting, 5 has 3: 7 goes
    assert m.resident() == {5: 1, 8: 2}


def test_managed_serves_unseen_ids_through_the_default_row_and_learns_nothing_in_eval():
    m = ManagedMapping(8, min_count=1, eviction=Eviction.LRU, padding_id=-1)
    m(torch.tensor([[-(2**63), 2**63 - 1, -7]]))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rows, _ = m.eval()(torch.tensor([[-7, 2**63 - 1, 123, -(2**63)]]))
    assert rows[0, :, 0].tolist() == [2, 3, 0, 1]  # admitted in id order (-2**63, -7, 2**63-1); 123 unseen
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_managed_state_dict_resumes_the_same_map():
    batches = [torch.randint(-50, 50, (16, 3)) for _ in range(12)]
    straight = ManagedMapping(20, min_count=2, eviction=Eviction.LFU, padding_id=-1)
    first = ManagedMapping(20, min_count=2, eviction=Eviction.LFU, padding_id=-1)
    for batch in batches[:6]:
        straight(batch)
        first(batch)
    resumed = ManagedMapping(20, min_count=2, eviction=Eviction.LFU, padding_id=-1)
    resumed.load_state_dict(first.state_dict())
    for batch in batches[6:]:
        assert torch.equal(straight(batch)[0], resumed(batch)[0])
    assert straight.resident() == resumed.resident() and len(resumed.resident()) == 19
    assert all(torch.equal(straight.state_dict()[k], v) for k, v in resumed.state_dict().items())


def test_small_tables_hash_or_manage_every_value_of_their_column():
    hashed = SmallEmbedding(5, 2, column=0, mapping=HashMapping(5, 1, None))
    assert hashed.embedding.weight.shape == (5, 2)  # no reserved row
    out = hashed(torch.tensor([[-1], [2**62]]))
    rows = hashed.mapping(torch.tensor([[-1], [2**62]]))[0][:, 0, 0]
    torch.testing.assert_close(out, hashed.embedding.weight[rows])
    assert isinstance(SmallEmbedding(5, 2, column=0).mapping, RangeMapping)


@pytest.mark.parametrize(
    "table, message",
    [
        (
            "{name: u, num_embeddings: 10, embedding_dim: 4, num_hashes: 2}",
            "num_hashes applies to id_mapping hash",
        ),
        (
            "{name: u, num_embeddings: 10, embedding_dim: 4, id_mapping: hash, min_count: 3}",
            "min_count applies to id_mapping managed, not hash",
        ),
        (
            "{name: u, num_embeddings: 1, embedding_dim: 4, id_mapping: managed}",
            "a managed table needs num_embeddings >= 2",
        ),
        ("{name: u, num_embeddings: 10, embedding_dim: 4, id_mapping: hashed}", "id_mapping"),
    ],
)
def test_mapping_keys_are_checked_with_one_line_errors(table, message):
    with pytest.raises(UserError) as error:
        load_config(CONFIGS / "local_small.yaml", [f"model.large_embeddings={{tables: [{table}]}}"])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_ids_config_loads_and_its_dump_loads_again(tmp_path):
    config = load_config(CONFIGS / "local_small_ids.yaml")
    [users, authors] = config.model.large_embeddings.tables
    assert (users.id_mapping, users.min_count, users.padding_id) == ("managed", 2, -1)
    assert authors.feature_name == "meta__author_id"
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_config(config))  # every field written out, the unread defaults too
    assert load_config(dumped).model == config.model


@pytest.mark.parametrize("mapping", ["hash", "managed"])
def test_all_padding_batches_train_to_zero_vectors_and_finite_gradients(mapping):
    if mapping == "hash":
        module = HashMapping(8, 2, padding_id=-1)
    else:
        module = ManagedMapping(8, 1, Eviction.LRU, padding_id=-1)
    table = LargeEmbedding(8, 3, "ids", module)
    out = table(torch.full((4, 5), -1))
    torch.testing.assert_close(out, torch.zeros(4, 3))
    out.sum().backward()
    assert torch.equal(table.embedding.weight.grad, torch.zeros(8, 3))
    if mapping == "managed":
        assert module.resident() == {} and int(module.tick) == 1
