"""Reference-EQUIVALENT training steps of MEE, X-Pool and T-MASS: timing baselines only, not used by tvr.

Each step computes what the public reference code computes, the way it computes it (same op structure), written
here from the reference briefs (`shared/reference/models-mee-tmass.md`) and a reading of the repositories:
- MEE (antoine77340/Mixture-of-Embedding-Experts): loupe NetVLAD over zero-padded 30-step sequences (no mask),
  Gated Embedding Units as Linear + context gating (Linear, BatchNorm, cat + GLU) + L2 norm, one per modality and
  side, mixture weights as a (Nt, Nv, M) tensor renormalised by numpy availability, the score matrix summed
  modality by modality, the max-margin loss over the flattened (2 n^2, 1) hinge columns; Adam; a DataLoader with
  one worker whose per-sample `__getitem__` draws a random caption and whose collate fills float64 numpy arrays
  sample by sample (pre-pooled appearance / motion / face vectors, audio and words padded to 30).
- X-Pool (layer6ai-labs/xpool) on frozen CLIP features: LN1 on text and frames, q/k/v projections, attention
  over 12 frames, out projection on every (video, text) pair, LN2, residual linear with dropout, LN3; similarity
  as normalise + bmm; CLIP loss with log_softmax on both axes; clip_grad_norm_ 1.0, AdamW, LambdaLR cosine
  warm-up, logit-scale clamp, `.item()` of the loss; a DataLoader (one worker, default collate) of (text, frames).
- T-MASS (Jiamian-Wang/T-MASS-text-video-retrieval): X-Pool plus the radius branch (text repeated F times, matmul
  with the frames, mean over the repeats, Linear(F -> D)), uniform noise, and the support-text loss always
  computed (weighted by alpha); three `.item()` calls per step as its loss logging does (file logging left out).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

MAX_WORDS = 30  # reference MSR-VTT padding of words and audio steps
MEE_DIMS = {"face": (128, 128), "audio": (128 * 16, 128), "visual": (2048, 2048), "motion": (1024, 1024)}
WORD_DIM = 300  # word2vec


# ---- MEE ----------------------------------------------------------------------------------------------------
class RefNetVLAD(nn.Module):
    """loupe.py NetVLAD: matmul assignment, BN, softmax, transposed matmul, no padding mask."""

    def __init__(self, clusters: int, dim: int) -> None:
        super().__init__()
        self.dim, self.k = dim, clusters
        self.clusters = nn.Parameter(torch.randn(dim, clusters) / math.sqrt(dim))
        self.clusters2 = nn.Parameter(torch.randn(1, dim, clusters) / math.sqrt(dim))
        self.bn = nn.BatchNorm1d(clusters)
        self.out_dim = clusters * dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D*K)."""
        n = x.shape[1]
        x = x.view(-1, self.dim)
        a = F.softmax(self.bn(torch.matmul(x, self.clusters)), dim=1).view(-1, n, self.k)
        a_sum = a.sum(-2, keepdim=True) * self.clusters2
        vlad = torch.matmul(a.transpose(1, 2), x.view(-1, n, self.dim)).transpose(1, 2) - a_sum
        vlad = F.normalize(vlad)
        return F.normalize(vlad.reshape(-1, self.k * self.dim))


class RefGEU(nn.Module):
    """Linear, context gating (Linear + BN, cat, GLU), L2 norm."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc, self.cg, self.bn = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out), nn.BatchNorm1d(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d_in) -> (B, d_out)."""
        x = self.fc(x)
        return F.normalize(F.glu(torch.cat((x, self.bn(self.cg(x))), 1), 1))


