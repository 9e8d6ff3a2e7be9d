"""Object storage against a real folder and a real S3 server (SeaweedFS, auth on, no mocks)."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from asset_library.defs.resources import s3_resource_from_env
from asset_library.ids import check_md5, is_md5_key
from asset_library.s3 import DEFAULT_REGION, delta_storage_options, is_s3, s3_settings
from asset_library.storage import (
    DigestMismatchError,
    LocalObjectStore,
    ObjectNotFoundError,
    ObjectStat,
    ObjectStore,
    ObjectStoreError,
    PutResult,
    S3ObjectStore,
    object_key,
    open_store,
    parse_s3_uri,
    s3_client_from_env,
    verify_objects,
)
from asset_library_tests.support.seaweedfs import SeaweedS3

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif"}
S3_PREFIX = "lib/v1"


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="session")
def images(corpus_dir: Path) -> list[tuple[bytes, str]]:
    """Six small, distinct real images from the corpus, as (bytes, md5)."""
    paths = sorted(
        path
        for path in corpus_dir.rglob("*")
        if path.is_file()
        and path.suffix.lower() in IMAGE_SUFFIXES
        and 1_000 < path.stat().st_size < 150_000
    )
    chosen: dict[str, bytes] = {}
    for path in paths:
        data = path.read_bytes()
        chosen.setdefault(_md5(data), data)
        if len(chosen) == 6:
            break
    assert len(chosen) == 6, f"corpus at {corpus_dir} has too few small images"
    return [(data, md5) for md5, data in chosen.items()]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    seaweed: SeaweedS3 = request.getfixturevalue("seaweed")
    bucket: str = request.getfixturevalue("s3_bucket")
    return S3ObjectStore(seaweed.client(), bucket, S3_PREFIX)


def _objects_in_bucket(client, bucket: str) -> list[str]:
    response = client.list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in response.get("Contents", ())]


# -- keys ---------------------------------------------------------------------------------------


def test_object_key_layout() -> None:
    md5 = "0123456789abcdef0123456789abcdef"
    assert object_key(md5) == f"images/01/23/{md5}"


@pytest.mark.parametrize(
    "bad",
    [
        "0123456789ABCDEF0123456789ABCDEF",  # upper case
        "0123456789abcdef0123456789abcde",  # 31 characters
        "0123456789abcdef0123456789abcdef0",  # 33 characters
        "0123456789abcdef0123456789abcdeg",  # not hex
        " 0123456789abcdef0123456789abcde",
        "",
    ],
)
def test_object_key_refuses_non_md5(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace("\\", "\\\\")):
        object_key(bad)


def test_the_md5_rules_storage_uses_are_the_ids_rules() -> None:
    """A stored key is the lower-case form ``check_md5`` gives; any other spelling is refused."""
    upper = "D41D8CD98F00B204E9800998ECF8427E"
    assert is_md5_key(check_md5(upper)) and not is_md5_key(upper)
    assert not is_md5_key(None) and not is_md5_key("g" * 32) and not is_md5_key("a" * 31)
    with pytest.raises(ValueError, match=upper):
        object_key(upper)


def test_object_key_refuses_non_string() -> None:
    with pytest.raises(ValueError, match="b'"):
        object_key(b"0123456789abcdef0123456789abcdef")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["a//b", "/a", "a/", "a/../b", "./a", "a/.tmp-x", ""])
def test_keys_that_s3_and_folders_treat_differently_are_refused(
    seaweed: SeaweedS3, tmp_path: Path, bad: str
) -> None:
    # Refused before any request: the bucket need not exist.
    stores = [LocalObjectStore(tmp_path), S3ObjectStore(seaweed.client(), "no-such-bucket")]
    data = b"x"
    for store in stores:
        with pytest.raises(ValueError, match="bad object key"):
            store.put_if_absent(bad, data, _md5(data))
        with pytest.raises(ValueError, match="bad object key"):
            store.exists(bad)
    assert list(tmp_path.iterdir()) == []


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ["bucket/a", "s3://", "s3:///a", "s3://Bad_Bucket/a", "http://bucket/a"]:
        with pytest.raises(ValueError, match="'" + bad):
            parse_s3_uri(bad)


# -- both stores --------------------------------------------------------------------------------


def test_one_reading_of_the_s3_settings() -> None:
    """The boto3 client, the Dagster resource and the lake's options read one set of variables
    with one default, and one test says what an S3 location is."""
    environ = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k"}
    settings = s3_settings(environ)
    assert (settings.endpoint_url, settings.region, settings.allow_http) == (
        "http://127.0.0.1:9",
        DEFAULT_REGION,
        True,
    )
    assert settings.secrets == {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_SESSION_TOKEN": None,
    }
    resource = s3_resource_from_env({**environ, "S3_ENDPOINT_URL": "https://s3.example"})
    assert (resource.endpoint_url, resource.region_name) == ("https://s3.example", DEFAULT_REGION)
    assert delta_storage_options({**environ, "AWS_DEFAULT_REGION": "eu-west-1"}) == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_REGION": "eu-west-1",
        "conditional_put": "etag",
    }
    assert is_s3("s3://bucket/prefix")
    assert not is_s3("/srv/s3://x") and not is_s3("S3://bucket")


def test_put_then_read(store: ObjectStore, images: list[tuple[bytes, str]]) -> None:
    keys = []
    for data, md5 in images:
        key = object_key(md5)
        keys.append(key)
        assert not store.exists(key)
        assert store.head_size(key) is None
        assert store.put_if_absent(key, data, md5) is PutResult.STORED
        assert store.exists(key)
        assert store.head_size(key) == len(data)
        assert store.get(key) == data
        assert key in store.uri(key)
    assert list(store.iter_keys()) == sorted(keys)
    first = keys[0]
    assert list(store.iter_keys(first[: len("images/") + 2])) == [
        k for k in sorted(keys) if k.startswith(first[: len("images/") + 2])
    ]
    assert list(store.iter_keys("nothing/")) == []
    assert store.describe()


def test_second_put_is_refused_and_keeps_the_object(
    store: ObjectStore, images: list[tuple[bytes, str]]
) -> None:
    (data, md5), (other, other_md5) = images[0], images[1]
    key = object_key(md5)
    assert store.put_if_absent(key, data, md5) is PutResult.STORED
    assert store.put_if_absent(key, data, md5) is PutResult.PRESENT
    assert not store.put_if_absent(key, data, md5)  # falsy: nothing written
    # Another (valid) body under an md5 key that is not its own is refused, never stored.
    with pytest.raises(ValueError, match=f"names md5 {md5}, but the body's md5 is {other_md5}"):
        store.put_if_absent(key, other, other_md5)
    assert store.get(key) == data
    assert store.head_size(key) == len(data)


def test_missing_object(store: ObjectStore) -> None:
    key = object_key("f" * 32)
    with pytest.raises(ObjectNotFoundError, match="f" * 32) as info:
        store.get(key)
    assert isinstance(info.value, KeyError)
    store.delete(key)  # idempotent
    assert store.head_size(key) is None


def test_delete(store: ObjectStore, images: list[tuple[bytes, str]]) -> None:
    data, md5 = images[0]
    key = object_key(md5)
    store.put_if_absent(key, data, md5)
    store.delete(key)
    assert not store.exists(key)
    assert list(store.iter_keys()) == []
    assert store.put_if_absent(key, data, md5) is PutResult.STORED


def test_wrong_md5_is_refused_and_nothing_is_stored(
    store: ObjectStore, images: list[tuple[bytes, str]]
) -> None:
    (data, md5), (_, other_md5) = images[0], images[1]
    corrupted = bytes([data[0] ^ 0xFF]) + data[1:]
    for body, claimed in [(data, other_md5), (corrupted, md5)]:
        key = object_key(claimed)
        with pytest.raises(ValueError, match="images/") as info:
            store.put_if_absent(key, body, claimed)
        assert isinstance(info.value, DigestMismatchError)
        if isinstance(store, S3ObjectStore):
            # The refusal comes from the server, which checked Content-MD5 against the body.
            cause = info.value.__cause__
            assert isinstance(cause, ClientError)
            assert cause.response["Error"]["Code"] == "BadDigest"
            assert _objects_in_bucket(store.client, store.bucket) == []
        assert not store.exists(key)
    with pytest.raises(ValueError, match="bad md5_hex"):
        store.put_if_absent(object_key(md5), data, md5.upper())


def test_racing_writers_exactly_one_wins(
    store: ObjectStore, images: list[tuple[bytes, str]]
) -> None:
    # Three rounds: on SeaweedFS the losers of a race wait about 1-2 s server-side for their 412.
    for data, md5 in images[:3]:
        key = object_key(md5)
        barrier = threading.Barrier(8)

        def put(barrier: threading.Barrier, key: str, data: bytes, md5: str) -> bool:
            barrier.wait(timeout=10)
            return store.put_if_absent(key, data, md5)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(put, barrier, key, data, md5) for _ in range(8)]
            results = [future.result(timeout=60) for future in futures]
        assert results.count(PutResult.STORED) == 1, results
        assert results.count(PutResult.PRESENT) == 7, results
        assert store.get(key) == data
    if isinstance(store, LocalObjectStore):
        leftovers = [p for p in store.root.rglob(".*")]
        assert leftovers == [], "temporary files left behind"


def _overwrite(store: ObjectStore, key: str, body: bytes) -> None:
    """Damage a stored object behind the store's back, as a faulty disk or a stray tool would."""
    if isinstance(store, LocalObjectStore):
        with open(store.uri(key), "r+b") as handle:  # in place: same file, new bytes
            handle.write(body)
            handle.truncate()
    else:
        assert isinstance(store, S3ObjectStore)
        store.client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=body)


