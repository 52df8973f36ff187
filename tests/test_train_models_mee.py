"""Equation-level tests of train/models/mee.py: GEU, max pooling, renormalised mixture weights (eq. 6), gradients."""
from __future__ import annotations

import pytest
import torch

from train.losses import max_margin_ranking_loss
from train.models import create_model
from train.models._api import ModelConfigError
from train.models.mee import MEEConfig, GatedEmbeddingUnit, masked_pool

DIMS = {"resnet152": 6, "i3d_flow": 5, "vggish": 4, "dlib_face": 3, "glove": 7}
MODS = ("appearance", "motion", "audio", "face")
FEAT = {"appearance": "resnet152", "motion": "i3d_flow", "audio": "vggish", "face": "dlib_face"}


def _model(**kw):
    torch.manual_seed(0)
    return create_model("mee", feature_dims=DIMS, text_clusters=4, audio_clusters=3, **kw)


def _batch(n: int = 6, steps: int = 4, seed: int = 0, avail: dict[str, list[bool]] | None = None):
    """(text, video) batches; `avail` overrides per-feature availability (missing rows are zeros, masks False)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(n, 5, DIMS["glove"], generator=g)
    wmask = torch.arange(5)[None] < torch.randint(2, 6, (n, 1), generator=g)
    video = {}
    for f in FEAT.values():
        x = torch.randn(n, steps, DIMS[f], generator=g)
        m = torch.arange(steps)[None] < torch.randint(1, steps + 1, (n, 1), generator=g)
        ok = torch.tensor(avail[f]) if avail and f in avail else torch.ones(n, dtype=torch.bool)
        m = m & ok[:, None]
        video[f], video[f"{f}_mask"], video[f"{f}_avail"] = x * m[..., None], m, ok
    return {"words": words * wmask[..., None], "words_mask": wmask}, video


MISSING = {"vggish": [True, False, True, False, True, True], "dlib_face": [False, False, True, False, True, False]}


def test_gated_embedding_unit_hand_formula():
    torch.manual_seed(1)
    geu = GatedEmbeddingUnit(4, 3)
    with torch.no_grad():
        geu.bn.running_mean.copy_(torch.randn(3))
        geu.bn.running_var.copy_(torch.rand(3) + 0.5)
        geu.bn.weight.copy_(torch.rand(3) + 0.5)
        geu.bn.bias.copy_(torch.randn(3))
    x = torch.randn(5, 4)
    w1, b1, w2, b2, bn = geu.fc.weight, geu.fc.bias, geu.gate.weight, geu.gate.bias, geu.bn
    y = x @ w1.t() + b1  # eq. 1
    z = y @ w2.t() + b2
    geu.eval()
    gate = torch.sigmoid((z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
    expected = (y * gate) / (y * gate).norm(dim=1, keepdim=True)  # eqs. 2-3
    assert torch.allclose(geu(x), expected, atol=1e-6)
    geu.train()  # batch statistics (biased variance) in train mode
    gate = torch.sigmoid((z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias)
    expected = (y * gate) / (y * gate).norm(dim=1, keepdim=True)
    assert torch.allclose(geu(x), expected, atol=1e-5)


def test_defaults_follow_the_paper():
    cfg = MEEConfig()
    assert (cfg.text_clusters, cfg.audio_clusters, cfg.margin, cfg.netvlad_mask_padding) == (32, 16, 0.2, True)
    assert cfg.aggregation == {"audio": "netvlad"}
    m = create_model("mee", feature_dims=DIMS)
    assert m.text_vlad.clusters == 32 and m.video_vlad["audio"].clusters == 16
    assert m.agg == {"appearance": "max", "motion": "max", "audio": "netvlad", "face": "max"}
    assert m.moe.in_features == 32 * DIMS["glove"] and m.moe.out_features == 4
    # every modality keeps its own output dim (reference: no shared embedding size)
    assert {k: g.fc.out_features for k, g in m.video_geu.items()} == {k: DIMS[f] for k, f in FEAT.items()}


def test_max_pool_over_valid_steps():
    x = torch.tensor([[[1.0, -5.0], [3.0, -1.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert masked_pool(x, mask, "max").tolist() == [[3.0, -1.0]]
    assert masked_pool(x, mask, "mean").tolist() == [[2.0, -3.0]]
    assert masked_pool(x, torch.zeros(1, 3, dtype=torch.bool), "max").tolist() == [[0.0, 0.0]]
    m = _model().eval()
    _, video = _batch()
    v = m.encode_video(video)
    f = "resnet152"
    pooled = video[f].masked_fill(~video[f"{f}_mask"][..., None], float("-inf")).amax(1)
    assert torch.allclose(v["v_appearance"], m.video_geu["appearance"](pooled), atol=1e-6)
    video[f] = torch.where(video[f"{f}_mask"][..., None], video[f], torch.full_like(video[f], 1e3))
    assert torch.allclose(m.encode_video(video)["v_appearance"], v["v_appearance"], atol=1e-6)  # padding ignored


def test_renormalised_weights_sum_to_one_over_available_modalities():
    m = _model().eval()
    text, video = _batch(avail=MISSING)
    te, ve = m.encode_text(text), m.encode_video(video)
    w = m.mixture_weights(te, ve)  # (Nt, Nv, M)
    avail = ve["avail"]
    assert torch.allclose(w.sum(-1), torch.ones(6, 6), atol=1e-6)
    assert (w[:, avail == 0] == 0).all()
    lam = te["moe"]
    expected = lam[:, None, :] * avail[None] / (lam @ avail.t())[..., None]  # eq. 6
    assert torch.allclose(w, expected, atol=1e-6)
    cos = torch.stack([te[f"t_{k}"] @ ve[f"v_{k}"].t() for k in m.modalities], -1)
    assert torch.allclose(m.similarity(te, ve), (w * cos).sum(-1), atol=1e-6)
    assert torch.allclose(m.similarity(te, ve, chunk=1), m.similarity(te, ve), atol=1e-7)
    assert m.modalities == MODS and torch.allclose(lam.sum(1), torch.ones(6))


@pytest.mark.parametrize("train", [False, True])
def test_scores_do_not_depend_on_missing_modality_values(train):
    m = _model()
    m.train(train)
    text, video = _batch(avail=MISSING)
    te = m.encode_text(text)
    base = m.similarity(te, m.encode_video(video))
    for f, ok in MISSING.items():
        miss = ~torch.tensor(ok)
        video[f] = video[f].clone()
        video[f][miss] = torch.randn_like(video[f][miss]) * 50  # garbage in rows marked unavailable
        video[f"{f}_mask"] = video[f"{f}_mask"].clone()
        video[f"{f}_mask"][miss] = True  # even with their steps marked valid: availability decides
    assert torch.allclose(m.similarity(te, m.encode_video(video)), base, atol=1e-6)


def test_zero_filling_differs_from_renormalisation():
    m = _model().eval()
    text, video = _batch(avail=MISSING)
    te = m.encode_text(text)
    renorm = m.similarity(te, m.encode_video(video))
    for f in MISSING:  # what the zero-fill ablation feeds: zero vectors marked available
        video[f"{f}_avail"] = torch.ones(6, dtype=torch.bool)
        video[f"{f}_mask"] = video[f"{f}_mask"].clone()
        video[f"{f}_mask"][:, 0] = True
    zero = m.similarity(te, m.encode_video(video))
    full = torch.tensor(MISSING["vggish"]) & torch.tensor(MISSING["dlib_face"])
    assert torch.allclose(zero[:, full], renorm[:, full], atol=1e-6)  # videos with everything: unchanged
    assert not torch.allclose(zero[:, ~full], renorm[:, ~full], atol=1e-3)


def test_gradients_only_reach_available_branches():
    m = _model().train()
    avail = {"dlib_face": [False] * 6, "vggish": MISSING["vggish"]}
    text, video = _batch(avail=avail)
    video["vggish"] = video["vggish"].clone().requires_grad_(True)
    loss, parts = m.loss(m.encode_text(text), m.encode_video(video))
    assert parts["rank_loss"] == pytest.approx(loss.item())
    loss.backward()
    assert all(p.grad is None for p in m.video_geu["face"].parameters())  # never ran: no face in the batch
    assert all(float(p.grad.abs().max()) == 0.0 for p in m.text_geu["face"].parameters())
    face_col = m.modalities.index("face")
    assert float(m.moe.weight.grad[face_col].abs().max()) < 1e-9 and abs(float(m.moe.bias.grad[face_col])) < 1e-9
    assert float(m.moe.weight.grad.abs().max()) > 0 and float(m.video_geu["appearance"].fc.weight.grad.abs().max()) > 0
    g = video["vggish"].grad
    miss = ~torch.tensor(MISSING["vggish"])
    assert g[miss].abs().max() == 0 and g[~miss].abs().max() > 0  # missing rows get no gradient


def test_video_without_any_modality_scores_zero():
    m = _model().eval()
    none = {f: [True, False, True, True, True, True] for f in FEAT.values()}
    text, video = _batch(avail=none)
    sim = m.similarity(m.encode_text(text), m.encode_video(video))
    assert (sim[:, 1] == 0).all() and torch.isfinite(sim).all()


def test_loss_is_the_max_margin_loss_of_the_scores():
    m = _model(margin=0.3).eval()
    text, video = _batch(avail=MISSING)
    te, ve = m.encode_text(text), m.encode_video(video)
    loss, _ = m.loss(te, ve)
    assert loss.item() == pytest.approx(max_margin_ranking_loss(m.similarity(te, ve), 0.3).item(), rel=1e-6)


def test_reference_netvlad_option_and_build_errors():
    assert _model(netvlad_mask_padding=False).text_vlad.mask_padding is False
    with pytest.raises(ModelConfigError, match="aggregation"):
        _model(aggregation={"audio": "lstm"})
    with pytest.raises(ModelConfigError, match="text feature"):
        create_model("mee", feature_dims={"resnet152": 4})
    with pytest.raises(ModelConfigError, match="none of the configured video features"):
        create_model("mee", feature_dims={"glove": 4})
    sub = create_model("mee", feature_dims={"resnet152": 4, "glove": 3}, text_clusters=2)
    assert sub.modalities == ("appearance",)  # modalities the store lacks are dropped
