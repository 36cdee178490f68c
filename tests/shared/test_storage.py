"""shared.storage against a local folder and a real S3 server on loopback (rclone)."""

from __future__ import annotations

import json
import os
import threading
import traceback
import uuid
from pathlib import Path

import pytest

from shared import storage
from shared.fetch import FetchItem
from shared.manifest import FormatEntry, Manifest, ShardEntry, SplitEntry
from shared.storage import (
    BadStorageOptions,
    PathEscapeError,
    StorageError,
    Store,
    check_relative,
    checksum_bytes,
    checksum_file,
    checksum_stream,
    parse_storage_options,
    redact,
    register_secret,
    safe_local_path,
)

# Fail fast when a server is gone instead of botocore's retries with back-off.
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1,
                               "read_timeout": 5}}
ESCAPES = ["../x", "/etc/passwd", "a/../../b", "s3://x", "C:\\x", "C:x", "a\x00b", "..", "",
           "~/x", "a\\..\\..\\b"]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A store under a sub-folder/prefix of a local temp folder or a fresh S3 bucket."""
    return _store_of(request.param, request, tmp_path)


def _store_of(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if kind == "local":
        return Store.open(str(tmp_path / "store" / "root"))
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Store.open(bucket + "/root", server.storage_options)


# --------------------------------------------------------------------------- basics


def test_write_read_and_range(store: Store) -> None:
    data = bytes(range(256)) * 40
    store.write_bytes("a/b/data.bin", data)
    assert store.read_bytes("a/b/data.bin") == data
    assert store.read_bytes("a/b/data.bin", 10, 20) == data[10:20]
    assert store.read_bytes("a/b/data.bin", 5000) == data[5000:]
    assert store.read_bytes("a/b/data.bin", 0, 1) == data[:1]
    with store.open_file("a/b/data.bin", "rb") as f:
        f.seek(100)
        assert f.read(7) == data[100:107]
    store.write_json("meta.json", {"x": 1})
    assert store.read_json("meta.json") == {"x": 1}
    assert store.read_text("meta.json").endswith("\n")


def test_exists_size_delete(store: Store) -> None:
    assert not store.exists("f.bin")
    store.write_bytes("f.bin", b"12345")
    store.write_bytes("d/one", b"1")
    store.write_bytes("d/e/two", b"22")
    assert store.exists("f.bin") and store.size("f.bin") == 5
    store.delete("f.bin")
    assert not store.exists("f.bin")
    store.delete("f.bin")  # missing is fine
    store.delete("d", recursive=True)
    assert store.walk_files("d") == []
    assert not store.exists("d/e/two")


def test_atomic_replace(store: Store) -> None:
    old, new = b"A" * 300_000, b"B" * 200_000
    store.write_bytes("obj", old)
    with store.open_file("obj", "rb") as before:
        head = before.read(10)
        store.write_bytes("obj", new)
        assert store.read_bytes("obj") == new
        assert store.size("obj") == len(new)
    assert head == old[:10]
    assert store.walk_files() == ["obj"]  # no temporary names left behind
    assert store.list() == ["obj"]


def test_readers_racing_a_writer_see_old_or_new(tmp_path: Path) -> None:
    """A reader racing a writer sees the old or the new object, never a mix.

    Local only: on S3 this is the service's PUT guarantee and ``write_bytes`` makes one
    PUT; the rclone test server reads a local file through a path-based VFS that can
    reopen it mid-read after a rename, so it cannot stand in for S3 here.
    """
    store = Store.open(str(tmp_path / "s"))
    old, new = b"A" * 300_000, b"B" * 200_000
    store.write_bytes("obj", old)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                store.write_bytes("obj", (old, new)[i % 2])
                i += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = set()
        for _ in range(300):
            got = store.read_bytes("obj")
            assert got in (old, new), (len(got), got[:1], got[-1:])
            seen.add(got[:1])
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert store.walk_files() == ["obj"]
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["obj"]


def test_failed_local_write_keeps_old_content(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(str(tmp_path / "s"))
    store.write_bytes("x/obj", b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(StorageError, match="x/obj"):
        store.write_bytes("x/obj", b"new content")
    src = tmp_path / "src.bin"
    src.write_bytes(b"uploaded")
    with pytest.raises(StorageError):
        store.put_file(src, "x/obj")
    monkeypatch.undo()
    assert store.read_bytes("x/obj") == b"old"
    assert sorted(p.name for p in (tmp_path / "s" / "x").iterdir()) == ["obj"]


def test_failed_local_write_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception while the data is being written (not only at rename)."""
    store = Store.open(str(tmp_path / "s"))
    store.write_bytes("obj", b"old")
    real_fsync = os.fsync

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage.os, "fsync", broken_fsync)
    with pytest.raises(StorageError):
        store.write_bytes("obj", b"new")
    monkeypatch.setattr(storage.os, "fsync", real_fsync)
    assert store.read_bytes("obj") == b"old"
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["obj"]


