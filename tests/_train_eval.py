"""A run's split scored directly with `model.similarity`: the reference `tvr-train eval` is checked against."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch


def direct_metrics(run: Path, url: str, split: str, seeds: Iterable[int]) -> list[dict[str, dict[str, float]]]:
    """retrieval_metrics of `split` for each T-MASS noise seed, from best.pt, keyed by caption / item ids."""
    from store.zarr_store import FeatureStore
    from train.config import config_from_run_yaml
    from train.data import StoreData, id_keys
    from train.engine import build_model
    from train.metrics import retrieval_metrics

    cfg, _ = config_from_run_yaml(Path(run) / "config.yaml")
    st = FeatureStore.open(url)
    data = StoreData(st, cfg.model)
    model = build_model(cfg, data)
    model.load_state_dict(torch.load(Path(run) / "best.pt", weights_only=True)["model"])
    model.eval()
    es = data.eval_set(split)
    caps = np.asarray(st.captions().id).astype(str)[es.captions]
    items = np.asarray(st.items().id).astype(str)[es.items]
    keys = {"text_keys": torch.from_numpy(id_keys(caps)), "video_keys": torch.from_numpy(id_keys(items))}
    with torch.no_grad():
        te = model.encode_text(data.text_batch(es.captions))
        ve = model.encode_video(data.video_batch(es.items))
        return [retrieval_metrics(model.similarity(te, ve, seed=s, **keys), torch.from_numpy(es.query_item))
                for s in seeds]
