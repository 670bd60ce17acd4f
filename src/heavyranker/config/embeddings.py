"""`model.large_embeddings` and `model.small_embeddings`: id embedding tables, and how raw ids become their
rows (docs/id-embeddings.md)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from .base import Count, NonNegative, StrictModel, Width

# An embedding table's rows x dims: 8 GiB of float32.
MAX_TABLE_ELEMENTS = 2**31


class IdMapping(StrEnum):
    RANGE = "range"
    HASH = "hash"
    MANAGED = "managed"


class Combiner(StrEnum):
    SUM = "sum"
    MEAN = "mean"


class Eviction(StrEnum):
    LRU = "lru"
    LFU = "lfu"


# The keys that only one id_mapping reads (docs/id-embeddings.md): another value than the default with
# another mapping is an error.
MAPPING_KEYS = {"num_hashes": IdMapping.HASH, "combiner": IdMapping.HASH}
MAPPING_KEYS |= {"min_count": IdMapping.MANAGED, "eviction": IdMapping.MANAGED}


class TableConfig(StrictModel):
    """What every embedding table has: a name, its size, and how raw ids become its rows."""

    name: str = Field(description="The table's name.")
    num_embeddings: Count = Field(description="Rows; an id outside the table maps to a reserved row.")
    embedding_dim: Width = Field(description="Dimensions per row.")
    id_mapping: IdMapping = Field(
        IdMapping.RANGE,
        description="range: ids are rows (others are counted and skipped); hash: k seeded hashes of any "
        "int64 id; managed: a collision-free id -> row map with admission and eviction.",
    )
    num_hashes: Count = Field(1, le=8, description="hash: hash functions per id (at most 8).")
    combiner: Combiner = Field(Combiner.SUM, description="hash: how an id's num_hashes vectors combine.")
    min_count: Count = Field(
        1, description="managed: sightings before an id gets its own row; until then it shares row 0."
    )
    eviction: Eviction = Field(
        Eviction.LRU, description="managed: which id leaves a full table: least recently or least often seen."
    )

    @model_validator(mode="after")
    def _fits(self) -> TableConfig:
        elements = self.num_embeddings * self.embedding_dim
        if elements > MAX_TABLE_ELEMENTS:
            raise PydanticCustomError(
                "table_size",
                "num_embeddings x embedding_dim = {n} elements; at most 2**31 ({max}, 8 GiB of float32)",
                {"n": f"{elements:,}", "max": f"{MAX_TABLE_ELEMENTS:,}"},
            )
        for key, mapping in MAPPING_KEYS.items():
            # A default value passes: a dumped config (every field written out) loads again.
            unread = getattr(self, key) != type(self).model_fields[key].default
            if unread and self.id_mapping != mapping:
                raise PydanticCustomError(
                    "id_mapping",
                    "{key} applies to id_mapping {mapping}, not {this}",
                    {"key": key, "mapping": mapping.value, "this": self.id_mapping.value},
                )
        if self.id_mapping == IdMapping.MANAGED and self.num_embeddings < 2:
            raise PydanticCustomError(
                "id_mapping",
                "a managed table needs num_embeddings >= 2 (row 0 is the shared default row)",
                {},
            )
        return self


class EmbeddingTableConfig(TableConfig):
    """A large table (EmbeddingBag, mean pooling) over a variable-length id feature of the batch."""

    feature_name: str | None = Field(
        None, description="Batch feature holding the ids; default: the table name."
    )
    padding_id: StrictInt | None = Field(
        -1,
        ge=-(2**63),
        le=2**63 - 1,
        description="The id that fills unused places of an id list: skipped by every id_mapping; "
        "null: every value is an id.",
    )


class LargeEmbeddingsConfig(StrictModel):
    """Embedding tables over variable-length id features."""

    tables: list[EmbeddingTableConfig] = Field(min_length=1, description="The tables.")


class SmallEmbeddingTableConfig(TableConfig):
    """A table over one column (`index`) of the discrete tensor."""

    index: NonNegative = Field(description="Column of the discrete tensor.")


class SmallEmbeddingsConfig(StrictModel):
    """Embedding tables over columns of the discrete tensor."""

    tables: list[SmallEmbeddingTableConfig] = Field(min_length=1, description="The tables.")