def test_listing_is_store_relative(store: Store) -> None:
    for rel in ("top.txt", "d/a.bin", "d/b.bin", "d/sub/c.bin"):
        store.write_bytes(rel, rel.encode())
    assert store.list() == ["d", "top.txt"]
    assert store.list("d") == ["d/a.bin", "d/b.bin", "d/sub"]
    detail = store.list("d", detail=True)
    assert [e["rel"] for e in detail] == ["d/a.bin", "d/b.bin", "d/sub"]
    assert store.walk_files() == ["d/a.bin", "d/b.bin", "d/sub/c.bin", "top.txt"]
    assert store.walk_files("d/sub") == ["d/sub/c.bin"]
    assert store.list("missing") == []
    assert store.walk_files("missing") == []
    sub = store.sub("d")
    assert sub.walk_files() == ["a.bin", "b.bin", "sub/c.bin"]
    assert sub.read_bytes("sub/c.bin") == b"d/sub/c.bin"


def test_put_dir_and_get_file(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "n" / "m").mkdir(parents=True)
    files = {"one.bin": os.urandom(1000), "n/two.bin": os.urandom(70_000),
             "n/m/three.bin": b""}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    store.put_dir(src, "up")
    assert store.walk_files("up") == sorted(f"up/{r}" for r in files)
    for rel, data in files.items():
        if data:
            assert store.size(f"up/{rel}") == len(data)
        dst = tmp_path / "dl" / rel.replace("/", "_")
        dst.parent.mkdir(exist_ok=True)
        store.get_file(f"up/{rel}", dst)
        assert dst.read_bytes() == data
    store.put_dir(src, "only", files=["n/two.bin"])
    assert store.walk_files("only") == ["only/n/two.bin"]
    store.put_file(src / "one.bin", "single/one.bin")
    assert store.read_bytes("single/one.bin") == files["one.bin"]


def test_missing_objects_raise_file_not_found(store: Store, tmp_path: Path) -> None:
    for call in (lambda: store.read_bytes("no/such.bin"),
                 lambda: store.read_bytes("no/such.bin", 0, 4),
                 lambda: store.size("no/such.bin"),
                 lambda: store.get_file("no/such.bin", tmp_path / "out"),
                 lambda: store.open_file("no/such.bin", "rb").read()):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert "no/such.bin" in str(info.value)
        assert "\n" not in str(info.value)


