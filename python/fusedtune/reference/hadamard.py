"""Hadamard matrices and the normalized Hadamard transform (reference of the RoSTE family).

Sizes n = m * 2^k: H_n = H_m (x) H_{2^k} (Kronecker product; Sylvester for the power of two). The
factors m are built here from first principles, no tables copied from elsewhere:
  Paley I   (q prime, q = 3 mod 4):  order q + 1       12, 20, 44, 60, 68?, 84, 108, 140, ...
  Paley II  (q prime power, q = 1 mod 4): order 2(q+1) 28 (q=13), 36 (17), 52 (25 = 5^2), 76 (37), 148 (73)
  doubling  H_2m = H_2 (x) H_m                           40 = 2 x 20
  Goethals-Seidel (order 4v, v odd): four circulant +-1 matrices A, B, C, D whose periodic
            autocorrelations sum to zero off the diagonal, put in the Goethals-Seidel array
                                                         156 (v = 39), 172 (v = 43)
            Each of the four first rows is constant on the orbits of a subgroup of the units mod v
            (GS_SEEDS: the subgroup's generator and one sign per orbit); the signs were found by
            tools/hadamard_search.py, a meet-in-the-middle search over power spectra.
Every factor is checked (H H^T = m I) when it is built.
"""
from __future__ import annotations

import functools
import math

import torch

from .._inference import outside_inference

# the non-power-of-two factors RoSTE-style rotations need for Llama-2/3, Qwen2.5 and Mistral sizes
FACTORS = (12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 140, 148, 156, 172)

