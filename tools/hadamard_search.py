"""Search for Goethals-Seidel Hadamard matrices of order 4v (v odd): four +-1 sequences of length v
whose periodic autocorrelations sum to zero at every nonzero shift, each sequence constant on the
orbits of a cyclic subgroup G of the units mod v acting by multiplication (so it is given by one sign per
orbit, and its power spectrum is constant on the G-orbits of frequencies).

    python tools/hadamard_search.py 43 39        # prints v, the generator of G and the orbit signs

Meet in the middle: for each way of writing 4v as a sum of four squares of row sums, the pairs (A, B)
give PSD_A + PSD_B and the pairs (C, D) give 4v - PSD_C - PSD_D at every frequency orbit; equal vectors
are solutions (checked exactly with integer autocorrelations). This is how the factors 156 = 4 x 39
and 172 = 4 x 43 in python/fusedtune/reference/hadamard.py were found; the module stores the orbit
signs and rebuilds (and checks) the matrices itself.
"""
from __future__ import annotations

import itertools
import math
import sys

import numpy as np

from fusedtune.reference.hadamard import orbits


def sequence(v: int, orbs: list[list[int]], signs) -> np.ndarray:
    a = np.empty(v, dtype=np.int64)
    for o, s in zip(orbs, signs):
        a[o] = s
    return a


def paf(a: np.ndarray) -> np.ndarray:
    return np.array([int(np.dot(a, np.roll(a, -s))) for s in range(len(a))])


def subgroups(v: int) -> list[int]:
    """One generator per cyclic subgroup of the units mod v (largest order first)."""
    units = [u for u in range(2, v) if math.gcd(u, v) == 1]
    groups = {}
    for u in units:
        g, x = {1}, u
        while x != 1:
            g.add(x)
            x = (x * u) % v
        groups.setdefault(frozenset(g), u)
    return [u for g, u in sorted(groups.items(), key=lambda t: -len(t[0])) if len(g) > 2]


def search(v: int, gen: int, limit: int = 1):
    orbs = orbits(v, gen)
    nb = len(orbs)
    freqs = [o[0] for o in orbs if o[0] != 0]         # frequency orbits are the same orbits
    masks = np.array(list(itertools.product((1, -1), repeat=nb)), dtype=np.int64)      # [2^nb, nb]
    seqs = np.zeros((len(masks), v), dtype=np.int64)
    for j, o in enumerate(orbs):
        seqs[:, o] = masks[:, j:j + 1]
    w = np.exp(-2j * np.pi * np.outer(np.arange(v), freqs) / v)
    psd = np.abs(seqs @ w) ** 2                           # [2^nb, n_freq]
    sums = seqs.sum(1)
    target = 4 * v
    ok = (psd <= target + 1e-6).all(1) & (sums >= 0)
    by_sum = {}
    for s in np.unique(sums[ok]):
        idx = np.nonzero(ok & (sums == s))[0]
        by_sum[int(s)] = idx
    found = []
    rnd = np.random.default_rng(0).integers(1, 2 ** 20, size=len(freqs))
    for s1, s2, s3, s4 in itertools.combinations_with_replacement(sorted(by_sum), 4):
        if s1 * s1 + s2 * s2 + s3 * s3 + s4 * s4 != target:
            continue
        ia, ib, ic, id_ = by_sum[s1], by_sum[s2], by_sum[s3], by_sum[s4]
        left = psd[ia][:, None, :] + psd[ib][None, :, :]
        right = target - psd[ic][:, None, :] - psd[id_][None, :, :]
        lk = np.round(left * 1e4).astype(np.int64) @ rnd
        rk = np.round(right * 1e4).astype(np.int64) @ rnd
        lk = np.where((left <= target + 1e-6).all(-1), lk.reshape(len(ia), len(ib)), -1).ravel()
        rk = np.where((right >= -1e-6).all(-1), rk.reshape(len(ic), len(id_)), -2).ravel()
        common = np.intersect1d(lk, rk)
        for key in common[:200]:
            for li in np.nonzero(lk == key)[0][:4]:
                for ri in np.nonzero(rk == key)[0][:4]:
                    quad = [masks[ia[li // len(ib)]], masks[ib[li % len(ib)]], masks[ic[ri // len(id_)]],
                            masks[id_[ri % len(id_)]]]
                    total = sum(paf(sequence(v, orbs, q)) for q in quad)
                    if (total[1:] == 0).all():
                        found.append([list(map(int, q)) for q in quad])
                        if len(found) >= limit:
                            return orbs, found
    return orbs, found


def main(argv):
    for v in map(int, argv):
        for gen in subgroups(v):
            nb = len(orbits(v, gen))
            if nb > 16:
                continue
            orbs, found = search(v, gen)
            print(f"v={v} generator={gen} orbits={nb} solutions={len(found)}", flush=True)
            if found:
                print("  signs per orbit (A, B, C, D):", found[0], flush=True)
                break


if __name__ == "__main__":
    main(sys.argv[1:] or ["43", "39"])
