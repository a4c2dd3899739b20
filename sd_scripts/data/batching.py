"""Which images are drawn in an epoch and how they form batches: repeats, regularisation balancing, and batches
of one bucket each in a deterministic, seed- and epoch-dependent order."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence


def repeat_draws(image_ids: Sequence[int], repeats: Sequence[int]) -> list[int]:
    """Each image id once per repeat."""
    return [i for i, n in zip(image_ids, repeats) for _ in range(n)]


def balance_reg_repeats(reg_repeats: Sequence[int], num_train_draws: int) -> list[int]:
    """Repeats of each reg image so that reg draws >= train draws (FORMATS.md).

    The first pass uses each reg image with its folder's repeats; then one more repeat each, round-robin. It stops
    as soon as there are enough, so surplus reg images get 0 repeats (unused)."""
    used = [0] * len(reg_repeats)
    if not reg_repeats:
        return used
    total, first_pass = 0, True
    while total < num_train_draws:
        for i, repeats in enumerate(reg_repeats):
            add = repeats if first_pass else 1
            used[i] += add
            total += add
            if total >= num_train_draws:
                break
        first_pass = False
    return used


def plan_batches(draws: Sequence[int], bucket_of: Sequence, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches (lists of image ids) of one bucket each: draws shuffled within their bucket, then cut into
    batches (the last one of a bucket may be smaller). The caller shuffles the batch order."""
    by_bucket: dict = defaultdict(list)
    for image_id in draws:
        by_bucket[bucket_of[image_id]].append(image_id)
    batches = []
    for bucket in sorted(by_bucket):
        ids = by_bucket[bucket]
        rng.shuffle(ids)
        batches += [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    return batches
