"""tvr feature store: a Zarr v3 store of items, captions and per-feature arrays (see docs/design.md §1)."""
from store._choices import ChoiceSet
from store.schema import (
    SCHEMA_VERSION,
    CaptionRecord,
    CaptionTable,
    ExtraSpec,
    FeatureBatch,
    FeatureRows,
    FeatureSpec,
    ItemRecord,
    ItemTable,
    Status,
    StoreError,
)
from store.zarr_store import FeatureStore, open_store

__all__ = [
    "SCHEMA_VERSION",
    "CaptionRecord",
    "CaptionTable",
    "ChoiceSet",
    "ExtraSpec",
    "FeatureBatch",
    "FeatureRows",
    "FeatureSpec",
    "FeatureStore",
    "ItemRecord",
    "ItemTable",
    "Status",
    "StoreError",
    "open_store",
]
