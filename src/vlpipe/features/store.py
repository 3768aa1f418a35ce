"""Memory-mapped feature store: one Apache Arrow IPC file per feature set.

A store is a directory with ``features.arrow`` (one row per image, fixed-size-list columns)
and ``meta.json`` (kind, sizes, row count, column shapes). Opening memory-maps the file and
builds an ``img_id -> row`` dict from the ``img_id`` column; every lookup then returns
zero-copy, read-only NumPy views into the mapping. DataLoader workers that receive a
pickled store reopen the same file, so they all share the OS page cache instead of each
holding a decoded copy: the reference LXMERT loader decodes the whole TSV into Python dicts
(~295 KB per image, 207 GB of RAM reported for 4 workers on COCO), see formats.md §1.

Importers/exporters for the reference formats live here too:

* LXMERT / bottom-up-attention TSV (formats.md §1), round trip byte-identical;
* X-LXMERT grid HDF5: one group per img_id with dataset ``features`` (G, G, D) float32.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import csv
import io
import itertools
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from vlpipe.errors import InputError
from vlpipe.io import atomic_dir, atomic_file, read_json, write_json

SCHEMA_VERSION = 1
FEATURES_FILE = "features.arrow"
META_FILE = "meta.json"
# Rows per Arrow record batch are chosen so that one batch holds about this many bytes:
# the writer keeps only one batch in RAM.
TARGET_BATCH_BYTES = 32 << 20
_SCHEMA_KEY = b"vlpipe"
_RESERVED_META = {
    "kind",
    "schema_version",
    "count",
    "columns",
    "file",
    "num_boxes",
    "grid",
    "dim",
    "dtype",
    "positions",
}

# Field order of the bottom-up-attention / LXMERT TSV (no header), formats.md §1.
LXMERT_TSV_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf",
    "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
)  # fmt: skip
# base64 fields: little-endian dtype and values per box (features: D, known from the data).
_TSV_ARRAYS: dict[str, tuple[np.dtype, int]] = {
    "objects_id": (np.dtype("<i8"), 1),
    "objects_conf": (np.dtype("<f4"), 1),
    "attrs_id": (np.dtype("<i8"), 1),
    "attrs_conf": (np.dtype("<f4"), 1),
    "boxes": (np.dtype("<f4"), 4),
    "features": (np.dtype("<f4"), 0),
}
_TSV_INTS = ("img_h", "img_w", "num_boxes")
TSV_RAW = "tsv_raw"  # text column: the exact source line, kept only where re-encoding would differ


# ------------------------------------------------------------------------ schema


@dataclass(frozen=True)
class Column:
    """One numeric column of a store: a scalar per image or a fixed-shape array per image."""

    name: str
    dtype: str
    shape: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def arrow_type(self) -> pa.DataType:
        value = pa.from_numpy_dtype(np.dtype(self.dtype))
        return value if not self.shape else pa.list_(value, self.size)

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(name: str, spec: Any) -> Column:
        return Column(name, str(spec["dtype"]), tuple(int(s) for s in spec["shape"]))


def region_columns(num_boxes: int, dim: int) -> list[Column]:
    """The LXMERT region schema (formats.md §1) with ``num_boxes`` boxes of ``dim`` features."""
    return [
        Column("img_h", "int64"),
        Column("img_w", "int64"),
        Column("objects_id", "int64", (num_boxes,)),
        Column("objects_conf", "float32", (num_boxes,)),
        Column("attrs_id", "int64", (num_boxes,)),
        Column("attrs_conf", "float32", (num_boxes,)),
        Column("boxes", "float32", (num_boxes, 4)),
        Column("features", "float32", (num_boxes, dim)),
    ]


def grid_columns(grid: int, dim: int) -> list[Column]:
    """The X-LXMERT grid schema: a (grid, grid, dim) feature map per image."""
    return [
        Column("img_h", "int64"),
        Column("img_w", "int64"),
        Column("features", "float32", (grid, grid, dim)),
    ]


def grid_positions(grid: int) -> np.ndarray:
    """(G*G, 4) float32 boxes of grid cells, row-major: cell (i, j) -> (j/G, i/G, (j+1)/G, (i+1)/G).

    The positions X-LXMERT feeds its visual encoder for an 8x8 grid (formats.md §1).
    """
    i, j = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")  # (G, G) each
    boxes = np.stack([j, i, j + 1, i + 1], axis=-1).reshape(grid * grid, 4)  # (G*G, 4)
    return (boxes / grid).astype(np.float32)


# ------------------------------------------------------------------------ writing


def _check_record(
    rec: dict[str, Any], columns: Sequence[Column], text: Sequence[str], seen: set[str]
) -> dict:
    """Validate one record against the schema; return it with arrays cast to the column dtypes."""
    img_id = rec.get("img_id") if isinstance(rec, dict) else None
    if not isinstance(img_id, str) or not img_id:
        raise ValueError(f"record without a non-empty string img_id: {type(rec).__name__} {str(rec)[:80]}")
    expected = {"img_id", *(c.name for c in columns)}
    missing = expected - rec.keys()
    unknown = rec.keys() - expected - set(text)
    if missing or unknown:
        raise ValueError(f"img_id {img_id!r}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    if img_id in seen:
        raise ValueError(f"img_id {img_id!r}: appears twice")
    seen.add(img_id)
    out: dict[str, Any] = {"img_id": img_id}
    for c in columns:
        value = rec[c.name]
        if not c.shape:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"img_id {img_id!r}: {c.name} must be an int, got {value!r}")
            out[c.name] = int(value)
            continue
        arr = np.asarray(value)
        if arr.shape != c.shape:
            raise ValueError(f"img_id {img_id!r}: {c.name} has shape {arr.shape}, expected {c.shape}")
        if arr.dtype != np.dtype(c.dtype):
            if not np.can_cast(arr.dtype, c.dtype, casting="safe"):
                raise ValueError(f"img_id {img_id!r}: {c.name} has dtype {arr.dtype}, expected {c.dtype}")
            arr = arr.astype(c.dtype)
        out[c.name] = arr
    for name in text:
        value = rec.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"img_id {img_id!r}: {name} must be a str or None")
        out[name] = value
    return out


def _to_batch(
    rows: list[dict], schema: pa.Schema, columns: Sequence[Column], text: Sequence[str]
) -> pa.RecordBatch:
    arrays: list[pa.Array] = [pa.array([r["img_id"] for r in rows], pa.string())]
    for c in columns:
        values = np.stack([np.asarray(r[c.name], dtype=c.dtype) for r in rows]).reshape(-1)  # (B * size,)
        # from_buffers wraps the NumPy memory without a copy (pa.array on NumPy imports pandas).
        flat = pa.Array.from_buffers(
            pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)]
        )
        arrays.append(flat if not c.shape else pa.FixedSizeListArray.from_arrays(flat, c.size))
    arrays += [pa.array([r[name] for r in rows], pa.string()) for name in text]
    return pa.record_batch(arrays, schema=schema)


def write_arrow(
    path: Path,
    kind: str,
    columns: Sequence[Column],
    records: Iterable[dict],
    *,
    text_columns: Sequence[str] = (),
    batch_rows: int | None = None,
) -> int:
    """Stream ``records`` into an Arrow IPC file at ``path``; return the number of rows.

    Only one record batch (``batch_rows`` rows, by default about 32 MB) is held in RAM.
    The column specs are also embedded in the schema metadata, so ``meta.json`` can be
    checked against the file at open time. Raises ``ValueError`` naming the img_id of a
    record with a missing/unknown key, a wrong shape or an unsafe dtype.
    """
    empty = [c.name for c in columns if c.size < 1]
    if empty:
        raise ValueError(f"columns {empty} would hold no values: sizes must be positive")
    fields = [pa.field("img_id", pa.string(), nullable=False)]
    fields += [pa.field(c.name, c.arrow_type(), nullable=False) for c in columns]
    fields += [pa.field(name, pa.string()) for name in text_columns]
    embedded = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "columns": {c.name: c.to_json() for c in columns},
    }
    schema = pa.schema(fields, metadata={_SCHEMA_KEY: json.dumps(embedded, sort_keys=True).encode()})
    row_bytes = sum(c.size * np.dtype(c.dtype).itemsize for c in columns) or 1
    rows_per_batch = batch_rows or max(1, TARGET_BATCH_BYTES // row_bytes)
    seen: set[str] = set()
    count = 0
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
        pending: list[dict] = []
        for rec in records:
            pending.append(_check_record(rec, columns, text_columns, seen))
            if len(pending) == rows_per_batch:
                writer.write_batch(_to_batch(pending, schema, columns, text_columns))
                count += len(pending)
                pending = []
        if pending:
            writer.write_batch(_to_batch(pending, schema, columns, text_columns))
            count += len(pending)
    return count


def store_meta(
    kind: str, columns: Sequence[Column], count: int, extra: dict[str, Any], filename: str = FEATURES_FILE
) -> dict[str, Any]:
    """The ``meta.json`` of a store: kind, schema version, row count, column shapes, plus ``extra``."""
    clash = _RESERVED_META & extra.keys()
    if clash:
        raise ValueError(f"extra_meta may not set reserved keys {sorted(clash)}")
    meta = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "count": count,
        "file": filename,
        "columns": {c.name: c.to_json() for c in columns},
    }
    return {**extra, **meta}


def _region_meta(num_boxes: int, dim: int, count: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    meta = store_meta("region", region_columns(num_boxes, dim), count, dict(extra or {}))
    return {**meta, "num_boxes": num_boxes, "dim": dim, "dtype": "float32"}


def _grid_meta(grid: int, dim: int, count: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    meta = store_meta("grid", grid_columns(grid, dim), count, dict(extra or {}))
    positions = "cell (i, j), index i*G + j (row-major): box (j/G, i/G, (j+1)/G, (i+1)/G)"
    return {**meta, "grid": grid, "dim": dim, "dtype": "float32", "positions": positions}


def write_region_store(
    out_dir: Path,
    records: Iterable[dict],
    num_boxes: int,
    dim: int,
    extra_meta: dict | None = None,
    *,
    batch_rows: int | None = None,
) -> None:
    """Write a region store (LXMERT schema, formats.md §1) atomically to ``out_dir``.

    ``records``: dicts with img_id (str), img_h, img_w (int), objects_id (N,) int64,
    objects_conf (N,) float32, attrs_id (N,) int64, attrs_conf (N,) float32, boxes (N, 4)
    float32 pixels x1y1x2y2, features (N, D) float32, streamed in record batches.
    """
    columns = region_columns(num_boxes, dim)
    with atomic_dir(out_dir) as tmp:
        count = write_arrow(tmp / FEATURES_FILE, "region", columns, records, batch_rows=batch_rows)
        write_json(tmp / META_FILE, _region_meta(num_boxes, dim, count, extra_meta))


def write_grid_store(
    out_dir: Path,
    records: Iterable[dict],
    grid: int,
    dim: int,
    extra_meta: dict | None = None,
    *,
    batch_rows: int | None = None,
) -> None:
    """Write a grid store (X-LXMERT: img_id, img_h, img_w, features (G, G, D) float32) atomically."""
    columns = grid_columns(grid, dim)
    with atomic_dir(out_dir) as tmp:
        count = write_arrow(tmp / FEATURES_FILE, "grid", columns, records, batch_rows=batch_rows)
        write_json(tmp / META_FILE, _grid_meta(grid, dim, count, extra_meta))


# ------------------------------------------------------------------------ reading


def _column_views(batch: pa.RecordBatch, c: Column) -> np.ndarray:
    """Zero-copy (rows, *shape) read-only view of one column of a record batch.

    Built with ``np.frombuffer`` on the Arrow data buffer (``to_numpy`` would import pandas,
    ~40 MB per worker process).
    """
    arr = batch.column(c.name)
    if arr.null_count:
        raise ValueError(f"column {c.name} has null entries")
    dtype = np.dtype(c.dtype)
    values, first = (arr.values, arr.offset * c.size) if c.shape else (arr, 0)
    count = len(arr) * c.size  # size is 1 for a scalar column
    offset = (values.offset + first) * dtype.itemsize
    flat = np.frombuffer(values.buffers()[1], dtype=dtype, count=count, offset=offset)  # over the mapping
    return flat.reshape(len(arr), *c.shape)


def _schema_problem(schema: pa.Schema, kind: str, columns: Sequence[Column]) -> str | None:
    """Why ``schema`` disagrees with what meta.json says, or None."""
    raw = (schema.metadata or {}).get(_SCHEMA_KEY)
    if raw is None:
        return "no vlpipe schema metadata in the file"
    try:
        embedded = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "corrupt vlpipe schema metadata in the file"
    if not isinstance(embedded, dict):
        return "corrupt vlpipe schema metadata in the file"
    declared = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "columns": {c.name: c.to_json() for c in columns},
    }
    for key, value in declared.items():
        if embedded.get(key) != value:
            return f"meta.json says {key}={value!r}, the file says {embedded.get(key)!r}"
    if "img_id" not in schema.names or schema.field("img_id").type != pa.string():
        return "no string img_id column"
    for c in columns:
        if c.name not in schema.names:
            return f"column {c.name} missing"
        if schema.field(c.name).type != c.arrow_type():
            return f"column {c.name} has type {schema.field(c.name).type}, expected {c.arrow_type()}"
    return None


def _read_store_meta(meta_path: Path, filename: str) -> tuple[dict[str, Any], str, int, list[Column]]:
    """meta.json of a store: (meta, kind, count, columns); InputError naming it if malformed."""
    meta = read_json(meta_path)
    try:
        kind, count = str(meta["kind"]), int(meta["count"])
        columns = [Column.from_json(n, s) for n, s in meta["columns"].items()]
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise InputError(meta_path, f"not a feature-store meta.json (kind/count/columns): {e!r}") from e
    if meta.get("file", filename) != filename:
        raise InputError(meta_path, f"describes {meta['file']!r}, not {filename!r}")
    return meta, kind, count, columns


def _map_arrow(path: Path) -> tuple[pa.MemoryMappedFile, pa.Schema, list[pa.RecordBatch]]:
    """Memory-map an Arrow IPC file and check its structure; InputError if truncated/corrupt."""
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        mmap = pa.memory_map(str(path), "r")
        reader = ipc.open_file(mmap)
        schema = reader.schema
        schema.names  # noqa: B018 -- decodes every field name: corrupt bytes fail here, not later
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        for b in batches:
            b.validate(full=True)  # offsets, lengths, UTF-8 of the ids; float values are not read
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"not a readable Arrow IPC file (truncated or corrupt): {e}") from e
    return mmap, schema, batches


@dataclass
class _Opened:
    """The memory-mapped state of an open store (rebuilt lazily in each worker process)."""

    mmap: pa.MemoryMappedFile
    meta: dict[str, Any]
    columns: list[Column]
    batches: list[pa.RecordBatch]
    starts: list[int]  # first row of each batch
    views: dict[str, list[np.ndarray]]  # column -> per batch (rows, *shape) views
    ids: tuple[str, ...]
    index: dict[str, int]

    @staticmethod
    def load(arrow_path: Path, meta_path: Path) -> _Opened:
        meta, kind, count, columns = _read_store_meta(meta_path, arrow_path.name)
        mmap, schema, batches = _map_arrow(arrow_path)
        problem = _schema_problem(schema, kind, columns)
        rows = sum(b.num_rows for b in batches)
        if problem is None and rows != count:
            problem = f"meta.json says count={count}, the file has {rows} rows"
        if problem is not None:
            raise InputError(arrow_path, f"disagrees with {meta_path.name}: {problem}")
        try:
            views = {c.name: [_column_views(b, c) for b in batches] for c in columns}
        except (pa.ArrowException, ValueError) as e:
            raise InputError(arrow_path, f"corrupt column data: {e}") from e
        ids = tuple(i for b in batches for i in b.column("img_id").to_pylist())
        index = {img_id: row for row, img_id in enumerate(ids)}
        if len(index) != len(ids):
            raise InputError(arrow_path, "duplicate img_id values")
        starts = list(itertools.accumulate((b.num_rows for b in batches[:-1]), initial=0)) if batches else []
        return _Opened(mmap, meta, columns, batches, starts, views, ids, index)

    def locate(self, row: int) -> tuple[int, int]:
        """(batch, offset in batch) of a global row."""
        b = bisect.bisect_right(self.starts, row) - 1
        return b, row - self.starts[b]

    def text(self, batch: int, name: str) -> list[str | None] | None:
        """A text column of one batch as Python strings, or None if the store has no such column."""
        if name not in self.batches[batch].schema.names:
            return None
        return self.batches[batch].column(name).to_pylist()


class FeatureStore:
    """Read-only, memory-mapped view of a feature store directory.

    ``store[img_id]`` returns ``{column: ndarray}`` zero-copy read-only views, reshaped to the
    column shapes (scalars such as img_h/img_w are 0-d arrays). Pickling keeps only the path;
    the unpickled copy reopens the file on first use, so DataLoader workers share the page
    cache rather than RAM copies.
    """

    def __init__(self, directory: str | Path, filename: str = FEATURES_FILE) -> None:
        self.directory = Path(directory)
        self.filename = filename
        self._state: _Opened | None = None

    @classmethod
    def open(cls, directory: str | Path, filename: str = FEATURES_FILE) -> FeatureStore:
        """Open (and validate) the store in ``directory``; raises InputError on a bad file."""
        store = cls(directory, filename)
        store._opened()
        return store

    @property
    def path(self) -> Path:
        return self.directory / self.filename

    def _opened(self) -> _Opened:
        if self._state is None:
            self._state = _Opened.load(self.path, self.directory / META_FILE)
        return self._state

    @property
    def meta(self) -> dict[str, Any]:
        return self._opened().meta

    @property
    def ids(self) -> tuple[str, ...]:
        return self._opened().ids

    @property
    def columns(self) -> list[Column]:
        return list(self._opened().columns)

    def __len__(self) -> int:
        return len(self._opened().ids)

    def __contains__(self, img_id: object) -> bool:
        return img_id in self._opened().index

    def index(self, img_id: str) -> int:
        """Row of ``img_id``; KeyError naming the store if absent."""
        try:
            return self._opened().index[img_id]
        except KeyError:
            raise KeyError(f"img_id {img_id!r} not in {self.path}") from None

    def row(self, row: int) -> dict[str, np.ndarray]:
        """Zero-copy views of one row by position."""
        state = self._opened()
        if not 0 <= row < len(state.ids):
            raise IndexError(f"row {row} out of range for {self.path} ({len(state.ids)} rows)")
        b, o = state.locate(row)
        return {c.name: state.views[c.name][b][o : o + 1].reshape(c.shape) for c in state.columns}

    def __getitem__(self, img_id: str) -> dict[str, np.ndarray]:
        return self.row(self.index(img_id))

    def get_many(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Stack the rows of ``ids`` into (B, *shape) arrays (copies, one per column)."""
        state = self._opened()
        rows = [self.index(i) for i in ids]
        out = {c.name: np.empty((len(rows), *c.shape), dtype=c.dtype) for c in state.columns}
        for k, row in enumerate(rows):
            b, o = state.locate(row)
            for c in state.columns:
                out[c.name][k] = state.views[c.name][b][o]
        return out

    def normalized_boxes(self, img_id: str) -> np.ndarray:
        """(N, 4) float32 boxes with x divided by img_w and y by img_h (LXMERT does this at load time)."""
        rec = self[img_id]
        if "boxes" not in rec:
            raise KeyError(f"{self.path} has no boxes column (kind={self.meta.get('kind')!r})")
        if int(rec["img_w"]) <= 0 or int(rec["img_h"]) <= 0:
            raise ValueError(f"img_id {img_id!r} in {self.path}: image size unknown, cannot normalise boxes")
        scale = np.array([rec["img_w"], rec["img_h"], rec["img_w"], rec["img_h"]], dtype=np.float32)  # (4,)
        return rec["boxes"] / scale  # (N, 4)

    def iter_batches(self) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
        """Yield (ids, {column: (rows, *shape) zero-copy view}) per record batch, in row order."""
        state = self._opened()
        for b, start in enumerate(state.starts):
            n = state.batches[b].num_rows
            yield list(state.ids[start : start + n]), {c.name: state.views[c.name][b] for c in state.columns}

    def close(self) -> None:
        """Drop this handle's mapping (views already handed out keep their buffers alive)."""
        if self._state is not None:
            self._state.mmap.close()
            self._state = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Only the location travels to a worker: it maps the file itself, sharing the page cache.
        return {"directory": str(self.directory), "filename": self.filename}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.directory = Path(state["directory"])
        self.filename = state["filename"]
        self._state = None

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.directory)!r}, filename={self.filename!r})"


