"""How much speaker identity a layer carries: a seeded linear probe on utterance-mean features.

The seed paper (Huo & Dunbar, arXiv 2508.08110) reads a model by its layers: phone information
rises and speaker information falls with each iteration. A ridge classifier (closed form, one-vs-
rest least squares on standardised mean-pooled features) trained on a seeded share of the
utterances and scored on the rest gives a number comparable across layers and iterations.
"""

from __future__ import annotations

import numpy as np

HELD_OUT = 0.3
RIDGE = 1.0


def speaker_probe_accuracy(embeddings: np.ndarray, speakers: list[str], seed: int = 0) -> float | None:
    """Held-out accuracy of a linear speaker classifier on (utterances, dim) embeddings.

    None when it cannot be measured: fewer than two speakers, or no speaker with utterances on
    both sides of the split. Chance is about 1 / speakers.
    """
    names = sorted(set(speakers))
    if len(names) < 2 or len(speakers) != embeddings.shape[0]:
        return None
    order = np.random.default_rng(seed).permutation(len(speakers))
    held = max(1, int(round(HELD_OUT * len(speakers))))
    test, train = order[:held], order[held:]
    classes = np.array([names.index(name) for name in speakers])
    if len(set(classes[train])) < 2 or not set(classes[test]) <= set(classes[train]):
        return None
    x = embeddings.astype(np.float64)
    mean, scale = x[train].mean(axis=0), x[train].std(axis=0) + 1e-8
    x = (x - mean) / scale
    targets = np.eye(len(names))[classes[train]]
    gram = x[train].T @ x[train] + RIDGE * np.eye(x.shape[1])
    weights = np.linalg.solve(gram, x[train].T @ targets)
    predicted = (x[test] @ weights).argmax(axis=1)
    return float((predicted == classes[test]).mean())