class RefMEE(nn.Module):
    """Net + MEE of the reference model.py (conf=True: the full Nt x Nv score matrix)."""

    def __init__(self, text_clusters: int = 32, audio_clusters: int = 16) -> None:
        super().__init__()
        self.audio_pooling = RefNetVLAD(audio_clusters, 128)
        self.text_pooling = RefNetVLAD(text_clusters, WORD_DIM)
        self.m = list(MEE_DIMS)
        self.video_gu = nn.ModuleList([RefGEU(MEE_DIMS[m][0], MEE_DIMS[m][1]) for m in self.m])
        self.text_gu = nn.ModuleList([RefGEU(self.text_pooling.out_dim, MEE_DIMS[m][1]) for m in self.m])
        self.moe_fc = nn.Linear(self.text_pooling.out_dim, len(self.m))

    def forward(self, text: torch.Tensor, video: dict[str, torch.Tensor], ind: dict[str, np.ndarray]) -> torch.Tensor:
        """(Nt, Nv) scores."""
        video = {"audio": self.audio_pooling(video["audio"]), "face": video["face"], "motion": video["motion"],
                 "visual": video["visual"]}  # insertion order = the reference's MoE column order
        text = self.text_pooling(text)
        for i, gu in enumerate(self.video_gu):
            video[self.m[i]] = gu(video[self.m[i]])
        text_embd = {self.m[i]: gu(text) for i, gu in enumerate(self.text_gu)}
        w = F.softmax(self.moe_fc(text), dim=1)
        avail = np.zeros(tuple(w.size()))
        for i, m in enumerate(video):
            avail[:, i] = ind[m]
        avail_t = torch.from_numpy(avail).float()
        w = avail_t[None, :, :] * w[:, None, :]
        w = w / w.sum(dim=2).unsqueeze(2)
        conf = torch.zeros(len(text), len(text))
        for i, m in enumerate(video):
            conf = conf + w[:, :, i] * torch.matmul(text_embd[m], video[m].transpose(0, 1))
        return conf