_DAMAGES = ["truncated", "same size, one byte flipped"]


def _damages(data: bytes) -> dict[str, bytes]:
    return {
        "truncated": data[: len(data) // 2],
        "same size, one byte flipped": data[:-1] + bytes([data[-1] ^ 0x01]),
    }


def test_a_damaged_object_is_replaced_by_the_right_bytes(
    store: ObjectStore, images: list[tuple[bytes, str]]
) -> None:
    for (data, md5), damage in zip(images, _DAMAGES, strict=False):
        key = object_key(md5)
        assert store.put_if_absent(key, data, md5) is PutResult.STORED
        _overwrite(store, key, _damages(data)[damage])
        assert store.get(key) != data, damage
        assert store.put_if_absent(key, data, md5) is PutResult.REPAIRED, damage
        assert store.get(key) == data, damage
        assert store.put_if_absent(key, data, md5) is PutResult.PRESENT, damage
    if isinstance(store, LocalObjectStore):
        assert [p for p in store.root.rglob(".*")] == [], "temporary files left behind"


def test_verify_objects_finds_missing_short_and_altered_objects(
    store: ObjectStore, images: list[tuple[bytes, str]]
) -> None:
    items = [(md5, len(data)) for data, md5 in images]
    for data, md5 in images:
        store.put_if_absent(object_key(md5), data, md5)
    assert verify_objects(store, items, content_sample=100) == []
    (_, gone), (short_data, short), (flip_data, flipped) = images[0], images[1], images[2]
    store.delete(object_key(gone))
    _overwrite(store, object_key(short), _damages(short_data)["truncated"])
    _overwrite(store, object_key(flipped), _damages(flip_data)["same size, one byte flipped"])

    # Sizes only: an S3 ETag that is an MD5 still gives the same-size damage away (confirmed
    # by reading it); a folder cannot tell without reading the bytes.
    found = {(p.md5, p.kind) for p in verify_objects(store, items, content_sample=0)}
    expected = {(gone, "missing"), (short, "size")}
    if isinstance(store, S3ObjectStore):
        expected.add((flipped, "content"))
    assert found == expected
    problems = verify_objects(store, items, content_sample=100)
    assert {(p.md5, p.kind) for p in problems} == {
        (gone, "missing"),
        (short, "size"),
        (flipped, "content"),
    }
    assert all(p.md5 in str(p) for p in problems)
    for data, md5 in images[:3]:
        assert store.put_if_absent(object_key(md5), data, md5)  # stored again or repaired
    assert verify_objects(store, items, content_sample=100) == []


def test_local_objects_are_created_with_the_process_umask(
    tmp_path: Path, images: list[tuple[bytes, str]]
) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    (data, md5), (other, other_md5) = images[0], images[1]
    old = os.umask(0o022)
    try:
        store.put_if_absent(object_key(md5), data, md5)
        _overwrite(store, object_key(md5), b"damaged")
        assert store.put_if_absent(object_key(md5), data, md5) is PutResult.REPAIRED
        os.umask(0o077)
        store.put_if_absent(object_key(other_md5), other, other_md5)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.uri(object_key(md5))).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(store.uri(object_key(other_md5))).st_mode) == 0o600


