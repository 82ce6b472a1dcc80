"""The seed's archived import paths, kept as thin re-exports (see ARCHIVED_FEATURES.md)."""