def _require_kind(store: FeatureStore, kind: str) -> None:
    if store.meta.get("kind") != kind:
        raise InputError(store.path, f"expected a {kind} store, found kind={store.meta.get('kind')!r}")


# ------------------------------------------------------------------------ LXMERT TSV


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Raise csv's per-field size limit for the duration (feature fields are ~400 KB)."""
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


class _LineRecorder:
    """Iterate a text file's physical lines, remembering those csv consumed for the current row."""

    def __init__(self, f: TextIO) -> None:
        self._f = f
        self._lines: list[str] = []

    def __iter__(self) -> _LineRecorder:
        return self

    def __next__(self) -> str:
        line = next(self._f)
        self._lines.append(line)
        return line

    def take(self) -> str:
        text = "".join(self._lines)
        self._lines.clear()
        return text


def _tsv_rows(path: Path, f: TextIO) -> Iterator[tuple[int, list[str], str]]:
    """Yield (line number, fields, exact source text incl. terminator) per TSV row."""
    lines = _LineRecorder(f)
    reader = csv.reader(lines, delimiter="\t")
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as e:
            raise InputError(path, f"line {start}: unreadable TSV: {e}") from e
        yield start, fields, lines.take()
        start = reader.line_num + 1


def _line_terminator(raw: str) -> str:
    for term in ("\r\n", "\n", "\r"):
        if raw.endswith(term):
            return term
    return "\r\n"  # a lone unterminated line: Python's csv default (that line is kept verbatim)


