"""Raw interaction files for the synthetic generator: tables spread over N files of one format.

``ChunkSink`` takes consecutive tables and writes rows ``bounds[i]:bounds[i + 1]`` into file
``i`` as CSV, Parquet or JSON lines, so that a generator can stream chunks of any size into a fixed
number of files.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _jsonl_bytes(table: pa.Table) -> memoryview:
    """Render a table of numbers and plain words as JSON lines, vectorised in Arrow.

    Every row becomes one string ending in a newline, so the string array's data buffer is the
    file content, with no per-row Python. String values are not escaped: only use it for values
    without quotes, backslashes or control characters.
    """
    parts: list[Any] = []
    for i, field in enumerate(table.schema):
        text = pc.cast(table.column(i), pa.string())
        if pa.types.is_string(field.type):
            text = pc.binary_join_element_wise('"', text, '"', "")
        elif pa.types.is_floating(field.type):  # "4" -> "4.0": readers must not infer ints
            whole = pc.invert(pc.match_substring(text, "."))
            text = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
        parts += [("{" if i == 0 else ",") + json.dumps(field.name) + ":", text]
    lines = pc.binary_join_element_wise(*parts, "}\n", "").combine_chunks()
    _, offsets_buf, data = lines.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[
        lines.offset : lines.offset + len(lines) + 1
    ]
    return memoryview(data)[int(offsets[0]) : int(offsets[-1])]


class ChunkSink:
    """Spread consecutive tables over files: file ``i`` gets rows ``bounds[i]:bounds[i + 1]``.

    Args:
        fmt: ``csv``, ``parquet`` or ``jsonl``.
        paths: One output file per slot.
        bounds: ``len(paths) + 1`` increasing row offsets, from 0 to the total row count.
        schema: Schema of every table written.
        row_group_size: Parquet row group size.
    """

    def __init__(
        self,
        fmt: str,
        paths: list[str],
        bounds: np.ndarray,
        schema: pa.Schema,
        row_group_size: int,
    ) -> None:
        self._fmt = fmt
        self._paths = paths
        self._bounds = bounds
        self._schema = schema
        self._row_group_size = row_group_size
        self._file = -1
        self._written = 0
        self._writer: Any = None

    def write(self, table: pa.Table) -> None:
        """Append ``table``'s rows, moving on to the next file at each bound."""
        offset = 0
        while offset < table.num_rows:
            while self._file < 0 or self._written >= self._bounds[self._file + 1]:
                self._open_next()
            take = min(table.num_rows - offset, int(self._bounds[self._file + 1]) - self._written)
            self._write(table.slice(offset, take))
            offset += take
            self._written += take

    def _open_next(self) -> None:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        self._close_current()
        self._file += 1
        path = self._paths[self._file]
        if self._fmt == "parquet":
            self._writer = pq.ParquetWriter(path, self._schema)
        elif self._fmt == "csv":
            self._writer = pacsv.CSVWriter(
                path, self._schema, write_options=pacsv.WriteOptions(quoting_style="needed")
            )
        else:
            self._writer = open(path, "wb")  # noqa: SIM115 - closed in close()

    def _write(self, table: pa.Table) -> None:
        if self._fmt == "parquet":
            self._writer.write_table(table, row_group_size=self._row_group_size)
        elif self._fmt == "csv":
            self._writer.write_table(table)
        else:
            self._writer.write(_jsonl_bytes(table))

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        """Close the open file and create any file that got no rows (so every path exists)."""
        self._close_current()
        while self._file + 1 < len(self._paths):
            self._open_next()
        self._close_current()
