"""Short task names for tables and logs."""

from heavyranker.config import short_names


def test_short_names_drop_the_shared_dotted_prefix_only():
    assert short_names(["recap.engagement.is_replied", "recap.engagement.is_retweeted"]) == {
        "recap.engagement.is_replied": "is_replied",
        "recap.engagement.is_retweeted": "is_retweeted",
    }
    assert short_names(["a.b", "c"]) == {"a.b": "a.b", "c": "c"}
    assert short_names(["recap.engagement.is_replied"]) == {"recap.engagement.is_replied": "is_replied"}
