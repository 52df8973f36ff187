"""The demo's pieces that are cheap to check: its sample dataset and its CPU-sized I3D options."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.config import ExtractConfig
from pipelines.dataset import read_source
from pipelines.demo import CPU_I3D_CONFIG
from pipelines.samples import CORRUPT_ID, make_sample_dataset


def test_sample_dataset_has_every_kind_of_item(tmp_path: Path) -> None:
    from extract import decode

    ds = read_source(make_sample_dataset(tmp_path))
    assert ds.missing == [] and len(ds.captions) == 8
    kinds = {r.id: r.kind for r in ds.items}
    assert sorted(k for k, v in kinds.items() if v == "image") == ["astronaut_still", "coffee"]
    info = {r.id: decode.probe(r.path) for r in ds.items if r.id != CORRUPT_ID}
    assert info["gradient_sound"].has_audio and not info["gradient_silent"].has_audio
    assert info["astronaut_face"].has_audio and info["astronaut_face"].n_frames == 75
    bad = next(r for r in ds.items if r.id == CORRUPT_ID)
    try:
        decode.probe(bad.path)
    except decode.DecodeError:
        pass
    else:
        raise AssertionError("the corrupt sample must not decode")


def test_cpu_i3d_options_are_accepted_and_recorded() -> None:
    from extract import create_extractor  # importing extract registers every extractor

    cfg = ExtractConfig.from_mapping(yaml.safe_load(CPU_I3D_CONFIG))
    for name in ("i3d_rgb", "i3d_flow"):
        opts = cfg.extractor_options[name]
        ex = create_extractor(name, random_init=True, device="cpu", **opts)
        assert (ex.stack_size, ex.step_size, ex.max_steps) == (16, 16, 2)
        recorded = ex.provenance()["options"]  # the deviation from the recipe is in the store
        assert (recorded["stack_size"], recorded["max_steps"]) == (16, 2)
    assert recorded["flow"]["variant"] == "raft_small.C_T_V2" and recorded["flow"]["num_flow_updates"] == 12
