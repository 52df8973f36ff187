"""CLIP fine-tuning (train/finetune*.py, train/models/clip_video.py): it learns, frame choice and transforms as the
reference's, parameter groups, one encoding per test video, resume, evaluation and refused runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_CLIP, make_shapes_store
from train.cli import main
from train.finetune_config import build
from train.finetune_data import choose_steps, crop_params, eval_pixels, train_pixels

TINY = dict(clip_model="tvr-tiny", clip_model_cfg=TINY_CLIP, random_init=True, num_frames=4, batch_size=16,
            weight_decay=0.0, seed=0, device="cpu", prefetch=1)


def _cfg(**kw):  # type: ignore[no-untyped-def]
    return build({**TINY, **kw})


def test_choose_steps_segments_middles_and_random_picks() -> None:
    mask = np.zeros((2, 10), bool)
    mask[0, :8] = True
    mask[1, :3] = True
    mid = choose_steps(mask, 4, None)
    assert mid[0].tolist() == [0, 2, 4, 6]  # segments [0,2) [2,4) [4,6) [6,8): middles (hi - 1 - lo) // 2
    assert mid[1].tolist() == [0, 0, 1, 2]  # 3 steps into 4 segments: steps repeat
    u = np.array([[0.99] * 4, [0.0] * 4])
    rnd = choose_steps(mask, 4, u)
    assert rnd[0].tolist() == [1, 3, 5, 7] and rnd[1].tolist() == [0, 0, 1, 2]
    for seg in range(4):  # uniform draws cover exactly the segment's steps
        got = {int(choose_steps(mask[:1], 4, np.full((1, 4), q))[0, seg]) for q in np.linspace(0, 0.999, 50)}
        assert got == {2 * seg, 2 * seg + 1}


def test_crop_params_follow_random_resized_crop_bounds() -> None:
    p = crop_params(np.random.default_rng(0), 2000, 32)
    top, left, h, w, flip = p.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 32**2
    assert area.min() >= 0.45 and area.max() <= 1.0 and 0.4 < flip.mean() < 0.6
    ratio = w / h
    assert ratio.min() >= 0.75 * 0.85 and ratio.max() <= 4 / 3 / 0.85  # rounding of small boxes


def test_train_and_eval_pixels_equal_torchvision_ops() -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    rng = np.random.default_rng(1)
    frames = torch.from_numpy(rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8))
    crops = np.array([[2, 3, 10, 12, 1], [0, 0, 16, 16, 0]])
    got = train_pixels(frames, crops, 16)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    for v in range(2):
        for f in range(3):
            img = frames[v, f].permute(2, 0, 1).float() / 255
            t, l, h, w, flip = crops[v]
            ref = TF.resized_crop(img, t, l, h, w, [16, 16], InterpolationMode.BILINEAR, antialias=True)
            ref = TF.hflip(ref) if flip else ref
            torch.testing.assert_close(got[v, f], (ref - mean) / std)
    torch.testing.assert_close(eval_pixels(frames, 16)[1], got[1])  # whole-frame crop, no flip = test transform


def test_param_groups_are_the_references(shapes_store) -> None:  # type: ignore[no-untyped-def]
    from train.finetune import make_session

    s = make_session(_cfg(lr=3e-5, clip_lr=1e-6), shapes_store, shapes_store.url)
    groups = {g["name"]: g for g in s.opt.param_groups}
    clip_ids = {id(p) for p in s.model.clip.parameters() if p.requires_grad}
    assert {id(p) for p in groups["clip"]["params"]} == clip_ids and groups["clip"]["lr"] == 1e-6
    assert groups["head"]["lr"] == 3e-5 and all(id(p) not in clip_ids for p in groups["head"]["params"])
    assert groups["logit_scale"]["params"][0] is s.model.logit_scale and groups["logit_scale"]["lr"] == 1e-6
    assert not s.model.clip.logit_scale.requires_grad  # the head's scale is the one trained and clamped
    assert all(g["weight_decay"] == 0.0 for g in s.opt.param_groups)  # TINY sets 0; default 0.2 below
    assert build({}).weight_decay == 0.2 and build({}).clip_lr == 1e-6 and build({}).warmup == 0.1


def test_evaluation_encodes_each_video_and_text_once(shapes_store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from train import finetune as FT

    s = FT.make_session(_cfg(model="tmass"), shapes_store, shapes_store.url)
    calls = {"image": 0, "text": 0}
    enc_i, enc_t = s.model.clip.encode_image, s.model.clip.encode_text

    def count_i(x, **kw):  # type: ignore[no-untyped-def]
        calls["image"] += x.shape[0]
        return enc_i(x, **kw)

    def count_t(x, **kw):  # type: ignore[no-untyped-def]
        calls["text"] += x.shape[0]
        return enc_t(x, **kw)

    monkeypatch.setattr(s.model.clip, "encode_image", count_i)
    monkeypatch.setattr(s.model.clip, "encode_text", count_t)
    m = FT.evaluate(s, "test")
    n = len(s.data.split_items("test"))
    assert calls == {"image": n * 4, "text": m["n_queries"]} and m["n_videos"] == n
    t, v, query, caps, items = FT.encode_split(s, "test")
    from train.data import id_keys

    sim = s.model.similarity(t, v, text_keys=torch.from_numpy(id_keys(s.data.cap_ids[caps])),
                             video_keys=torch.from_numpy(id_keys(s.data.item_ids[items])))
    brute = torch.empty_like(sim)  # leak-free per pair: max over trials of cos(t + eps R(t|v), pool(v|t))
    for j in range(len(items)):
        eps = s.model.eval_noise(torch.from_numpy(id_keys(s.data.cap_ids[caps])),
                                 torch.from_numpy(id_keys(s.data.item_ids[items[j : j + 1]])), s.model.config.eval_seed)
        pooled = s.model.pool(t["t"], v["frames"][j : j + 1], v["frames_mask"][j : j + 1])[0]
        r = s.model.radius(s.model.frame_cosines(t["t"], v["frames"][j : j + 1], v["frames_mask"][j : j + 1])[0])
        samples = t["t"][:, None] + eps[:, 0] * r[:, None]
        brute[:, j] = torch.nn.functional.cosine_similarity(samples, pooled[:, None], dim=-1).max(1).values
    torch.testing.assert_close(sim, brute, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fine_tuning_learns_and_beats_the_frozen_model(shapes_store, tmp_path: Path) -> None:
    """Tiny random-init CLIP on moving coloured shapes: fine-tuned t2v R@1 far above chance and the frozen model."""
    from train.finetune import fit

    common = dict(model="xpool", epochs=12, lr=3e-3, val_split="", model_config={"logit_scale_init": math.log(20)})
    tuned = fit(_cfg(clip_lr=3e-3, **common), shapes_store, shapes_store.url, tmp_path / "tuned", log=lambda m: None)
    frozen = fit(_cfg(clip_lr=0.0, **common), shapes_store, shapes_store.url, tmp_path / "frozen", log=lambda m: None)
    chance = 100.0 / tuned["n_videos"]
    assert tuned["t2v"]["R@1"] >= 3 * chance, tuned["t2v"]
    assert tuned["t2v"]["R@1"] >= frozen["t2v"]["R@1"] + 2 * chance, (tuned["t2v"], frozen["t2v"])
    assert tuned["t2v"]["MnR"] < frozen["t2v"]["MnR"]


@pytest.mark.slow
def test_cli_train_stop_resume_equals_uninterrupted_and_eval(shapes_store, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**{k: v for k, v in TINY.items() if k != "random_init"}, "epochs": 2,
                                   "lr": 1e-3, "clip_lr": 1e-3, "val_split": "val"}))
    base = ["tmass", "--finetune-clip", "--store", shapes_store.url, "--config", str(cfg), "--random-init"]
    assert main([*base, "--out", str(tmp_path / "full")]) == 0
    assert main([*base, "--out", str(tmp_path / "cut"), "--stop-after", "1"]) == 0
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert main(["tmass", "--finetune-clip", "--out", str(tmp_path / "cut"), "--resume", "--lr", "0.1"]) == 2  # changed
    other = make_shapes_store(tmp_path / "other.zarr", per_combo_train=1)
    assert main(["tmass", "--finetune-clip", "--out", str(tmp_path / "cut"), "--resume", "--store", other.url]) == 2
    assert main(["tmass", "--finetune-clip", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert main(["eval", str(tmp_path / "full")]) == 0
    ev = json.loads((tmp_path / "full" / "metrics_test.json").read_text())
    assert ev["t2v"] == json.loads((tmp_path / "full" / "metrics.json").read_text())["t2v"]
    assert {"loss.png", "recall.png", "best.pt", "config.yaml"} <= {p.name for p in (tmp_path / "full").iterdir()}


def test_refused_runs_name_the_problem(shapes_store, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from store.schema import CaptionRecord, ItemRecord
    from store.zarr_store import FeatureStore

    bare = FeatureStore.create(str(tmp_path / "bare.zarr"), [ItemRecord("a", "a.mp4", split="train")],
                               [CaptionRecord("a#0", "a", "x")])
    assert main(["xpool", "--finetune-clip", "--store", bare.url, "--out", str(tmp_path / "r1"), "--random-init"]) == 2
    assert "--features frames" in capsys.readouterr().err
    assert main(["xpool", "--finetune-clip", "--store", shapes_store.url, "--out", str(tmp_path / "r2"),
                 "--clip-model", "No-Such-Net", "--random-init"]) == 2
    assert "unknown open_clip model 'No-Such-Net'" in capsys.readouterr().err
    assert main(["xpool", "--finetune-clip", "--store", shapes_store.url, "--out", str(tmp_path / "r3"),
                 "--clip-pretrained", "no-such-tag"]) == 2
    err = capsys.readouterr().err
    assert "neither a file nor an open_clip tag" in err and "--random-init" in err
    (tmp_path / "file").write_text("x")
    assert main(["xpool", "--finetune-clip", "--store", shapes_store.url, "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_step(shapes_store) -> None:  # type: ignore[no-untyped-def]
    from train import finetune as FT

    out = []
    for ckpt in (False, True):
        s = FT.make_session(_cfg(model="tmass", grad_checkpointing=ckpt, prefetch=0), shapes_store, shapes_store.url)
        gb = next(s.data.global_batches(0, 0, 16, "all_pairs", 4))
        parts = FT.train_step(s, FT.local_batch(s, gb), seed=5, factor=1.0)
        out.append((parts["train_loss"], {k: v.clone() for k, v in s.model.state_dict().items()}))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for k in out[0][1]:
        torch.testing.assert_close(out[0][1][k], out[1][1][k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_random_init_keeps_the_tags_activation() -> None:
    """A ViT-B-32 built for the "openai" tag uses QuickGELU, random or not (else `eval` of a run would differ)."""
    from open_clip.transformer import QuickGELU

    from train.clip_backbone import quick_gelu

    assert quick_gelu("ViT-B-32", "openai") and not quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    from train.clip_backbone import build_clip

    m = build_clip("ViT-B-32", "openai", random_init=True)
    assert any(isinstance(x, QuickGELU) for x in m.modules())