def ref_max_margin(x: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """loss.py MaxMarginRankingLoss: hinge over (2 n^2, 1) columns built with expand / cat."""
    n = x.size(0)
    x1 = torch.diag(x).unsqueeze(1).expand(n, n).contiguous().view(-1, 1)
    x1 = torch.cat((x1, x1), 0)
    x2 = torch.cat((x.view(-1, 1), x.transpose(0, 1).contiguous().view(-1, 1)), 0)
    return F.relu(margin - (x1 - x2)).mean()


class RefMSRVTT(Dataset):
    """MSRVTT.py-style dataset: dicts of per-video numpy arrays, a random caption per fetch."""

    def __init__(self, n_videos: int, captions: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.visual = [rng.standard_normal(2048).astype(np.float32) for _ in range(n_videos)]
        self.flow = [rng.standard_normal(1024).astype(np.float32) for _ in range(n_videos)]
        self.face = [rng.standard_normal(128).astype(np.float32) if rng.random() < 0.5 else np.zeros(128, np.float32)
                     for _ in range(n_videos)]
        self.audio = [rng.standard_normal((int(rng.integers(4, 40)), 128)).astype(np.float32) for _ in range(n_videos)]
        self.text = [[rng.standard_normal((int(rng.integers(5, 31)), WORD_DIM)).astype(np.float32)
                      for _ in range(captions)] for _ in range(n_videos)]

    def __len__(self) -> int:
        return len(self.visual)

    def __getitem__(self, idx: int) -> dict:
        caps = self.text[idx]
        return {"video": self.visual[idx], "flow": self.flow[idx], "face": self.face[idx], "audio": self.audio[idx],
                "text": caps[random.randint(0, len(caps) - 1)], "coco_ind": 0.0,
                "face_ind": 0 if np.sum(self.face[idx]) == 0 else 1}

    @staticmethod
    def collate(data: list[dict]) -> dict:
        """Per-sample fill of float64 arrays padded to 30 steps, then .float() (collate_data)."""
        n = len(data)
        video, flow, face = np.zeros((n, 2048)), np.zeros((n, 1024)), np.zeros((n, 128))
        audio, text = np.zeros((n, MAX_WORDS, 128)), np.zeros((n, MAX_WORDS, WORD_DIM))
        coco_ind, face_ind = np.zeros(n), np.zeros(n)
        for i in range(n):
            coco_ind[i], face_ind[i] = data[i]["coco_ind"], data[i]["face_ind"]
            video[i], flow[i] = data[i]["video"], data[i]["flow"]
            if len(data[i]["face"]) > 0:
                face[i] = data[i]["face"]
            la, lt = len(data[i]["audio"]), len(data[i]["text"])
            audio[i, : min(la, MAX_WORDS)] = data[i]["audio"][: min(MAX_WORDS, la)]
            text[i, : min(lt, MAX_WORDS)] = data[i]["text"][: min(MAX_WORDS, lt)]
        return {"video": torch.from_numpy(video).float(), "flow": torch.from_numpy(flow).float(),
                "face": torch.from_numpy(face).float(), "audio": torch.from_numpy(audio).float(),
                "text": torch.from_numpy(text).float(), "coco_ind": coco_ind, "face_ind": face_ind}


@dataclass
class RefRun:
    """A reference training loop: its batches and one optimizer step per batch."""

    loader: DataLoader
    step: object  # callable(batch) -> None


def mee_run(n_videos: int, captions: int, batch_size: int = 128, lr: float = 1e-4, workers: int = 1) -> RefRun:
    """MEE reference loop (train.py): Adam, DataLoader(shuffle, drop_last, one worker, collate_data)."""
    net = RefMEE()
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ds = RefMSRVTT(n_videos, captions)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        collate_fn=RefMSRVTT.collate, persistent_workers=workers > 0)
    state = {"running": 0.0}

    def step(b: dict) -> None:
        ind = {"face": b["face_ind"], "visual": np.ones(len(b["face_ind"])), "motion": 1 - b["coco_ind"],
               "audio": 1 - b["coco_ind"]}
        opt.zero_grad()
        conf = net(b["text"], {"face": b["face"], "audio": b["audio"], "visual": b["video"], "motion": b["flow"]}, ind)
        loss = ref_max_margin(conf)
        loss.backward()
        opt.step()
        state["running"] += loss.item()

    return RefRun(loader, step)


# ---- X-Pool / T-MASS ----------------------------------------------------------------------------------------
class RefPool(nn.Module):
    """modules/transformer.py Transformer (MultiHeadedAttention with H heads, identity init)."""

    def __init__(self, d: int = 512, heads: int = 1, dropout: float = 0.3) -> None:
        super().__init__()
        self.d, self.h = d, heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.linear_proj = nn.Linear(d, d)
        self.layer_norm1, self.layer_norm2, self.layer_norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.linear_proj):
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """t (Nt, D), v (Nv, F, D) -> (Nv, Nt, D)."""
        t, v = self.layer_norm1(t), self.layer_norm1(v)
        nt, (nv, nf, _) = t.shape[0], v.shape
        hd = self.d // self.h
        q = self.q_proj(t).reshape(nt, self.h, hd).permute(1, 2, 0)
        k = self.k_proj(v).reshape(nv, nf, self.h, hd).permute(0, 2, 1, 3)
        u = self.v_proj(v).reshape(nv, nf, self.h, hd).permute(0, 2, 3, 1)
        att = F.softmax(k @ q / math.sqrt(hd), dim=2)
        o = (u @ att).permute(0, 3, 1, 2).reshape(nv, nt, self.d)
        o = self.layer_norm2(self.out_proj(o))
        return self.layer_norm3(o + self.dropout(self.linear_proj(o)))


