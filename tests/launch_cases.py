"""A small Triton kernel for the fast-launch tests (tests/test_triton_launch*.py): pointers, ints Triton
specializes (n, stride), one it does not (seed), a float, and two constexprs."""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed"])
def axpy(x_ptr, y_ptr, out_ptr, n, stride, seed, alpha, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = x[i * stride] * alpha + y[i] (+ seed with FLAG), i < n."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    v = tl.load(x_ptr + i * stride, mask=m) * alpha + tl.load(y_ptr + i, mask=m)
    if FLAG:
        v = v + seed
    tl.store(out_ptr + i, v, mask=m)
