"""Artifact stores, local folder and S3 (a real S3 HTTP server on 127.0.0.1): round trips, checksums
on every read, atomic replacement, and errors that name the store."""

from __future__ import annotations

import boto3
import pytest
import torch

from rankfold.storage.store import LocalStore, S3Store, StoreError


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    return S3Store(bucket, prefix="jobs/test", endpoint_url=endpoint)


def _damage(store, key: str) -> None:
    """Replace the stored bytes behind the store's back, leaving the recorded checksum as it was."""
    if isinstance(store, LocalStore):
        data = bytearray(store.path(key).read_bytes())
        data[-1] ^= 0xFF
        store.path(key).write_bytes(bytes(data))
    else:
        head = store.client.head_object(Bucket=store.bucket, Key=store._object(key))
        store.client.put_object(Bucket=store.bucket, Key=store._object(key), Body=b"not the artifact",
                                Metadata=head["Metadata"])


def test_tensors_json_and_metadata_round_trip(store):
    tensors = {"gram": torch.randn(5, 5, dtype=torch.float64), "count": torch.tensor([7])}
    digest = store.put_tensors("stats/layer-00000.safetensors", tensors, metadata={"note": "x"})
    assert len(digest) == 64 and store.exists("stats/layer-00000.safetensors")
    loaded = store.get_tensors("stats/layer-00000.safetensors")
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert store.get_metadata("stats/layer-00000.safetensors")["note"] == "x"
    store.put_json("manifest.json", {"stages": ["calibrate"]})
    assert store.get_json("manifest.json") == {"stages": ["calibrate"]}
    assert store.list_keys() == ["manifest.json", "stats/layer-00000.safetensors"]
    assert store.list_keys("stats/") == ["stats/layer-00000.safetensors"]


def test_damaged_artifact_fails_verification_and_reads(store):
    store.put_tensors("factors/a.safetensors", {"A": torch.ones(3, 4)})
    assert store.verify("factors/a.safetensors")
    _damage(store, "factors/a.safetensors")
    assert not store.verify("factors/a.safetensors")
    with pytest.raises(StoreError, match="damaged"):
        store.get_tensors("factors/a.safetensors")


def test_missing_artifact(store):
    assert not store.exists("nope.json") and not store.verify("nope.json")
    with pytest.raises(StoreError, match=r"nope\.json.* is missing"):
        store.get_json("nope.json")


def test_unchanged_trusts_the_token_rehashes_when_it_moved(store):
    sha = store.put_json("a.json", {"v": 1})
    token = store.version("a.json")[1]
    assert store.unchanged("a.json", sha, token) == token
    assert store.unchanged("a.json", sha, "a token from another copy") == token  # rehashed: same bytes
    assert store.unchanged("a.json", "0" * 64, token) is None
    _damage(store, "a.json")  # bytes changed behind the recorded checksum
    assert store.unchanged("a.json", sha, "a token from another copy") is None
    assert store.unchanged("missing.json", sha, token) is None


def test_overwrite_replaces_whole_artifact_and_delete(store):
    store.put_json("a.json", {"v": 1})
    store.put_json("a.json", {"v": 2})
    assert store.get_json("a.json") == {"v": 2} and store.verify("a.json")
    store.delete("a.json")
    assert not store.exists("a.json")


@pytest.mark.parametrize("key", ["/abs", "../escape", "a/../../b", "x.sha256", ""])
def test_keys_stay_inside_the_store(tmp_path, key):
    with pytest.raises(ValueError, match="artifact key"):
        LocalStore(tmp_path).put_json(key, {})


