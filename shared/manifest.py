"""The dataset manifest: ``<store>/<name>/manifest.json``, written last.

Frozen dataclasses, validated when built and when loaded; a bad file gives a
:class:`ManifestError` naming the field. Paths inside are relative to the dataset
root and checked to stay there.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from shared.storage import PathEscapeError, Store, check_relative, redact_url

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.parquet"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or fails validation."""


def _require(cond: bool, field_name: str, why: str) -> None:
    if not cond:
        raise ManifestError(f"manifest field {field_name!r}: {why}")


def _check_path(value: str, field_name: str) -> None:
    try:
        check_relative(value)
    except PathEscapeError as exc:
        raise ManifestError(f"manifest field {field_name!r}: {exc}") from None


@dataclass(frozen=True)
class FileEntry:
    """A file of a shard that the index does not list (``images.npy``, ``data.h5``...)."""

    path: str  # relative to the shard folder
    bytes: int
    checksum: str

    def __post_init__(self) -> None:
        _check_path(self.path, "files.path")
        _require(self.bytes >= 0, "files.bytes", "must be >= 0")


@dataclass(frozen=True)
class ShardEntry:
    """One committed shard of one format and split."""

    split: str
    index: int
    samples: int
    bytes: int
    path: str  # relative to the dataset root: "<format>/<split>/shard-00000"
    index_checksum: str
    files: tuple[FileEntry, ...] = ()

    def __post_init__(self) -> None:
        _check_path(self.path, "shards.path")
        _require(self.samples >= 0, "shards.samples", "must be >= 0")
        _require(self.index >= 0, "shards.index", "must be >= 0")

    @property
    def index_path(self) -> str:
        return posixpath.join(self.path, INDEX_FILE)


@dataclass(frozen=True)
class FormatEntry:
    """Everything written for one format."""

    id: str
    kind: str
    params: Mapping[str, Any]
    shards: tuple[ShardEntry, ...]
    total_bytes: int
    conversion_time_s: float

    def __post_init__(self) -> None:
        _require(self.kind in ("files", "array", "packed"), "formats.kind",
                 "must be 'files', 'array' or 'packed'")
        _check_path(self.id, "formats.id")

    def split_shards(self, split: str) -> tuple[ShardEntry, ...]:
        return tuple(s for s in self.shards if s.split == split)


@dataclass(frozen=True)
class SplitEntry:
    name: str
    samples: int


@dataclass(frozen=True)
class Reject:
    key: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    """What a committed dataset holds; its presence in the store means "complete"."""

    name: str
    source_kind: str
    source_url: str
    height: int
    width: int
    channels: int
    dtype: str
    resize: str
    class_names: tuple[str, ...]
    splits: tuple[SplitEntry, ...]
    seed: int
    shard_samples: int
    formats: tuple[FormatEntry, ...]
    rejects: tuple[Reject, ...] = ()
    # The split that validates (recorded by prep from the source); None in manifests
    # written before it was recorded, and for datasets without one.
    val_split: str | None = None
    tool_version: str = ""
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _require(self.schema_version == SCHEMA_VERSION, "schema_version",
                 f"is {self.schema_version!r}, this formatlab reads version {SCHEMA_VERSION}")
        _check_path(self.name, "name")
        _require("/" not in self.name, "name", "must be a single folder name")
        for attr in ("height", "width", "channels", "shard_samples"):
            _require(getattr(self, attr) > 0, attr, "must be > 0")
        _require(self.dtype == "uint8", "dtype", "only uint8 images are supported")
        # Keep credentials out of the file whatever the caller passed.
        object.__setattr__(self, "source_url", redact_url(self.source_url))
        ids = [f.id for f in self.formats]
        _require(len(ids) == len(set(ids)), "formats", "format ids repeat")
        _require(self.val_split is None or self.val_split in self.split_names, "val_split",
                 f"{self.val_split!r} is not one of the splits {list(self.split_names)}")

    # -- lookups
    def format(self, format_id: str) -> FormatEntry:
        for f in self.formats:
            if f.id == format_id:
                return f
        raise KeyError(format_id)

    @property
    def format_ids(self) -> tuple[str, ...]:
        return tuple(f.id for f in self.formats)

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.splits)

    def split_samples(self, split: str) -> int:
        for s in self.splits:
            if s.name == split:
                return s.samples
        raise KeyError(split)

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Build and validate a manifest from parsed JSON.

        Raises:
            ManifestError: a field is missing, has the wrong type or a bad value.
        """
        if not isinstance(data, dict):
            raise ManifestError("manifest is not a JSON object")
        version = data.get("schema_version")
        _require(version is not None, "schema_version", "missing")
        _require(version == SCHEMA_VERSION, "schema_version",
                 f"is {version!r}, this formatlab reads version {SCHEMA_VERSION}")
        return _build(cls, data, "")

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # -- store
    def save(self, store: Store) -> None:
        """Write ``<name>/manifest.json`` atomically (the dataset's commit point)."""
        store.write_bytes(posixpath.join(self.name, MANIFEST_FILE), self.to_json().encode())

    @classmethod
    def load(cls, store: Store, name: str) -> "Manifest":
        """Read and validate ``<name>/manifest.json`` from ``store``.

        Raises:
            FileNotFoundError: the dataset has no manifest (not converted or incomplete).
            ManifestError: the manifest is invalid.
        """
        _check_path(name, "name")
        rel = posixpath.join(name, MANIFEST_FILE)
        try:
            raw = store.read_bytes(rel)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"dataset {name!r} not found in {store.display_url} (no {MANIFEST_FILE})"
            ) from None
        manifest = cls.from_json(raw)
        _require(manifest.name == name, "name", f"is {manifest.name!r}, expected {name!r}")
        return manifest


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass ``cls`` from a dict, checking presence and types of fields."""
    if not isinstance(data, dict):
        raise ManifestError(f"manifest field {prefix.rstrip('.') or 'root'!r}: expected an object")
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"manifest field {name!r}: missing")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], name)
    try:
        return cls(**kwargs)
    except ManifestError:
        raise
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest field {prefix.rstrip('.') or 'root'!r}: {exc}") from None


def _convert(tp: Any, value: Any, name: str) -> Any:
    origin = getattr(tp, "__origin__", None)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
    if origin is tuple:
        _require(isinstance(value, list), name, "expected a list")
        (item_tp, _) = tp.__args__
        return tuple(_convert(item_tp, v, name) for v in value)
    if origin in (Mapping, dict) or tp is Mapping:
        _require(isinstance(value, dict), name, "expected an object")
        return dict(value)
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name, "expected an integer")
    elif tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name,
                 "expected a number")
        return float(value)
    elif tp is str:
        _require(isinstance(value, str), name, "expected a string")
    return value

