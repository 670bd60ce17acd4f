"""The tf.Example codec: a batch decoder for training and serving, encoders for synthetic data and tests.
wire.py holds the wire format and the primitives both directions share."""

from .decode import ExampleDecoder
from .encode import encode_example, encode_tf_examples
from .wire import encode_varints

__all__ = ["ExampleDecoder", "encode_example", "encode_tf_examples", "encode_varints"]
