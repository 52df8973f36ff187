"""Ray orchestration of feature extraction and the `tvr-extract` CLI (see docs/cluster.md)."""