def test_local_failed_write_keeps_the_previous_artifact(tmp_path):
    store = LocalStore(tmp_path)
    store.put_tensors("t.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(Exception):  # noqa: B017
        store.put_tensors("t.safetensors", {"x": "not a tensor"})  # fails while serialising
    assert torch.equal(store.get_tensors("t.safetensors")["x"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_local_write_without_checksum_reads_as_missing(tmp_path):
    """A crash between data and checksum leaves an artifact that does not count as done."""
    store = LocalStore(tmp_path)
    store.put_json("a.json", {"v": 1})
    (tmp_path / "a.json.sha256").unlink()
    assert not store.exists("a.json")


def test_s3_wrong_bucket_is_named(s3_endpoint):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        S3Store("no-such-bucket", endpoint_url=s3_endpoint)


def test_s3_unreachable_endpoint_is_named():
    import socket

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(StoreError, match=f"cannot reach the S3 endpoint \\({endpoint}\\)"):
        S3Store("bucket", endpoint_url=endpoint)


def test_s3_bad_credentials_are_named_not_printed(s3_endpoint_enforcing_auth):
    secret = "very-secret-value"
    client = boto3.client("s3", endpoint_url=s3_endpoint_enforcing_auth, aws_access_key_id="AKIAWRONG",
                          aws_secret_access_key=secret, region_name="us-east-1")
    with pytest.raises(StoreError, match="credentials rejected") as info:
        S3Store("bucket", endpoint_url=s3_endpoint_enforcing_auth, client=client)
    assert secret not in str(info.value) and "AKIAWRONG" not in str(info.value)


def test_s3_region_comes_from_the_aws_config_file(tmp_path, monkeypatch):
    """No region passed and none in the environment: boto3 reads it from ~/.aws/config (AWS_CONFIG_FILE)."""
    (tmp_path / "config").write_text("[default]\nregion = eu-west-2\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a session made earlier caches its config
    monkeypatch.setattr(S3Store, "_check_access", lambda self: None)  # no network
    assert S3Store("bucket").client.meta.region_name == "eu-west-2"


def test_update_json_reads_changes_and_writes_one_step(store):
    seen = []

    def append(value):
        seen.append(value)
        return {"items": (value or {"items": []})["items"] + [len(seen)]}

    assert store.update_json("jobs/j/manifest.json", append) == {"items": [1]}
    assert store.update_json("jobs/j/manifest.json", append) == {"items": [1, 2]}
    assert seen == [None, {"items": [1]}] and store.verify("jobs/j/manifest.json")
    assert store.update_json("jobs/j/manifest.json", lambda value: None) == {"items": [1, 2]}  # None: no write
    assert store.list_keys() == ["jobs/j/manifest.json"]  # the lock file beside it is not an artifact


def test_update_json_replaces_a_damaged_record(store):
    store.put_json("m.json", {"v": 1})
    _damage(store, "m.json")
    assert store.update_json("m.json", lambda value: {"read": value}) == {"read": None}
    assert store.get_json("m.json") == {"read": None}


def test_s3_update_json_reapplies_a_change_another_writer_came_before(s3_endpoint, s3_bucket):
    """The ETag read is gone by the time of the PUT: the conditional PUT fails, the change is
    applied again to the other writer's record, and neither write is lost."""
    store = S3Store(s3_bucket, prefix="p", endpoint_url=s3_endpoint)
    store.put_json("m.json", {"by": ["first"]})
    calls = []

    def add_mine(value):
        calls.append(value)
        if len(calls) == 1:  # another process writes between this read and this write
            store.put_json("m.json", {"by": value["by"] + ["other"]})
        return {"by": value["by"] + ["mine"]}

    assert store.update_json("m.json", add_mine) == {"by": ["first", "other", "mine"]}
    assert len(calls) == 2 and store.get_json("m.json") == {"by": ["first", "other", "mine"]}


def test_s3_update_json_of_a_new_object_loses_to_one_created_meanwhile(s3_endpoint, s3_bucket):
    store = S3Store(s3_bucket, endpoint_url=s3_endpoint)
    calls = []

    def create(value):
        calls.append(value)
        if len(calls) == 1:
            store.put_json("new.json", {"n": 1})
        return {"n": (value or {"n": 0})["n"] + 10}

    assert store.update_json("new.json", create) == {"n": 11} and calls == [None, {"n": 1}]


SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_s3_endpoint_with_credentials_is_refused_without_printing_them():
    endpoint = f"http://AKIAIOSFODNN7EXAMPLE:{SECRET}@127.0.0.1:9000"
    with pytest.raises(StoreError, match="endpoint_url .*credentials in the URL are refused") as info:
        S3Store("bucket", endpoint_url=endpoint)
    assert SECRET not in str(info.value) and "AKIAIOSFODNN7EXAMPLE" not in str(info.value)
    assert "127.0.0.1:9000" in str(info.value)


def test_store_messages_mask_credentials_a_library_put_in_them(monkeypatch):
    monkeypatch.setattr(S3Store, "_check_access", lambda self: None)  # no network
    store = S3Store("bucket", endpoint_url="http://127.0.0.1:9")
    error = store._error(RuntimeError(f"signing with AKIAIOSFODNN7EXAMPLE aws_secret_access_key={SECRET}"), "k.json")
    assert "s3://bucket/k.json" in str(error) and SECRET not in str(error) and "AKIAIOSFODNN7" not in str(error)
    assert SECRET not in str(StoreError(f"cannot reach http://user:{SECRET}@host"))
