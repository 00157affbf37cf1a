"""Small Triton kernels that exercise `tests/helpers/aot.py` (the sm_90 ahead-of-time compile helper).

Kept in their own module because the AOT child process imports the kernel module by name with the interpreter off;
they are not product kernels and nothing in nftcore imports them.
"""

import triton
import triton.language as tl


@triton.jit
def add_kernel(X, Y, Out, n, BLOCK: tl.constexpr):
    """Out[i] = X[i] + Y[i] over a 1-D buffer of `n` elements: no dot, no atomics."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(Out + offs, tl.load(X + offs, mask=m) + tl.load(Y + offs, mask=m), mask=m)


@triton.jit
def matmul_kernel(A, B, C, M, N, K, stride_am, stride_bk, stride_cm,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N], row-major, fp32 accumulate; M, N, K multiples of the blocks (no masks).

    BK < 16 is the point of one test: the interpreter runs it, the GPU compiler rejects it.
    """
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(A + rm[:, None] * stride_am + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * stride_bk + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty))


@triton.jit
def atomic_sum_kernel(X, Out, n, BLOCK: tl.constexpr):
    """Out[0] += sum(X): each program reduces its block, then one `tl.atomic_add` into a fp32 scalar."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.atomic_add(Out, tl.sum(x, axis=0))