class RefRadius(nn.Module):
    """stochastic_module.py LinearCosRadius: repeat the text F times, matmul with the frames, mean, Linear(F->D)."""

    def __init__(self, frames: int = 12, d: int = 512) -> None:
        super().__init__()
        self.frames = frames
        self.linear_proj = nn.Linear(frames, d)
        self.learnable_scalar = nn.Parameter(torch.zeros(1))  # created and never used by the reference
        nn.init.eye_(self.linear_proj.weight)
        nn.init.zeros_(self.linear_proj.bias)

    def forward(self, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """log R (B, D) from t (B, D) and its paired frames v (B, F, D)."""
        t = t / t.norm(dim=-1, keepdim=True)
        v = v / v.norm(dim=-1, keepdim=True)
        sims = torch.matmul(t.unsqueeze(1).repeat(1, self.frames, 1), v.permute(0, 2, 1)).mean(dim=1)
        return self.linear_proj(sims)


def ref_sim_training(t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """metrics.py sim_matrix_training ('transformer'): normalise, permute, bmm -> (Nt, Nv)."""
    t = t / t.norm(dim=-1, keepdim=True)
    pooled = pooled / pooled.norm(dim=-1, keepdim=True)
    return torch.bmm(t.unsqueeze(1), pooled.permute(1, 2, 0)).squeeze(1)


def ref_clip_loss(sims: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """loss.py CLIPLoss: log_softmax over rows and over columns, diagonal, mean."""
    logits = sims * logit_scale.exp()
    t2v = -torch.diag(F.log_softmax(logits, dim=1)).mean()
    v2t = -torch.diag(F.log_softmax(logits, dim=0)).mean()
    return (t2v + v2t) / 2.0


class RefFramePairs(Dataset):
    """Every (video, caption) pair of frozen CLIP features: (12, 512) frames and a (512,) text vector."""

    def __init__(self, n_videos: int, captions: int, frames: int = 12, d: int = 512, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.frames = torch.randn(n_videos, frames, d, generator=g) * 0.5
        self.text = torch.randn(n_videos * captions, d, generator=g) * 0.5
        self.captions = captions

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, idx: int) -> dict:
        return {"video": self.frames[idx // self.captions], "text": self.text[idx]}


class RefCLIPHead(nn.Module):
    """The frozen-feature model: pooling head, the CLIP logit scale, and (T-MASS) the stochastic branch."""

    def __init__(self, stochastic: bool, frames: int = 12, d: int = 512) -> None:
        super().__init__()
        self.pool_frames = RefPool(d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.stochastic = RefRadius(frames, d) if stochastic else None


def _cosine_warmup(opt: torch.optim.Optimizer, warm: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' get_cosine_schedule_with_warmup as a LambdaLR."""
    def f(s: int) -> float:
        if s < warm:
            return s / max(1, warm)
        p = (s - warm) / max(1, total - warm)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def clip_head_run(n_videos: int, captions: int, *, stochastic: bool, batch_size: int = 32, lr: float = 3e-5,
                  support_weight: float = 0.8, workers: int = 1, total_steps: int = 1000) -> RefRun:
    """X-Pool (stochastic=False) or T-MASS reference loop on frozen features (trainer.py / trainer_stochastic.py)."""
    model = RefCLIPHead(stochastic)
    model.train()
    rest = [p for n, p in model.named_parameters() if n != "logit_scale"]
    opt = torch.optim.AdamW([{"params": [model.logit_scale], "lr": 1e-6}, {"params": rest, "lr": lr}],
                            weight_decay=0.2, eps=1e-6)
    sched = _cosine_warmup(opt, int(0.1 * total_steps), total_steps)
    loader = DataLoader(RefFramePairs(n_videos, captions), batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    state = {"total": 0.0}

    def step(b: dict) -> None:
        text, video = b["text"], b["video"]
        pooled = model.pool_frames(text, video)
        if model.stochastic is None:
            loss = ref_clip_loss(ref_sim_training(text, pooled), model.logit_scale)
        else:
            log_var = model.stochastic(text, video)
            t_s = text + torch.rand_like(text) * torch.exp(log_var)
            loss_s = ref_clip_loss(ref_sim_training(t_s, pooled), model.logit_scale)
            pointer = pooled.mean(dim=1).squeeze() - text
            support = pointer / pointer.norm(dim=-1, keepdim=True) * torch.exp(log_var) + text
            loss_sup = ref_clip_loss(ref_sim_training(support, pooled), model.logit_scale)
            loss = loss_s + loss_sup * support_weight
            state["total"] += loss_s.item() + loss_sup.item()  # its per-step loss logging
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        torch.clamp_(model.logit_scale.data, max=math.log(100.0))
        state["total"] += loss.detach().item()

    return RefRun(loader, step)
