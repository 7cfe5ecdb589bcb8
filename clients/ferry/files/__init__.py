"""File handling shared by sender and receiver: manifests, path safety, and display of names.

- :mod:`ferry.files.paths` — receiver path safety (sanitizing, collision checks, symlink-safe
  destinations, no silent overwrite).
- :mod:`ferry.files.manifest` — the sender's manifest built from PATH arguments, sizes, chunks.
- :mod:`ferry.files.display` — terminal-safe names and human-readable sizes.
"""

from ferry.files.display import escape_name, format_size, shown, terminal_line
from ferry.files.manifest import (
    ManifestError,
    Scan,
    SourceStamp,
    build_manifest,
    chunk_count,
    free_space_ok,
    scan_sources,
    total_size,
)
from ferry.files.paths import (
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    DestinationExistsError,
    UnsafePathError,
    check_manifest_paths,
    check_no_overwrite,
    local_paths,
    make_parents,
    resolve_destination,
    sanitize_relative_path,
)

__all__ = [
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
