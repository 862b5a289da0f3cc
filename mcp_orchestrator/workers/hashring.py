"""Consistent hashing: keys -> members, so that adding a member moves few keys.

Each member is placed at `virtual_nodes` points on a 64-bit ring (hashes of its
identity); a key belongs to the first point clockwise from the key's hash. Adding a
member takes over only the arcs in front of its own points, about 1/(n+1) of the
keys, all of which move to the new member; the other keys stay where they were.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Sequence


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, identities: Sequence[str], virtual_nodes: int = 64) -> None:
        if not identities:
            raise ValueError("a hash ring needs at least one member")
        if len(set(identities)) != len(identities):
            raise ValueError("hash ring identities must be distinct")
        points = sorted(
            (_hash(f"{identity}#{v}"), index) for index, identity in enumerate(identities) for v in range(virtual_nodes)
        )
        self._hashes = [h for h, _ in points]
        self._owners = [index for _, index in points]
        self.size = len(identities)

    def owner(self, key: str, usable: Callable[[int], bool] = lambda index: True) -> int | None:
        """The index of the member owning `key`: the first usable one clockwise, or None."""
        start = bisect.bisect(self._hashes, _hash(key))
        seen: set[int] = set()
        for step in range(len(self._owners)):
            index = self._owners[(start + step) % len(self._owners)]
            if index in seen:
                continue
            if usable(index):
                return index
            seen.add(index)
            if len(seen) == self.size:
                break
        return None