def test_checksums(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    digest = checksum_bytes(data)
    assert digest.startswith("blake2b:")
    assert checksum_file(path) == digest
    with open(path, "rb") as f:
        assert checksum_stream(f) == digest
    assert checksum_bytes(data + b"x") != digest


# --------------------------------------------------------------------------- S3 credentials


def test_s3_from_aws_environment_alone(s3_server, s3_bucket: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    store = Store.open(s3_bucket + "/env")
    store.write_bytes("a.bin", b"from env")
    assert store.read_bytes("a.bin", 5) == b"env"
    assert (s3_server.root / s3_bucket.removeprefix("s3://") / "env" / "a.bin").read_bytes() \
        == b"from env"


def test_s3_from_storage_options_alone(s3_server, s3_bucket: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    options = parse_storage_options(json.dumps(s3_server.storage_options))
    store = Store.open(s3_bucket, options)
    store.write_bytes("opts/a.bin", b"from options")
    assert store.read_bytes("opts/a.bin") == b"from options"
    assert store.list() == ["opts"]


def test_wrong_credentials_give_storage_error(s3_server, s3_bucket: str) -> None:
    good = Store.open(s3_bucket, s3_server.storage_options)
    good.write_bytes("obj", b"x")
    wrong_secret = "wrong-" + uuid.uuid4().hex
    bad = Store.open(s3_bucket, {**s3_server.storage_options, "secret": wrong_secret,
                                 **FAST_FAIL})
    for call in (lambda: bad.read_bytes("obj"), lambda: bad.write_bytes("new", b"y"),
                 lambda: bad.exists("obj"), lambda: bad.list(), lambda: bad.size("obj")):
        with pytest.raises(StorageError) as info:
            call()
        _assert_clean(info.value, (wrong_secret, s3_server.secret))
    assert good.walk_files() == ["obj"]


def _assert_clean(exc: BaseException, secrets: tuple[str, ...]) -> None:
    """No secret in the message or the printed traceback; no library exception chained."""
    assert type(exc).__module__ == "shared.storage" or isinstance(exc, FileNotFoundError)
    assert exc.__cause__ is None and exc.__suppress_context__
    printed = "".join(traceback.format_exception(exc))
    assert "botocore.exceptions" not in printed
    for secret in secrets:
        assert secret not in str(exc)
        assert secret not in repr(exc)
        assert secret not in printed


def test_failing_s3_call_holds_no_secret(start_s3, monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_s3()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        bucket = server.bucket("gone")
        store = Store.open(bucket + "/p", {**server.storage_options, **FAST_FAIL})
        store.write_bytes("obj", b"data")
        # wrong bucket on a live server
        missing = Store.open("s3://no-such-bucket/p", {**server.storage_options, **FAST_FAIL})
        with pytest.raises((StorageError, FileNotFoundError)) as info:
            missing.read_bytes("obj")
        _assert_clean(info.value, (server.secret,))
    finally:
        server.stop()
    for call in (lambda: store.read_bytes("obj"), lambda: store.write_bytes("obj2", b"x"),
                 lambda: store.list(), lambda: store.walk_files(), lambda: store.exists("obj")):
        with pytest.raises(StorageError) as info:
            call()
        _assert_clean(info.value, (server.secret,))
        assert "obj" in str(info.value) or "/p" in str(info.value)


def test_userinfo_url_store_never_shows_secret() -> None:
    secret = "ui-" + uuid.uuid4().hex  # never registered before
    store = Store.open(f"s3://AKIAUSERINFO:{secret}@bucket/x",
                       {"endpoint_url": "http://127.0.0.1:9", **FAST_FAIL})
    assert secret not in store.display_url and secret not in repr(store)
    with pytest.raises(StorageError) as info:
        store.read_bytes("y")
    assert secret not in str(info.value)


def test_redact_urls_and_queries() -> None:
    secret = "s-" + uuid.uuid4().hex  # not registered: the patterns alone must catch it
    text = f"open s3://AKIAX:{secret}@bucket/x failed"
    out = redact(text)
    assert secret not in out and "s3://***@bucket/x" in out
    assert secret not in redact(f"https://user:{secret}@host.example/path")
    for query in (f"X-Amz-Signature={secret}", f"X-Amz-Credential={secret}",
                  f"X-Amz-Security-Token={secret}", f"token={secret}", f"password={secret}",
                  f"secret_key={secret}"):
        out = redact(f"https://host/obj?a=1&{query}&b=2")
        assert secret not in out, out
        assert "a=1" in out and "b=2" in out
    registered = "reg-" + uuid.uuid4().hex
    register_secret(registered)
    assert registered not in redact(f"plain text {registered} and {{'secret': '{registered}'}}")
    assert redact("nothing to hide s3://bucket/x") == "nothing to hide s3://bucket/x"


def test_secret_from_env_and_options_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    env_secret = "env-" + uuid.uuid4().hex
    opt_secret = "opt-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)
    parse_storage_options(json.dumps({"secret": opt_secret, "client_kwargs": {
        "aws_session_token": opt_secret + "t"}}))
    out = redact(f"a {env_secret} b {opt_secret} c {opt_secret}t")
    assert env_secret not in out and opt_secret not in out


def test_manifest_never_holds_a_secret(tmp_path: Path) -> None:
    secret = "m-" + uuid.uuid4().hex  # not registered anywhere
    manifest = Manifest(
        name="ds", source_kind="folder", source_url=f"s3://AKIAM:{secret}@raw/masks",
        height=8, width=8, channels=3, dtype="uint8", resize="center-crop",
        class_names=("a", "b"), splits=(SplitEntry("train", 2),), seed=1, shard_samples=2,
        formats=(FormatEntry(id="png", kind="files", params={}, total_bytes=10,
                             conversion_time_s=0.1, shards=(ShardEntry(
                                 split="train", index=0, samples=2, bytes=10,
                                 path="png/train/shard-00000", index_checksum="blake2b:00"),)),))
    store = Store.open(str(tmp_path / "store"))
    manifest.save(store)
    raw = (tmp_path / "store" / "ds" / "manifest.json").read_bytes()
    assert secret.encode() not in raw
    assert b"s3://***@raw/masks" in raw
    assert secret not in repr(Manifest.load(store, "ds"))


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("text", ['{"secret": "hunter2-very-secret',
                                  '{"key": "hunter2-very-secret",}',
                                  "secret=hunter2-very-secret", '["hunter2-very-secret"]',
                                  '"hunter2-very-secret"', "42", "null"])
def test_parse_storage_options_errors(text: str) -> None:
    with pytest.raises(BadStorageOptions) as info:
        parse_storage_options(text)
    message = str(info.value)
    assert "hunter2" not in message
    assert "\n" not in message and message.strip()
    assert "storage-options" in message
    assert info.value.__cause__ is None  # the JSON error (which quotes the text) is not chained
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_parse_storage_options_ok() -> None:
    assert parse_storage_options(None) == {}
    assert parse_storage_options("") == {}
    assert parse_storage_options('{"anon": true}') == {"anon": True}


# --------------------------------------------------------------------------- containment


@pytest.mark.parametrize("rel", ESCAPES)
def test_path_escapes_refused(rel: str, tmp_path: Path) -> None:
    with pytest.raises(PathEscapeError):
        check_relative(rel)
    store = Store.open(str(tmp_path / "s"))
    if rel:  # "" means the root for store methods
        with pytest.raises(PathEscapeError):
            store.path(rel)
        with pytest.raises(PathEscapeError):
            store.write_bytes(rel, b"x")
        with pytest.raises(PathEscapeError):
            store.read_bytes(rel)
    with pytest.raises(PathEscapeError):
        safe_local_path(tmp_path / "s", rel)
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_relative_paths_accepted(tmp_path: Path) -> None:
    assert check_relative("a/b/../c") == "a/c"
    assert check_relative("./a") == "a"
    assert check_relative("a..b/c") == "a..b/c"
    assert safe_local_path(tmp_path, "a/b") == (tmp_path / "a" / "b").resolve()


def test_safe_local_path_refuses_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "file-link").symlink_to(outside / "secret.txt")
    (root / "inner").mkdir()
    (root / "ok-link").symlink_to(root / "inner", target_is_directory=True)
    with pytest.raises(PathEscapeError):
        safe_local_path(root, "link/secret.txt")
    with pytest.raises(PathEscapeError):
        safe_local_path(root, "file-link")
    assert safe_local_path(root, "ok-link/f") == (root / "inner" / "f").resolve()


def test_storage_options_from_file_and_environment(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """--storage-options JSON, @file, or FORMATLAB_STORAGE_OPTIONS (either form); bad ones
    name where they came from and never show their content."""
    from shared.storage import (STORAGE_OPTIONS_ENV, BadStorageOptions,
                                parse_storage_options, redact)

    opts = {"secret": "env-secret-1234567", "endpoint_url": "http://x"}
    path = tmp_path / "o.json"
    path.write_text(json.dumps(opts))
    monkeypatch.delenv(STORAGE_OPTIONS_ENV, raising=False)
    assert parse_storage_options(None) == {}
    assert parse_storage_options(f"@{path}") == opts
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, f"@{path}")
    assert parse_storage_options(None) == opts
    assert "***" in redact("x env-secret-1234567 y")
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, json.dumps(opts))
    assert parse_storage_options("") == opts
    assert parse_storage_options('{"anon": true}') == {"anon": True}  # the flag wins
    bad = tmp_path / "bad.json"
    bad.write_text('{"secret": "in-a-broken-file-999", ')
    for text, expect in ((f"@{tmp_path / 'missing.json'}", "cannot read"),
                         (f"@{bad}", "not valid JSON"), ("[1]", "must be a JSON object")):
        with pytest.raises(BadStorageOptions, match=expect) as info:
            parse_storage_options(text)
        assert "in-a-broken-file" not in str(info.value)
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, "{oops")
    with pytest.raises(BadStorageOptions, match=STORAGE_OPTIONS_ENV):
        parse_storage_options(None)


@pytest.mark.parametrize("kind", ["local", "s3", "memory"])
def test_fetch_many_verifies_and_renames(kind: str, request: pytest.FixtureRequest,
                                         tmp_path: Path) -> None:
    """Local copies, s3fs's async client and a synchronous remote file system (memory)
    all keep only files that match their checksum and size, under their own names."""
    store = (Store.open(f"memory://fetch-{uuid.uuid4().hex}") if kind == "memory"
             else _store_of(kind, request, tmp_path))
    big = os.urandom(9 << 20)  # over the size fetched whole into memory
    for rel, data in (("d/a", b"hello"), ("d/b", b"world"), ("d/big", big)):
        store.write_bytes(rel, data)
    out = tmp_path / "out"
    out.mkdir()
    items = [FetchItem("d/a", str(out / "a"), checksum_bytes(b"hello"), 5),
             FetchItem("d/b", str(out / "b"), "blake2b:00", None),  # bad checksum
             FetchItem("d/a", str(out / "a2"), checksum_bytes(b"hello"), 4),  # bad size
             FetchItem("d/big", str(out / "big"), checksum_bytes(big), len(big))]
    done: list[int] = []
    assert store.fetch_many(items, threads=2, on_file=done.append) == [5, None, None, len(big)]
    assert sorted(p.name for p in out.iterdir()) == ["a", "big"]  # no temporaries left
    assert (out / "big").read_bytes() == big and sum(done) >= 2
    with pytest.raises(FileNotFoundError, match="d/missing not found"):
        store.fetch_many([FetchItem("d/missing", str(out / "m"), "blake2b:00", 1)])
