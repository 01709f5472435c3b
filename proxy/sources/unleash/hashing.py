"""Unleash's stickiness hash: MurmurHash3 x86_32 of ``"<group>:<value>"`` (UTF-8), ``% modulus + 1``.

Rollouts use seed 0 and modulus 100 (in if the result is ``<=`` the percentage); variants use
``VARIANT_SEED`` and the variants' total weight.
"""

from __future__ import annotations

import mmh3

VARIANT_SEED = 86028157


def normalized_hash(group: str, value: str, modulus: int, seed: int) -> int:
    """1..modulus; ``modulus`` must be positive."""
    # mmh3 crashes the interpreter on str with lone surrogates: always give it bytes.
    key = f"{group}:{value}".encode("utf-8", "surrogatepass")
    return int(mmh3.hash(key, seed, False)) % modulus + 1