# -- S3 specifics -------------------------------------------------------------------------------


def test_s3_bad_digest_from_raw_client(seaweed: SeaweedS3, s3_bucket: str) -> None:
    """The server itself refuses a Content-MD5 that does not match the body."""
    client = seaweed.client()
    body = b"the body"
    wrong = hashlib.md5(b"another body").digest()
    with pytest.raises(ClientError) as info:
        client.put_object(
            Bucket=s3_bucket, Key="k", Body=body, ContentMD5=base64.b64encode(wrong).decode()
        )
    assert info.value.response["Error"]["Code"] == "BadDigest"
    assert _objects_in_bucket(client, s3_bucket) == []


def test_s3_iter_keys_pages_past_1000(seaweed: SeaweedS3, s3_bucket: str) -> None:
    client = seaweed.client(max_pool_connections=16)
    store = S3ObjectStore(client, s3_bucket, S3_PREFIX)
    bodies = [f"object {i}".encode() for i in range(1100)]
    started = time.monotonic()

    def put(body: bytes) -> bool:
        md5 = _md5(body)
        return store.put_if_absent(object_key(md5), body, md5)

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(put, bodies))
    put_seconds = time.monotonic() - started

    list_calls = []
    client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kwargs: list_calls.append(1)
    )
    keys = store.iter_keys()
    assert isinstance(keys, Iterator)
    assert list_calls == [], "iter_keys must be lazy"
    listed = list(keys)
    assert listed == sorted(object_key(_md5(body)) for body in bodies)
    assert len(list_calls) >= 2, "expected more than one page"
    assert put_seconds < 30, f"1100 PUTs took {put_seconds:.1f} s"


