"""The fused steps' Triton kernels: a fixed number of launches per step, whatever the number of layers.

On CUDA these are the ``fused=True`` backend (``fused="triton"`` asks for them explicitly); on the CPU they run
through Triton's interpreter under ``TRITON_INTERPRET=1``, which is how the tests check their numbers without a
GPU (tests/optim/test_triton_compile.py compiles each of them for CUDA targets ahead of time). This module
imports Triton; koala_hf.optim.triton_runtime imports it on first use, so that importing koala_hf does not.

The layers of a step are bucketed by dtype, across parameter groups (koala_hf.optim.triton_step). Per bucket
a step launches three kernels:

1. a reduction: one program per chunk of ``CHUNK`` elements of any layer computes the chunk's sums (KOALA++:
   ``H.H``, ``H.H_prev``, ``H.v_prev``, ``theta.theta``, E11-E13; KOALA-V: ``H.H``, ``theta.theta``, E21;
   KOALA-M: those and ``d.d``, ``d.H`` with ``d = w_avg - theta``, E30, E33), ``H = g + wd theta`` (E3) formed
   on the fly and never stored;
2. a combination: one program per layer adds its chunks' sums in chunk order, in float64, so that the sums
   are the same bits on every run (no atomics): resumed and data-parallel runs stay bit-identical;
3. an update: one program per chunk applies the layer's row of coefficients (KOALA++: E14, E16, E17;
   KOALA-V: E21; KOALA-M: E33, E34 and E31's predict), masked by the step's ``ok`` flag read on the device: a
   skipped step writes nothing and never reads the gradient, and no value is read back to the host.

The scalar algebra in between is the variants' vectorised coefficient functions over the stacked sums. A
layer's tensors are read through a table of addresses (``data_ptr``). Arithmetic runs in float32 (float64 for
float64 parameters); float16 and bfloat16 tensors are read and written in their own dtype. Compile-time
arguments are annotated ``tl.constexpr``: Triton's compiler resolves the annotation, its interpreter does not
look at it.
"""

import triton
import triton.language as tl

@triton.jit
def _chunk(table, chunks, WIDTH: tl.constexpr):
    """This program's chunk: its index, its layer, the layer's first element in it, and the layer's size."""
    pid = tl.program_id(0)
    layer = tl.load(chunks + 2 * pid)
    return pid, layer, tl.load(chunks + 2 * pid + 1), tl.load(table + layer * WIDTH + WIDTH - 1)


