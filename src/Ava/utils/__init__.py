"""Cross-cutting helpers: logging, checkpoints, metric writers."""
