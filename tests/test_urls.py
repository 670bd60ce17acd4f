"""Credentials in URLs: found wherever they sit, described without being repeated, and taken out of any text
by redact (hand-written expectations)."""

import pytest

from heavyranker.urls import credentials_in, redact

SECRET = "S3CR3T"
WITH_CREDENTIALS = {  # url -> (what credentials_in says, the url redacted)
    f"s3://{SECRET}@bucket/train/*.gz": ("a user name", "s3://bucket/train/*.gz"),
    f"s3://KEYID:{SECRET}@bucket/x.gz": ("a password", "s3://bucket/x.gz"),
    f"s3://KEYID%3A{SECRET}@bucket/x.gz": ("a password", "s3://bucket/x.gz"),
    f"s3://KEYID:{SECRET}/more@bucket/x.gz": ("a password", "s3://bucket/x.gz"),  # a "/" in the password
    f"http://KEYID:{SECRET}@[::1]:9000/b/x": ("a password", "http://[::1]:9000/b/x"),
    f"https://b.s3.amazonaws.com/x.gz?X-Amz-Credential=AK%2F{SECRET}&X-Amz-Date=1&X-Amz-Signature={SECRET}": (
        "a signature or token in its query (X-Amz-Credential=, X-Amz-Signature=)",
        "https://b.s3.amazonaws.com/x.gz?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***",
    ),
    f"s3://b/x.gz?X-Amz-Security-Token={SECRET}": (
        "a signature or token in its query (X-Amz-Security-Token=)",
        "s3://b/x.gz?X-Amz-Security-Token=***",
    ),
    f"gs://b/x.gz?X-Goog-Signature={SECRET}": (
        "a signature or token in its query (X-Goog-Signature=)",
        "gs://b/x.gz?X-Goog-Signature=***",
    ),
    f"az://c/x.gz?sv=2022-11-02&sig={SECRET}": (
        "a signature or token in its query (sig=)",
        "az://c/x.gz?sv=2022-11-02&sig=***",
    ),
    f"s3://b/x.gz?AWSAccessKeyId=AK&Signature={SECRET}": (
        "a signature or token in its query (AWSAccessKeyId=, Signature=)",
        "s3://b/x.gz?AWSAccessKeyId=***&Signature=***",
    ),
    f"s3://ID@b/x.gz?token={SECRET}": (
        "a user name and a signature or token in its query (token=)",
        "s3://b/x.gz?token=***",
    ),
}
WITHOUT = [
    "s3://bucket/train/part-?.gz",  # a glob's "?" starts no query
    "s3://bucket/a@b.gz",  # an "@" in the path is no user info
    "http://127.0.0.1:9/bucket?list-type=2&prefix=train%2F",
    "http://[::1]:9000/b/x.gz",
    "gs://b/x.gz?generation=5",
    "/home/me@example/data/*.gz",
    "file:///data/x.gz",
]


@pytest.mark.parametrize("url", WITH_CREDENTIALS)
def test_credentials_are_named_without_repeating_them_and_redacted(url):
    what, redacted = WITH_CREDENTIALS[url]
    assert credentials_in(url) == what
    assert redact(url) == redacted
    assert SECRET not in redact(url)


@pytest.mark.parametrize("url", WITHOUT)
def test_urls_without_credentials_are_left_as_they_are(url):
    assert credentials_in(url) is None
    assert redact(url) == url


def test_every_url_in_a_text_is_redacted():
    text = f"cannot read 's3://ID:{SECRET}@b/x.gz' (see gs://c/y?token={SECRET}), nor /local/p?token=1"
    assert redact(text) == "cannot read 's3://b/x.gz' (see gs://c/y?token=***), nor /local/p?token=1"


def test_the_cli_redacts_every_log_line():
    import logging

    from heavyranker.cli import _redact_record

    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "%s: at byte %d", (f"s3://K:{SECRET}@b/x", 5), None
    )
    assert _redact_record(record) and record.getMessage() == "s3://b/x: at byte 5"