@triton.jit
def _address(table, layer, column, WIDTH: tl.constexpr, DTYPE: tl.constexpr):
    """The layer's tensor of list ``column``, as a pointer to ``DTYPE``. (Triton 3.0's compiler hands ``DTYPE`` to
    ``tl.pointer_type`` still wrapped as a constexpr; its ``getattr`` unwraps its arguments, later Tritons' and the
    interpreter's find no ``value`` and return the dtype as it is.)"""
    return tl.load(table + layer * WIDTH + column).to(tl.pointer_type(getattr(DTYPE, "value", DTYPE)))


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """``x`` (float32 or float64) in the storage dtype, rounded to nearest even, as torch rounds: done by hand for
    bfloat16, whose cast Triton's interpreter truncates (compiled Triton rounds; these are then the same bits)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


# They take ``table``: int64 [n_layers, WIDTH], each layer's tensor addresses (one column per list) and, in the
# last column, its number of elements; ``chunks``: int64 [n_chunks, 2], a chunk's layer and first element;
# ``decays``: float64 [n_layers], the layer's weight decay; ``rows``: int64 [n_layers], the layer's row in the
# step's sums and coefficient tables; ``partials``: [n_chunks, K], a chunk's sums.

@triton.jit
def koala_plus_plus_partials(table, chunks, decays, partials, WIDTH: tl.constexpr, DTYPE: tl.constexpr,
                              ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, 0, WIDTH, DTYPE)
    g = _address(table, layer, 1, WIDTH, DTYPE)
    hp = _address(table, layer, 2, WIDTH, DTYPE)
    v = _address(table, layer, 3, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    hh = tl.zeros((BLOCK,), dtype=ACC)
    h_hp = tl.zeros((BLOCK,), dtype=ACC)
    h_v = tl.zeros((BLOCK,), dtype=ACC)
    th_th = tl.zeros((BLOCK,), dtype=ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        inside = index < numel
        th = tl.load(p + index, mask=inside, other=0.0).to(ACC)
        h = tl.load(g + index, mask=inside, other=0.0).to(ACC) + wd * th
        hh += h * h
        h_hp += h * tl.load(hp + index, mask=inside, other=0.0).to(ACC)
        h_v += h * tl.load(v + index, mask=inside, other=0.0).to(ACC)
        th_th += th * th
    out = partials + pid * 4
    tl.store(out, tl.sum(hh, axis=0))
    tl.store(out + 1, tl.sum(h_hp, axis=0))
    tl.store(out + 2, tl.sum(h_v, axis=0))
    tl.store(out + 3, tl.where(wd != 0.0, tl.sum(th_th, axis=0), 0.0))  # theta.theta only enters through wd (E3)


@triton.jit
def jacobian_partials(table, chunks, decays, partials, WIDTH: tl.constexpr, DTYPE: tl.constexpr,
                       ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, K: tl.constexpr):
    """KOALA-V (``K = 2``): ``[H.H, theta.theta]``; KOALA-M (``K = 4``, list 2 = ``w_avg``): and ``[d.d, d.H]``."""
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, 0, WIDTH, DTYPE)
    g = _address(table, layer, 1, WIDTH, DTYPE)
    w = _address(table, layer, 2, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    hh = tl.zeros((BLOCK,), dtype=ACC)
    th_th = tl.zeros((BLOCK,), dtype=ACC)
    dd = tl.zeros((BLOCK,), dtype=ACC)
    dh = tl.zeros((BLOCK,), dtype=ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        inside = index < numel
        th = tl.load(p + index, mask=inside, other=0.0).to(ACC)
        h = tl.load(g + index, mask=inside, other=0.0).to(ACC) + wd * th
        hh += h * h
        th_th += th * th
        if K == 4:
            d = tl.load(w + index, mask=inside, other=0.0).to(ACC) - th
            dd += d * d
            dh += d * h
    out = partials + pid * K
    tl.store(out, tl.sum(hh, axis=0))
    tl.store(out + 1, tl.where(wd != 0.0, tl.sum(th_th, axis=0), 0.0))
    if K == 4:
        tl.store(out + 2, tl.sum(dd, axis=0))
        tl.store(out + 3, tl.sum(dh, axis=0))


@triton.jit
def combine(partials, spans, rows, sums, K: tl.constexpr, KP: tl.constexpr):
    """One program per layer: its chunks' sums added in chunk order, in float64, into its row of ``sums``."""
    layer = tl.program_id(0)
    first = tl.load(spans + 2 * layer)
    count = tl.load(spans + 2 * layer + 1)
    columns = tl.arange(0, KP)
    used = columns < K
    total = tl.zeros((KP,), dtype=tl.float64)
    for chunk in range(0, count):
        total += tl.load(partials + (first + chunk) * K + columns, mask=used, other=0.0).to(tl.float64)
    tl.store(sums + tl.load(rows + layer) * K + columns, total, mask=used)


