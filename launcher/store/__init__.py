"""Whose directory is this: atomic publishing, ownership, checksums, run identity, the run directory's layout and its claim."""