def _plain(field: str) -> bool:
    """True if Python's csv writer (QUOTE_MINIMAL, tab) writes ``field`` unquoted, as is."""
    return bool(field) and not any(c in field for c in ("\t", '"', "\r", "\n"))  # C-speed scans


def _tsv_line(fields: Sequence[str], terminator: str) -> str:
    """Serialise one row exactly as Python's csv writer with delimiter tab does.

    The writer's per-character quoting scan of the ~400 KB base64 fields dominates
    import/export time, so rows whose fields all go out unquoted are joined directly.
    """
    if all(_plain(f) for f in fields):
        return "\t".join(fields) + terminator
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t", lineterminator=terminator).writerow(fields)
    return buf.getvalue()


@dataclass
class _TsvLayout:
    """Sizes fixed by the first line; every later line must agree."""

    num_boxes: int
    dim: int
    terminator: str
    verbatim: int = 0


def _tsv_layout(path: Path, line: int, fields: list[str], raw: str) -> _TsvLayout:
    img_id = fields[0] if fields else ""
    if len(fields) != len(LXMERT_TSV_FIELDS):
        raise InputError(
            path, f"line {line}: img_id {img_id!r}: {len(fields)} fields, expected {len(LXMERT_TSV_FIELDS)}"
        )
    named = dict(zip(LXMERT_TSV_FIELDS, fields, strict=True))
    num_boxes = _tsv_int(path, line, img_id, "num_boxes", named["num_boxes"])
    if num_boxes <= 0:
        raise InputError(path, f"line {line}: img_id {img_id!r}: num_boxes must be positive, got {num_boxes}")
    nbytes = len(_b64(path, line, img_id, "features", named["features"]))
    if nbytes == 0 or nbytes % (4 * num_boxes):
        raise InputError(
            path, f"line {line}: img_id {img_id!r}: features has {nbytes} bytes, not num_boxes x D float32"
        )
    return _TsvLayout(num_boxes, nbytes // (4 * num_boxes), _line_terminator(raw))


def _tsv_int(path: Path, line: int, img_id: str, name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(
            path, f"line {line}: img_id {img_id!r}: {name} is not an integer: {text[:40]!r}"
        ) from None


def _b64(path: Path, line: int, img_id: str, name: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(path, f"line {line}: img_id {img_id!r}: {name} is not valid base64: {e}") from None


def _tsv_record(path: Path, line: int, fields: list[str], raw: str, layout: _TsvLayout) -> dict[str, Any]:
    """Decode one TSV row into a store record (with the raw line where re-encoding would differ)."""
    img_id = fields[0] if fields else ""
    where = f"line {line}: img_id {img_id!r}"
    if len(fields) != len(LXMERT_TSV_FIELDS):
        raise InputError(
            path, f"{where}: {len(fields)} fields, expected {len(LXMERT_TSV_FIELDS)} (truncated line?)"
        )
    named = dict(zip(LXMERT_TSV_FIELDS, fields, strict=True))
    ints = {name: _tsv_int(path, line, img_id, name, named[name]) for name in _TSV_INTS}
    if ints["num_boxes"] != layout.num_boxes:
        raise InputError(
            path,
            f"{where}: num_boxes {ints['num_boxes']} differs from {layout.num_boxes} on the first line "
            "(the store keeps a fixed number of boxes per image)",
        )
    canonical = all(str(ints[name]) == named[name] for name in _TSV_INTS)
    rec: dict[str, Any] = {"img_id": img_id, "img_h": ints["img_h"], "img_w": ints["img_w"]}
    for name, (dtype, width) in _TSV_ARRAYS.items():
        data = _b64(path, line, img_id, name, named[name])
        per_box = width or layout.dim
        expected = layout.num_boxes * per_box * dtype.itemsize
        if len(data) != expected:
            raise InputError(
                path,
                f"{where}: {name} has {len(data)} bytes, expected {expected} for num_boxes={layout.num_boxes}",
            )
        arr = np.frombuffer(data, dtype=dtype)  # (N * per_box,)
        rec[name] = arr.reshape(layout.num_boxes, per_box) if width != 1 else arr
        canonical = canonical and base64.b64encode(data).decode("ascii") == named[name]
    # Keep the exact source text only where our writer would not reproduce it byte for byte.
    same = canonical and _tsv_line(fields, layout.terminator) == raw
    rec[TSV_RAW] = None if same else raw
    layout.verbatim += 0 if same else 1
    return rec


def import_lxmert_tsv(tsv_path: Path, out_dir: Path) -> dict:
    """Import an LXMERT / bottom-up-attention TSV (formats.md §1) into a region store.

    Streams the file (``csv.field_size_limit(sys.maxsize)`` while reading), decodes the
    base64 fields with their reference dtypes and writes ``out_dir`` atomically. The line
    terminator and field order are kept in ``meta.json["tsv"]`` and any line our writer
    would not reproduce byte for byte is stored verbatim, so export gives the same bytes.
    Returns ``{count, num_boxes, dim, verbatim_lines}``. A line with the wrong field count,
    bad base64 or a wrong byte length raises InputError naming file, line and img_id.
    """
    tsv_path = Path(tsv_path)
    if not tsv_path.is_file():
        raise InputError(tsv_path, "file not found")
    with _csv_field_limit(sys.maxsize), open(tsv_path, encoding="utf-8", newline="") as f:
        rows = _tsv_rows(tsv_path, f)
        first = next(rows, None)
        if first is None:
            raise InputError(tsv_path, "empty file: no image lines")
        layout = _tsv_layout(tsv_path, *first)
        stream = (_tsv_record(tsv_path, *row, layout) for row in itertools.chain([first], rows))
        columns = region_columns(layout.num_boxes, layout.dim)
        with atomic_dir(out_dir) as tmp:
            count = write_arrow(tmp / FEATURES_FILE, "region", columns, stream, text_columns=(TSV_RAW,))
            tsv_meta = {
                "source": tsv_path.name,
                "fields": list(LXMERT_TSV_FIELDS),
                "delimiter": "\t",
                "lineterminator": layout.terminator,
                "verbatim_lines": layout.verbatim,
            }
            write_json(tmp / META_FILE, _region_meta(layout.num_boxes, layout.dim, count, {"tsv": tsv_meta}))
    return {
        "count": count,
        "num_boxes": layout.num_boxes,
        "dim": layout.dim,
        "verbatim_lines": layout.verbatim,
    }


def _tsv_fields(img_id: str, rec: dict[str, np.ndarray], num_boxes: int) -> dict[str, str]:
    """Encode one store row as the text fields of an LXMERT TSV line."""
    fields = {"img_id": img_id, "img_h": str(int(rec["img_h"])), "img_w": str(int(rec["img_w"]))}
    fields["num_boxes"] = str(num_boxes)
    for name, (dtype, _) in _TSV_ARRAYS.items():
        data = np.ascontiguousarray(rec[name], dtype=dtype).tobytes()  # raw C-order bytes
        fields[name] = base64.b64encode(data).decode("ascii")
    return fields


def export_lxmert_tsv(store_dir: Path, tsv_path: Path) -> None:
    """Write a region store as an LXMERT TSV (formats.md §1), atomically.

    A store imported by :func:`import_lxmert_tsv` gives back the source file byte for byte
    (same field order, line terminator, and the verbatim lines it kept); other stores are
    written the way Python's csv writer with delimiter tab does (``\\r\\n`` line endings).
    """
    store = FeatureStore.open(store_dir)
    _require_kind(store, "region")
    tsv_meta = store.meta.get("tsv") or {}
    order = tsv_meta.get("fields", list(LXMERT_TSV_FIELDS))
    terminator = tsv_meta.get("lineterminator", "\r\n")
    if sorted(order) != sorted(LXMERT_TSV_FIELDS) or terminator not in ("\r\n", "\n", "\r"):
        raise InputError(
            store.directory / META_FILE, f"bad tsv fields/lineterminator: {order!r}, {terminator!r}"
        )
    num_boxes = int(store.meta["num_boxes"])
    state = store._opened()
    with atomic_file(tsv_path, "w", encoding="utf-8", newline="") as f:
        for b, (ids, arrays) in enumerate(store.iter_batches()):
            raws = state.text(b, TSV_RAW) or [None] * len(ids)
            for o, (img_id, raw) in enumerate(zip(ids, raws, strict=True)):
                if raw is not None:
                    f.write(raw)
                    continue
                fields = _tsv_fields(img_id, {k: v[o] for k, v in arrays.items()}, num_boxes)
                f.write(_tsv_line([fields[name] for name in order], terminator))


# ------------------------------------------------------------------------ X-LXMERT HDF5


def _h5_grid(path: Path, f: h5py.File, img_id: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """Read and check ``f[img_id]/features``: (G, G, D) float32, same shape as the first entry."""
    group = f.get(img_id)
    if not isinstance(group, h5py.Group) or not isinstance(group.get("features"), h5py.Dataset):
        raise InputError(path, f"img_id {img_id!r}: no 'features' dataset in its group")
    ds = group["features"]
    if len(ds.shape) != 3 or ds.shape[0] != ds.shape[1] or (shape is not None and ds.shape != shape):
        want = "(G, G, D)" if shape is None else str(shape)
        raise InputError(path, f"img_id {img_id!r}: features has shape {ds.shape}, expected {want}")
    if not np.can_cast(ds.dtype, np.float32, casting="safe"):
        raise InputError(path, f"img_id {img_id!r}: features has dtype {ds.dtype}, expected float32")
    try:
        return np.asarray(ds[()], dtype=np.float32)  # (G, G, D)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(path, f"img_id {img_id!r}: unreadable features data: {e}") from e


def _h5_size(group: h5py.Group, name: str) -> int:
    """Image size from an optional group attribute (the reference files carry none: 0 = unknown)."""
    value = group.attrs.get(name, 0)
    return int(value) if np.ndim(value) == 0 else 0


def _h5_records(path: Path, f: h5py.File, ids: Sequence[str], shape: tuple[int, ...]) -> Iterator[dict]:
    for img_id in ids:
        feats = _h5_grid(path, f, img_id, shape)
        group = f[img_id]
        yield {
            "img_id": img_id,
            "img_h": _h5_size(group, "img_h"),
            "img_w": _h5_size(group, "img_w"),
            "features": feats,
        }


def import_xlxmert_hdf5(h5_path: Path, out_dir: Path) -> dict:
    """Import X-LXMERT grid features (one group per img_id with ``features`` (G, G, D)) into a grid store.

    Entries are streamed in the file's key order. img_h/img_w come from the group
    attributes of that name when present, else 0 (the reference files do not record them).
    Returns ``{count, grid, dim}``; a missing, misshaped or unreadable entry raises
    InputError naming the file and the img_id.
    """
    h5_path = Path(h5_path)
    if not h5_path.is_file():
        raise InputError(h5_path, "file not found")
    try:
        f = h5py.File(h5_path, "r")
    except OSError as e:
        raise InputError(h5_path, f"not a readable HDF5 file: {e}") from e
    with f:
        ids = list(f.keys())
        if not ids:
            raise InputError(h5_path, "no image groups")
        shape = _h5_grid(h5_path, f, ids[0], None).shape  # (G, G, D)
        grid, dim = int(shape[0]), int(shape[2])
        records = _h5_records(h5_path, f, ids, shape)
        extra = {"hdf5": {"source": h5_path.name}}
        write_grid_store(out_dir, records, grid, dim, extra)
    return {"count": len(ids), "grid": grid, "dim": dim}


def export_xlxmert_hdf5(store_dir: Path, h5_path: Path) -> None:
    """Write a grid store as an X-LXMERT HDF5 file (group per img_id, dataset ``features``), atomically.

    Known image sizes (non-zero) are added as group attributes img_h/img_w, which the
    reference reader ignores.
    """
    store = FeatureStore.open(store_dir)
    _require_kind(store, "grid")
    with atomic_file(h5_path, "w+b") as fobj, h5py.File(fobj, "w") as f:
        for ids, arrays in store.iter_batches():
            for o, img_id in enumerate(ids):
                group = f.create_group(img_id)
                group.create_dataset("features", data=arrays["features"][o])  # (G, G, D)
                for name in ("img_h", "img_w"):
                    if int(arrays[name][o]):
                        group.attrs[name] = int(arrays[name][o])