@triton.jit
def koala_plus_plus_update(table, chunks, rows, decays, coefficients, ok, WIDTH: tl.constexpr,
                            DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """E14, E16, E17 with the layer's coefficients ``C_V ... TAKE_H`` (koala_plus_plus.py), masked by ``ok``."""
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, 0, WIDTH, DTYPE)
    g = _address(table, layer, 1, WIDTH, DTYPE)
    hp = _address(table, layer, 2, WIDTH, DTYPE)
    v = _address(table, layer, 3, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    go = tl.load(ok) != 0  # a skipped step writes nothing and never reads the gradient
    c = coefficients + tl.load(rows + layer) * 7
    c_v = tl.load(c).to(ACC)
    c_h = tl.load(c + 1).to(ACC)
    c_hp = tl.load(c + 2).to(ACC)
    step_v = tl.load(c + 3).to(ACC)
    step_h = tl.load(c + 4).to(ACC)
    keep_hp = tl.load(c + 5).to(ACC)
    take_h = tl.load(c + 6).to(ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        inside = (index < numel) & go
        th = tl.load(p + index, mask=inside, other=0.0).to(ACC)
        h = tl.load(g + index, mask=inside, other=0.0).to(ACC) + wd * th
        h_prev = tl.load(hp + index, mask=inside, other=0.0).to(ACC)
        v_new = c_v * tl.load(v + index, mask=inside, other=0.0).to(ACC) + c_h * h + c_hp * h_prev
        tl.store(p + index, _rounded(th + step_v * v_new + step_h * h, DTYPE), mask=inside)
        tl.store(hp + index, _rounded(keep_hp * h_prev + take_h * h, DTYPE), mask=inside)
        tl.store(v + index, _rounded(v_new, DTYPE), mask=inside)


@triton.jit
def koala_v_update(table, chunks, rows, decays, coefficients, ok, WIDTH: tl.constexpr, DTYPE: tl.constexpr,
                    ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """E21: ``theta += step H`` with the layer's step, masked by ``ok``."""
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, 0, WIDTH, DTYPE)
    g = _address(table, layer, 1, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    go = tl.load(ok) != 0
    step = tl.load(coefficients + tl.load(rows + layer)).to(ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        inside = (index < numel) & go
        th = tl.load(p + index, mask=inside, other=0.0).to(ACC)
        h = tl.load(g + index, mask=inside, other=0.0).to(ACC) + wd * th
        tl.store(p + index, _rounded(th + step * h, DTYPE), mask=inside)


@triton.jit
def koala_m_update(table, chunks, rows, decays, coefficients, ok, decay, WIDTH: tl.constexpr,
                    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """E33, E34 with the layer's coefficients ``STEP_THETA ... TAKE_THETA`` (koala_m.py), then E31's predict
    ``theta += u, u *= a`` from theta and u as stored (rounded where 16-bit, as the eager paths do); masked."""
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, 0, WIDTH, DTYPE)
    g = _address(table, layer, 1, WIDTH, DTYPE)
    w = _address(table, layer, 2, WIDTH, DTYPE)
    u = _address(table, layer, 3, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    go = tl.load(ok) != 0
    c = coefficients + tl.load(rows + layer) * 4
    k_theta = tl.load(c).to(ACC)
    k_u = tl.load(c + 1).to(ACC)
    keep = tl.load(c + 2).to(ACC)
    take = tl.load(c + 3).to(ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        inside = (index < numel) & go
        th = tl.load(p + index, mask=inside, other=0.0).to(ACC)
        h = tl.load(g + index, mask=inside, other=0.0).to(ACC) + wd * th
        th_post = th + k_theta * h
        u_post = _rounded(tl.load(u + index, mask=inside, other=0.0).to(ACC) + k_u * h, DTYPE).to(ACC)
        tl.store(w + index, _rounded(keep * tl.load(w + index, mask=inside, other=0.0).to(ACC) + take * th_post, DTYPE),
                 mask=inside)
        tl.store(p + index, _rounded(_rounded(th_post, DTYPE).to(ACC) + u_post, DTYPE), mask=inside)
        tl.store(u + index, _rounded(decay * u_post, DTYPE), mask=inside)


@triton.jit
def probe(source, target):
    """Adds one to two elements: whether Triton's interpreter writes CPU tensors (koala_hf.optim.triton_runtime)."""
    index = tl.arange(0, 2)
    tl.store(target + index, tl.load(source + index) + 1.0)


# Built in the mode Triton was imported in: interpreted (CPU tensors) or compiled (CUDA).
INTERPRETED = type(probe).__name__ == "InterpretedFunction"
# The launched kernels, by name (koala_hf.optim.triton_step launches them through triton_runtime.launch).
LAUNCHED = {kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__: kernel for kernel in (
    koala_plus_plus_partials, jacobian_partials, combine, koala_plus_plus_update, koala_v_update, koala_m_update)}
