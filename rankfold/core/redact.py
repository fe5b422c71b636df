"""Masking credential-shaped text before it reaches a message or a record.

Credentials come from boto3's standard chain (or a cluster's own), never from a spec, so rankfold
refuses them in URLs; what still slips into a string (an endpoint someone passed in code, a library's
error text) is masked here: URL userinfo (`scheme://user:password@`), AWS access key ids (AKIA…,
ASIA…) and `secret=value`-style assignments. A bare 40-character secret key is not recognisable
apart from a digest, so it is masked only where it follows one of those names.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user@ or scheme://user:password@. A password is taken up to the last "@" before a space: written
# unencoded it may hold "/" or "@" itself (better to mask a URL whose path has an "@" than to leak a secret).
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)([^\s/?#@:]*:\S*|[^\s/?#@:]+)@")
# AWS access key ids: a 4-letter kind (long-term AKIA, temporary ASIA, ...) and 16 more characters.
_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA)[A-Z0-9]{12,}\b")
_ASSIGNED = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_session_token|aws_security_token|aws_access_key_id|secret_access_key"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token|password|passwd|secret|token)"
    r"([\"']?\s*[=:]\s*[\"']?)([^\s\"'&,;]+)")


def has_url_credentials(text: str) -> bool:
    """True when `text` holds a URL with userinfo (`scheme://user@...` or `scheme://user:password@...`)."""
    return _USERINFO.search(text) is not None


def redact(text: str) -> str:
    """`text` with every credential-shaped part replaced by ***; anything else is left as it was."""
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    text = _KEY_ID.sub(MASK, text)
    return _ASSIGNED.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
