"""What a small labelled set gets out of frozen features: the downstream probes an encoder is judged by.

- `frame_phone_accuracy`: a linear softmax classifier of each frame's phone (standardised features,
  L2, full-batch L-BFGS), trained on some utterances and scored on held-out ones.
- `ctc_phone_error_rate`: SUPERB's phoneme recognition with a frozen encoder: a learned
  softmax-weighted sum of the layers, a linear head trained with CTC on phone sequences, greedy
  decoding, phone error rate (edit distance over reference length) on held-out utterances. A
  linear CTC head on minutes of audio overfits (it can fit a few spike frames per phone) by an
  amount that differs between representations, so a seeded tenth of the probe's utterances is a
  dev set that picks the step and the input dropout; the test utterances decide nothing.

Both are seeded and deterministic on CPU: the same features give the same numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BLANK = 0
CTC_DROPOUTS = (0.0, 0.1, 0.3)


@dataclass(frozen=True)
class ProbeData:
    """Per utterance: features of each layer ((frames, dim) float32), the phone at each frame
    (-1 where none), and the phone sequence (repeats collapsed; phone indices from 1, 0 is blank)."""

    layers: list[list[np.ndarray]]  # [layer][utterance]
    frame_phones: list[np.ndarray]
    sequences: list[list[int]]
    ids: list[str]


def seeded_order(ids: Sequence[str], seed: int, salt: str) -> list[int]:
    """Positions of `ids` ranked by sha256 of `seed:salt:id`: an order that depends on the ids alone."""
    return sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}:{salt}:{ids[i]}".encode()).hexdigest())


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def _standardised(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0) + 1e-5
    return [torch.from_numpy((x - mean) / std).float() for x in (train, *others)]


def frame_phone_accuracy(
    features: list[np.ndarray], phones: list[np.ndarray], train: list[int], test: list[int], classes: int,
    seed: int, l2: float = 1e-4, iterations: int = 300,
) -> float:
    """Held-out frame accuracy of a linear softmax phone classifier (frames without a phone left out)."""

    def frames(indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.concatenate([features[i] for i in indices]), np.concatenate([phones[i] for i in indices])
        return x[y >= 0], y[y >= 0]

    (train_x, train_y), (test_x, test_y) = frames(train), frames(test)
    x_train, x_test = _standardised(train_x, test_x)
    y_train = torch.from_numpy(train_y).long()
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x_train.shape[1], classes)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=1, max_iter=iterations, history_size=20, tolerance_grad=1e-6, tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x_train), y_train) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(x_test).argmax(1).numpy() == test_y).mean())


@dataclass(frozen=True)
class CtcResult:
    per: float
    dev_per: float
    dropout: float
    step: int
    layer_weights: list[float]


def batches(indices: list[int], size: int, steps: int, seed: int):
    """`steps` batches of `size` of the indices, epoch after epoch, each epoch in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    made = 0
    while True:
        shuffled = torch.randperm(len(indices), generator=generator).tolist()
        for start in range(0, len(shuffled), size):
            if made == steps:
                return
            yield [indices[j] for j in shuffled[start : start + size]]
            made += 1


def ctc_phone_error_rate(
    data: ProbeData, train: list[int], test: list[int], phones: int, seed: int, steps: int = 2000, lr: float = 3e-2,
    check_every: int = 100, dropouts: Sequence[float] = CTC_DROPOUTS, batch: int = 8,
) -> CtcResult:
    """PER on `test` of a linear CTC head over a learned softmax-weighted sum of the layers, after
    at most `steps` Adam steps on batches of `batch` utterances (the dev set picks the step)."""
    order = seeded_order([data.ids[i] for i in train], seed, "ctc-dev")
    dev_positions = set(order[: max(1, len(train) // 10)])
    dev = [i for n, i in enumerate(train) if n in dev_positions]
    fit = [i for n, i in enumerate(train) if n not in dev_positions]
    statistics = []
    for layer in data.layers:
        rows = np.concatenate([layer[i] for i in fit])
        statistics.append((torch.from_numpy(rows.mean(0)), torch.from_numpy(rows.std(0) + 1e-5)))

    def stacked(i: int) -> torch.Tensor:
        return torch.stack([(torch.from_numpy(layer[i]) - mean) / std for layer, (mean, std) in zip(data.layers, statistics)])

    cache = {i: stacked(i) for i in fit + dev}
    targets = {i: torch.tensor(data.sequences[i]) for i in train + test}

    def error_rate(head: torch.nn.Linear, mix: torch.Tensor, indices: list[int], features) -> float:
        errors = reference = 0
        with torch.no_grad():
            weights = torch.softmax(mix, 0)
            for i in indices:
                best = head(torch.einsum("l,lfd->fd", weights, features(i))).argmax(-1).tolist()
                decoded = [c for j, c in enumerate(best) if c != BLANK and (j == 0 or best[j - 1] != c)]
                errors += edit_distance(decoded, data.sequences[i])
                reference += len(data.sequences[i])
        return errors / max(reference, 1)

    results = []
    for dropout in dropouts:
        torch.manual_seed(seed)
        head = torch.nn.Linear(data.layers[0][0].shape[1], phones + 1)
        mix = torch.nn.Parameter(torch.zeros(len(data.layers)))
        optimizer = torch.optim.Adam([*head.parameters(), mix], lr=lr)
        best = (float("inf"), 0, None)
        for step, members in enumerate(batches(fit, batch, steps, seed), start=1):
            weights = torch.softmax(mix, 0)
            xs = [F.dropout(torch.einsum("l,lfd->fd", weights, cache[i]), dropout) for i in members]
            log_probs = head(torch.nn.utils.rnn.pad_sequence(xs)).log_softmax(-1)  # (frames, batch, classes)
            ys = [targets[i] for i in members]
            loss = F.ctc_loss(
                log_probs, torch.cat(ys), torch.tensor([x.shape[0] for x in xs]), torch.tensor([len(y) for y in ys]),
                blank=BLANK, zero_infinity=True,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % check_every == 0 or step == steps:
                dev_per = error_rate(head, mix, dev, cache.__getitem__)
                if dev_per < best[0]:
                    best = (dev_per, step, ({k: v.clone() for k, v in head.state_dict().items()}, mix.detach().clone()))
        head.load_state_dict(best[2][0])
        with torch.no_grad():
            mix.copy_(best[2][1])
        results.append(CtcResult(
            per=error_rate(head, mix, test, stacked), dev_per=best[0], dropout=dropout, step=best[1],
            layer_weights=[round(float(w), 4) for w in torch.softmax(mix.detach(), 0)],
        ))
    return min(results, key=lambda result: (result.dev_per, result.dropout))