def test_s3_multipart_etag_is_not_taken_for_an_md5(
    seaweed: SeaweedS3, s3_bucket: str, images: list[tuple[bytes, str]]
) -> None:
    """An intact object uploaded in parts has an ETag `md5-of-part-md5s-N`: never "damaged"."""
    client = seaweed.client()
    store = S3ObjectStore(client, s3_bucket, S3_PREFIX)
    data, md5 = images[0]
    full = f"{S3_PREFIX}/{object_key(md5)}"
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key=full)
    part = client.upload_part(
        Bucket=s3_bucket, Key=full, UploadId=upload["UploadId"], PartNumber=1, Body=data
    )
    client.complete_multipart_upload(
        Bucket=s3_bucket,
        Key=full,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    assert client.head_object(Bucket=s3_bucket, Key=full)["ETag"].strip('"').endswith("-1")
    assert store.stat(object_key(md5)) == ObjectStat(len(data), None)
    assert store.put_if_absent(object_key(md5), data, md5) is PutResult.PRESENT
    assert verify_objects(store, [(md5, len(data))], content_sample=0) == []
    assert verify_objects(store, [(md5, len(data))], content_sample=1) == []


def test_s3_bad_credentials_give_a_clear_error(seaweed: SeaweedS3, s3_bucket: str) -> None:
    data = b"some bytes"
    md5 = _md5(data)
    key = object_key(md5)
    wrong_secret = S3ObjectStore(
        seaweed.client(secret_key="not-the-secret", max_attempts=1), s3_bucket
    )
    with pytest.raises(ObjectStoreError, match="SignatureDoesNotMatch") as info:
        wrong_secret.put_if_absent(key, data, md5)
    assert s3_bucket in str(info.value) and key in str(info.value)
    assert info.value.code == "SignatureDoesNotMatch"
    # exists() must not mistake "forbidden" for "absent".
    with pytest.raises(ObjectStoreError, match=s3_bucket):
        wrong_secret.exists(key)
    with pytest.raises(ObjectStoreError, match="SignatureDoesNotMatch"):
        list(wrong_secret.iter_keys())

    unknown_key = S3ObjectStore(seaweed.client(access_key="AKNOBODY", max_attempts=1), s3_bucket)
    with pytest.raises(ObjectStoreError, match="InvalidAccessKeyId"):
        unknown_key.put_if_absent(key, data, md5)
    assert _objects_in_bucket(seaweed.client(), s3_bucket) == []


def test_open_store_from_environment(
    s3_env: dict[str, str], s3_bucket: str, images: list[tuple[bytes, str]], tmp_path: Path
) -> None:
    client = s3_client_from_env()
    assert client.meta.endpoint_url == s3_env["S3_ENDPOINT_URL"]
    assert client.meta.region_name == "us-east-1"
    store = open_store(f"s3://{s3_bucket}/{S3_PREFIX}")
    assert isinstance(store, S3ObjectStore)
    data, md5 = images[0]
    key = object_key(md5)
    assert store.put_if_absent(key, data, md5)
    assert store.uri(key) == f"s3://{s3_bucket}/{S3_PREFIX}/{key}"
    assert _objects_in_bucket(client, s3_bucket) == [f"{S3_PREFIX}/{key}"]
    assert s3_env["S3_ENDPOINT_URL"] in store.describe()

    local = open_store(tmp_path / "here")
    assert isinstance(local, LocalObjectStore)
    assert local.put_if_absent(key, data, md5)
    assert Path(local.uri(key)) == tmp_path / "here" / Path(*key.split("/"))


def test_s3_server_restart_keeps_objects_and_outage_is_an_error(
    images: list[tuple[bytes, str]],
) -> None:
    """A private server: stop it mid-run (errors, never "absent"), restart, data is back."""
    with SeaweedS3() as server:
        server.make_bucket("restart")
        store = S3ObjectStore(server.client(max_attempts=1), "restart")
        written = []
        for data, md5 in images[:3]:
            key = object_key(md5)
            assert store.put_if_absent(key, data, md5)
            written.append((key, data))
        server.stop()
        key, data = written[0]
        with pytest.raises(ObjectStoreError, match="s3://restart/" + key):
            store.exists(key)
        server.start()
        for key, data in written:
            assert store.get(key) == data
        data, md5 = images[3]
        assert store.put_if_absent(object_key(md5), data, md5)
        assert len(list(store.iter_keys())) == 4