# order 4v: (v, generator of the subgroup, signs per orbit of A, B, C, D; orbits sorted by least element)
GS_SEEDS = {
    156: (39, 29, ((-1, 1, -1, -1, -1, 1, 1, 1, 1, -1), (-1, 1, 1, -1, -1, 1, -1, 1, -1, 1),
                   (1, 1, 1, 1, -1, -1, 1, -1, -1, -1), (1, 1, 1, -1, -1, -1, 1, 1, -1, 1))),
    172: (43, 4, ((1, 1, -1, 1, -1, 1, -1), (1, 1, -1, -1, 1, 1, -1), (1, 1, 1, 1, -1, -1, -1),
                  (-1, 1, -1, 1, 1, -1, 1))),
}


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def _gf_p2(p: int):
    """GF(p^2) as pairs (a, b) = a + b*t with t^2 = c, c a quadratic non-residue mod p: (elements, mul)."""
    c = next(x for x in range(2, p) if pow(x, (p - 1) // 2, p) == p - 1)
    elems = [(a, b) for a in range(p) for b in range(p)]

    def mul(u, v):
        return ((u[0] * v[0] + c * u[1] * v[1]) % p, (u[0] * v[1] + u[1] * v[0]) % p)
    return elems, mul


def _chi_table(q: int):
    """(elements, chi(x - y) as a q x q list) of the quadratic character of GF(q), q = p or p^2."""
    if _is_prime(q):
        elems = list(range(q))
        sq = {(x * x) % q for x in range(1, q)}
        chi = [[0 if x == y else (1 if (x - y) % q in sq else -1) for y in elems] for x in elems]
        return chi
    p = round(q ** 0.5)
    if p * p != q or not _is_prime(p):
        raise ValueError(f"GF({q}) is not implemented (prime or prime squared only)")
    elems, mul = _gf_p2(p)
    squares = {mul(e, e) for e in elems if e != (0, 0)}
    sub = lambda u, v: ((u[0] - v[0]) % p, (u[1] - v[1]) % p)  # noqa: E731
    return [[0 if x == y else (1 if sub(x, y) in squares else -1) for y in elems] for x in elems]


def _jacobsthal(q: int) -> torch.Tensor:
    return torch.tensor(_chi_table(q), dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 (q = 3 mod 4): H = I + S, S = [[0, 1^T], [-1, Q]] skew (Q the Jacobsthal matrix)."""
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) (q = 1 mod 4): C = [[0, 1^T], [1, Q]] symmetric conference matrix; replace 0 by
    [[1, -1], [-1, -1]] and +-1 by +-[[1, 1], [1, -1]]."""
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, one) + torch.kron((C == 0).double(), zero)


def orbits(v: int, gen: int) -> list[list[int]]:
    """The orbits of Z_v under multiplication by the powers of `gen`, sorted by least element."""
    seen, out = set(), []
    for x in range(v):
        if x not in seen:
            orb, y = [x], (x * gen) % v
            while y != x:
                orb.append(y)
                y = (y * gen) % v
            seen.update(orb)
            out.append(sorted(orb))
    return out


def _circulant(a: torch.Tensor) -> torch.Tensor:
    """The circulant matrix with first row a: C[i, j] = a[(j - i) mod v]."""
    v = a.shape[0]
    idx = (torch.arange(v)[None, :] - torch.arange(v)[:, None]) % v
    return a[idx]


def _goethals_seidel(m: int) -> torch.Tensor:
    """Order m = 4v from GS_SEEDS: [[A, BR, CR, DR], [-BR, A, D^T R, -C^T R], [-CR, -D^T R, A, B^T R],
    [-DR, C^T R, -B^T R, A]], R the back-diagonal permutation."""
    v, gen, signs = GS_SEEDS[m]
    orbs = orbits(v, gen)
    rows = []
    for sg in signs:
        a = torch.empty(v, dtype=torch.float64)
        for o, s in zip(orbs, sg, strict=True):
            a[o] = float(s)
        rows.append(_circulant(a))
    A, B, C, D = rows
    R = torch.eye(v, dtype=torch.float64).flip(1)
    return torch.cat([torch.cat(r, 1) for r in (
        (A, B @ R, C @ R, D @ R),
        (-B @ R, A, D.t() @ R, -C.t() @ R),
        (-C @ R, -D.t() @ R, A, B.t() @ R),
        (-D @ R, C.t() @ R, -B.t() @ R, A))], 0)


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.kron(h2, H)
    return H


@functools.lru_cache(maxsize=None)
@outside_inference
def factor_matrix(m: int) -> torch.Tensor:
    """A Hadamard matrix of order m (a power of two, or one of the constructible factors), float64."""
    if m & (m - 1) == 0:
        H = _sylvester(m)
    elif m in GS_SEEDS:
        H = _goethals_seidel(m)
    elif m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        H = _paley1(m - 1)
    elif m % 4 == 0 and (m // 2 - 1) % 4 == 1 and (_is_prime(m // 2 - 1) or _is_prime(round((m // 2 - 1) ** 0.5))
                                                   and round((m // 2 - 1) ** 0.5) ** 2 == m // 2 - 1):
        H = _paley2(m // 2 - 1)
    elif m % 2 == 0 and m // 2 in FACTORS:
        H = torch.kron(_sylvester(2), factor_matrix(m // 2))
    else:
        raise ValueError(f"no Hadamard matrix of order {m} is constructed here; factors: {', '.join(map(str, FACTORS))}"
                         f" (and powers of two)")
    if not torch.equal(H @ H.t(), m * torch.eye(m, dtype=torch.float64)):
        raise AssertionError(f"internal error: the order-{m} construction is not Hadamard")
    return H


def split_size(n: int) -> tuple[int, int]:
    """n = m * 2^k with m 1 or a supported factor (the largest power of two); ValueError otherwise."""
    if n <= 0:
        raise ValueError(f"hadamard: size must be positive, got {n}")
    k = (n & -n)
    m = n // k
    if m == 1:
        return 1, n
    for f in sorted(FACTORS, reverse=True):       # m * 2^k with m a factor times a power of two
        if n % f == 0 and (n // f) & (n // f - 1) == 0:
            return f, n // f
    raise ValueError(f"hadamard: size {n} = {m} x 2^{int(math.log2(k))} is not supported; supported: powers of two "
                     f"and m x 2^k with m in {{{', '.join(map(str, FACTORS))}}}")


def hadamard_matrix(n: int) -> torch.Tensor:
    m, p = split_size(n)
    return torch.kron(factor_matrix(m), _sylvester(p)) if m > 1 else _sylvester(p)


def hadamard(x: torch.Tensor, scale: float | None = None, transpose: bool = False) -> torch.Tensor:
    """x @ H_n^T * scale on the last dim (default scale 1/sqrt(n): orthonormal; transpose: x @ H_n * scale,
    the inverse of the orthonormal transform and its backward), computed in float64 by a butterfly over
    the power of two and a matmul with the factor; returned in x's dtype."""
    n = x.shape[-1]
    m, p = split_size(n)
    s = 1.0 / math.sqrt(n) if scale is None else float(scale)
    y = x.double().reshape(-1, m, p)
    h = 1
    while h < p:                                   # Sylvester butterflies along the power-of-two axis
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2).reshape(-1, m, p)
        h *= 2
    if m > 1:
        f = factor_matrix(m).to(y.device)
        y = torch.einsum("ij,bjp->bip", f.t() if transpose else f, y)
    return (y.reshape(x.shape) * s).to(x.dtype).contiguous()
