"""A data config's columns: what to decode from each record, how the decoded columns become Rows and then
a Batch, and the Spec of every feature of that Batch (for data/shapes.py, without reading any data).

The schema facts this relies on (every name is in the schema, a label is one value, no feature is a
bytes_list, mantissa masks name float features read) are config-time checks: config/root.py cross_check."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import torch

from ..config.data import DataConfig
from ..errors import DataError
from ..schema import FeatureSpec
from .batch import Batch, Rows, Spec
from .damage import Damage
from .order import Item
from .preprocess import Preprocessor, build_preprocessors
from .sources import Decoder, Format

FLAGS = "binary"  # 0/1 flags, int64 in the schema; the model takes them as float32 (or as downcast says)


def feature_sources(data: DataConfig) -> dict[str, str]:
    """Feature name as the batch holds it -> its name in the schema: the renamed features, then those read
    under their own names."""
    schema = data.seg_dense_schema
    return {**schema.renamed_features, **{name: name for name in schema.features}}


def feature_specs(data: DataConfig) -> dict[str, Spec]:
    """Feature name -> its Spec in the batches of `data`: the schema's (float_list float32, int64_list
    int64, a length-1 feature one value per example), the flags as float32, then what each preprocessor
    makes of them, in their order."""
    schema = data.seg_dense_schema.specs
    specs = {name: _spec(schema[source]) for name, source in feature_sources(data).items()}
    if FLAGS in specs:
        specs[FLAGS] = Spec(specs[FLAGS].shape, torch.float32)
    for preprocessor in build_preprocessors(data.preprocess):
        specs = preprocessor.output_specs(specs)
    return specs


def _spec(feature: FeatureSpec) -> Spec:
    shape = () if feature.length == 1 else (feature.length,)
    return Spec(shape, torch.float32 if feature.dtype == "float_list" else torch.int64)


class Columns:
    """What to decode for a data config, and how decoded columns become Rows and then a Batch.
    labels=False (prediction) reads no label: Rows.tasks is () and labels and weights are [N, 0]. `source`:
    the files' format, whose decoder turns records into columns."""

    def __init__(
        self,
        data: DataConfig,
        preprocessors: list[Preprocessor],
        labels: bool,
        damage: Damage | None,
        source: Format,
    ):
        self.specs = data.seg_dense_schema.specs
        self.features = feature_sources(data)
        self.tasks = tuple(data.tasks) if labels else ()
        self.pos_rates = np.array([data.tasks[t].pos_downsampling_rate for t in self.tasks], dtype=np.float32)
        self.neg_rates = np.array([data.tasks[t].neg_downsampling_rate for t in self.tasks], dtype=np.float32)
        # Columns the preprocessors read that are not features (a timestamp): read under the schema's name.
        extras = [name for p in preprocessors for name in p.columns if name not in self.features]
        self.extras = list(dict.fromkeys(extras))
        self.wanted = list(dict.fromkeys([*self.features.values(), *self.tasks, *self.extras]))
        self.wanted_specs = {name: self.specs[name] for name in self.wanted}
        self._source = source
        self.mantissa_masks = {
            name: np.uint32((0xFFFFFFFF << bits) & 0xFFFFFFFF)
            for name, bits in data.seg_dense_schema.mask_mantissa_features.items()
        }
        # numpy has no bfloat16: downcast leaves bfloat16-exact float32 values, which the batch converts.
        self.bfloat16 = [name for name, spec in feature_specs(data).items() if spec.dtype == torch.bfloat16]
        self._damage = damage
        self._decoders = threading.local()
        self._every_decoder: list[Decoder] = []  # every thread's, for defaults_filled
        self._lock = threading.Lock()

    def decode(self, items: list[Item]) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
        """Schema name -> [N, length] array of the wanted columns of these records, and which of `items`
        the N rows are (their positions, ascending).

        A damaged record (not a tf.Example, a feature of the wrong type or length, a label other than 0 or 1)
        raises DataError naming its file and index; with `damage` (ignore_data_errors) it is reported there
        and left out: N is smaller, and None means no record is left."""
        decoder = self._decoder()
        kept = np.arange(len(items))
        try:
            columns = decoder.decode_batch([record for record, _, _ in items], file="(a batch)")
        except DataError:
            # One by one: to name the damaged record, or (ignore_data_errors) to keep the others.
            parts = [self._decode_record(decoder, item) for item in items]
            kept = np.array([i for i, part in enumerate(parts) if part is not None], dtype=np.int64)
            if not kept.size:
                return None
            columns = {name: np.concatenate([parts[i][name] for i in kept]) for name in parts[kept[0]]}
        keep = self._check_labels(columns, [items[i] for i in kept])
        if keep is None:
            return columns, kept
        if not keep.any():
            return None
        return {name: values[keep] for name, values in columns.items()}, kept[keep]

    def defaults_filled(self) -> Counter[str]:
        """Schema name -> how many times the feature was absent from a record and took the schema default,
        over every decoder thread so far."""
        with self._lock:
            decoders = list(self._every_decoder)
        filled: Counter[str] = Counter()
        for decoder in decoders:
            filled.update(dict(decoder.missing_counts))  # dict() copies in one step; its thread counts on
        return filled

    def _decoder(self) -> Decoder:
        decoder = getattr(self._decoders, "decoder", None)
        if decoder is None:  # one per thread: a decoder counts the absent features it meets
            decoder = self._decoders.decoder = self._source.decoder(self.specs, self.wanted)
            with self._lock:
                self._every_decoder.append(decoder)
        return decoder

    def _decode_record(self, decoder: Decoder, item: Item) -> dict[str, np.ndarray] | None:
        record, path, index = item
        try:
            return decoder.decode_batch([record], file=path, first_index=index)
        except DataError as e:
            self._damaged(path, e)
            return None

    def _check_labels(self, columns: dict[str, np.ndarray], items: list[Item]) -> np.ndarray | None:
        """Which rows to keep, None for all. A label is 0 or 1 (int64 or float in the schema), and so is each
        flag (FLAGS, int64): any other value (2, -1, 0.5, 2**62) is damage, not a positive or a set flag, as
        the model would take 2**62 for a flag's input as it is. One vectorized check per column; only failing
        rows cost more."""
        checked = {f"label {task}": columns[task] for task in self.tasks}
        if FLAGS in self.features:
            checked[f"feature {FLAGS} ({self.features[FLAGS]})"] = columns[self.features[FLAGS]]
        wrong = {what: (values != 0) & (values != 1) for what, values in checked.items()}
        wrong = {what: cells for what, cells in wrong.items() if cells.any()}
        if not wrong:
            return None
        keep = ~np.any([cells.any(axis=1) for cells in wrong.values()], axis=0)
        for row in np.flatnonzero(~keep):
            what, cells = next((what, cells) for what, cells in wrong.items() if cells[row].any())
            column = int(np.argmax(cells[row]))
            where = f" column {column}" if cells.shape[1] > 1 else ""
            value = checked[what][row, column]  # as stored: int64 or float
            _, path, index = items[row]
            self._damaged(path, DataError(f"{path}: record {index}: {what}{where} is {value}, not 0 or 1"))
        return keep

    def _damaged(self, path: str, error: DataError) -> None:
        if self._damage is None:
            raise error
        self._damage.record(path, error)

    def rows(self, columns: dict[str, np.ndarray]) -> Rows:
        features = {out: _squeeze(columns[source]) for out, source in self.features.items()}
        if FLAGS in features:
            features[FLAGS] = features[FLAGS].astype(np.float32)
        for name, mask in self.mantissa_masks.items():
            features[name].view(np.uint32)[...] &= mask
        if self.tasks:  # 0 or 1: decode() checked them
            labels = np.concatenate([columns[t] for t in self.tasks], axis=1).astype(np.float32)
        else:
            labels = np.zeros((len(next(iter(columns.values()))), 0), dtype=np.float32)
        # Inverse sampling probability of the stored label; computed before rectify_labels on purpose.
        weights = labels / self.pos_rates + (1 - labels) / self.neg_rates
        extras = {name: _squeeze(columns[name]) for name in self.extras}
        return Rows(features, labels, weights, self.tasks, extras)

    def batch(self, rows: Rows) -> Batch:
        features = {
            name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in rows.features.items()
        }
        for name in self.bfloat16:  # exact: downcast rounded the values to bfloat16 already
            features[name] = features[name].to(torch.bfloat16)
        return Batch(
            features,
            torch.from_numpy(np.ascontiguousarray(rows.labels)),
            torch.from_numpy(np.ascontiguousarray(rows.weights, dtype=np.float32)),
            rows.tasks,
        )


def _squeeze(values: np.ndarray) -> np.ndarray:
    """Length-1 features are one value per example: [N]."""
    return values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values
