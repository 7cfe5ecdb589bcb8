"""The public surface of ferry.files is exactly what we mean it to be."""

from __future__ import annotations

import ferry.files
from ferry.errors import FerryError


def test_exported_names() -> None:
    assert sorted(ferry.files.__all__) == sorted(
        [
            "MAX_PATH_BYTES",
            "MAX_SEGMENT_BYTES",
            "DestinationExistsError",
            "ManifestError",
            "Scan",
            "SourceStamp",
            "UnsafePathError",
            "build_manifest",
            "check_manifest_paths",
            "check_no_overwrite",
            "chunk_count",
            "escape_name",
            "format_size",
            "free_space_ok",
            "local_paths",
            "make_parents",
            "resolve_destination",
            "sanitize_relative_path",
            "scan_sources",
            "shown",
            "terminal_line",
            "total_size",
        ]
    )
    for name in ferry.files.__all__:
        assert getattr(ferry.files, name) is not None


def test_exception_hierarchy() -> None:
    assert ferry.files.UnsafePathError.__bases__ == (FerryError, ValueError)
    assert ferry.files.DestinationExistsError.__bases__ == (FerryError, FileExistsError)
    assert ferry.files.ManifestError.__bases__ == (FerryError,)
