"""Credential-shaped text is masked before it reaches a message or a record; anything else is kept."""

from __future__ import annotations

import pytest

from rankfold.core.redact import MASK, has_url_credentials, redact

KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("text, secrets, kept", [
    (f"http://{KEY_ID}:{SECRET}@127.0.0.1:9000", [KEY_ID, SECRET], "@127.0.0.1:9000"),
    ("s3 endpoint https://user:p@ss@host/bucket failed", ["user", "p@ss"], "failed"),  # a raw "@" in the password
    ("ray://admin@head:10001", ["admin"], "@head:10001"),
    ("http://:only-a-password@host", ["only-a-password"], "@host"),
    (f"key id {KEY_ID} was refused", [KEY_ID], "was refused"),
    ("temporary ASIAY34FZKBOKMUTVV7A here", ["ASIAY34FZKBOKMUTVV7A"], "here"),
    (f"aws_secret_access_key={SECRET} rest", [SECRET], "rest"),
    (f'{{"aws_secret_access_key": "{SECRET}"}}', [SECRET], "aws_secret_access_key"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=deadbeef", ["deadbeef", "AKIA%2F"],
     "https://b.s3.amazonaws.com/k?"),
])
def test_credential_shapes_are_masked(text, secrets, kept):
    masked = redact(text)
    assert MASK in masked and kept in masked
    assert not any(secret in masked for secret in secrets), masked


@pytest.mark.parametrize("text", [
    "http://127.0.0.1:9000", "s3://bucket/prefix/jobs/x/manifest.json (endpoint http://minio:9000)",
    "sha256 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "credentials rejected (InvalidAccessKeyId)", "hf://datasets/wikitext@main", "mail me at a@b.c",
])
def test_other_text_is_kept(text):
    assert redact(text) == text


def test_url_credentials_are_recognised():
    assert has_url_credentials(f"http://{KEY_ID}:{SECRET}@host:9000")
    assert has_url_credentials("ray://user@host:10001")
    assert not has_url_credentials("http://host:9000/path") and not has_url_credentials("host:6379")
