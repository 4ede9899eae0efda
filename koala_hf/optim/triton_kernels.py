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

In between, each variant runs its whole scalar step in one more launch (koala_hf.optim.triton_scalar_kernels). A
layer's tensors are read through a table of addresses (``data_ptr``), its lists in the variant's order, and
the sums and coefficients are read and written in the variant's columns: every position is a ``tl.constexpr``
argument taken from koala_hf.optim.layouts. Arithmetic runs in float32 (float64 for
float64 parameters); float16 and bfloat16 tensors are read and written in their own dtype. Compile-time
arguments are annotated ``tl.constexpr``: Triton's compiler resolves the annotation, its interpreter does not
look at it.
"""

import triton
import triton.language as tl

from koala_hf.optim.triton_scalar_kernels import koala_m_coefficients, koala_plus_plus_coefficients, koala_v_coefficients

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


@triton.jit
def _theta_and_jacobian(p, g, index, inside, wd, ACC: tl.constexpr):
    """``theta`` and ``H = g + wd theta`` (E3) of a block, in the arithmetic dtype."""
    th = tl.load(p + index, mask=inside, other=0.0).to(ACC)
    return th, tl.load(g + index, mask=inside, other=0.0).to(ACC) + wd * th


# They take ``table``: int64 [n_layers, WIDTH], each layer's tensor addresses (one column per list, in the
# variant's order: koala_hf.optim.layouts) and, in the last column, its number of elements; ``chunks``: int64
# [n_chunks, 2], a chunk's layer and first element; ``decays``: float64 [n_layers], the layer's weight decay;
# ``rows``: int64 [n_layers], the layer's row in the step's sums and coefficient tables; ``partials``:
# [n_chunks, N_SUM], a chunk's sums. ``LIST_*``, ``SUM_*`` and ``COEF_*`` are the layout's positions.

@triton.jit
def koala_plus_plus_partials(table, chunks, decays, partials, WIDTH: tl.constexpr, DTYPE: tl.constexpr,
                             ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                             LIST_PARAM: tl.constexpr, LIST_GRAD: tl.constexpr, LIST_H_PREV: tl.constexpr,
                             LIST_V: tl.constexpr, N_SUM: tl.constexpr, SUM_HH: tl.constexpr,
                             SUM_H_HPREV: tl.constexpr, SUM_H_V: tl.constexpr, SUM_THETA_THETA: tl.constexpr):
    """E11-E13's ``H.H``, ``H.H_prev``, ``H.v_prev`` and E3's ``theta.theta`` of a chunk."""
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, LIST_PARAM, WIDTH, DTYPE)
    g = _address(table, layer, LIST_GRAD, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    hp = _address(table, layer, LIST_H_PREV, WIDTH, DTYPE)
    v = _address(table, layer, LIST_V, WIDTH, DTYPE)
    hh = tl.zeros((BLOCK,), dtype=ACC)
    h_hp = tl.zeros((BLOCK,), dtype=ACC)
    h_v = tl.zeros((BLOCK,), dtype=ACC)
    th_th = tl.zeros((BLOCK,), dtype=ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        inside = index < numel
        th, h = _theta_and_jacobian(p, g, index, inside, wd, ACC)
        hh += h * h
        h_hp += h * tl.load(hp + index, mask=inside, other=0.0).to(ACC)
        h_v += h * tl.load(v + index, mask=inside, other=0.0).to(ACC)
        th_th += th * th
    out = partials + pid * N_SUM
    tl.store(out + SUM_HH, tl.sum(hh, axis=0))
    tl.store(out + SUM_H_HPREV, tl.sum(h_hp, axis=0))
    tl.store(out + SUM_H_V, tl.sum(h_v, axis=0))
    tl.store(out + SUM_THETA_THETA, tl.where(wd != 0.0, tl.sum(th_th, axis=0), 0.0))  # only enters through wd (E3)


@triton.jit
def koala_v_partials(table, chunks, decays, partials, WIDTH: tl.constexpr, DTYPE: tl.constexpr,
                     ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, LIST_PARAM: tl.constexpr,
                     LIST_GRAD: tl.constexpr, N_SUM: tl.constexpr, SUM_HH: tl.constexpr,
                     SUM_THETA_THETA: tl.constexpr):
    """E21's ``H.H`` and E3's ``theta.theta`` of a chunk."""
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, LIST_PARAM, WIDTH, DTYPE)
    g = _address(table, layer, LIST_GRAD, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    hh = tl.zeros((BLOCK,), dtype=ACC)
    th_th = tl.zeros((BLOCK,), dtype=ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        th, h = _theta_and_jacobian(p, g, index, index < numel, wd, ACC)
        hh += h * h
        th_th += th * th
    out = partials + pid * N_SUM
    tl.store(out + SUM_HH, tl.sum(hh, axis=0))
    tl.store(out + SUM_THETA_THETA, tl.where(wd != 0.0, tl.sum(th_th, axis=0), 0.0))


@triton.jit
def koala_m_partials(table, chunks, decays, partials, WIDTH: tl.constexpr, DTYPE: tl.constexpr,
                     ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, LIST_PARAM: tl.constexpr,
                     LIST_GRAD: tl.constexpr, LIST_W_AVG: tl.constexpr, LIST_U: tl.constexpr,
                     N_SUM: tl.constexpr, SUM_HH: tl.constexpr, SUM_THETA_THETA: tl.constexpr,
                     SUM_DD: tl.constexpr, SUM_DH: tl.constexpr):
    """E33's ``H.H``, E3's ``theta.theta`` and E30's ``d.d``, ``d.H`` with ``d = w_avg - theta`` of a chunk."""
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, LIST_PARAM, WIDTH, DTYPE)
    g = _address(table, layer, LIST_GRAD, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    w = _address(table, layer, LIST_W_AVG, WIDTH, DTYPE)
    hh = tl.zeros((BLOCK,), dtype=ACC)
    th_th = tl.zeros((BLOCK,), dtype=ACC)
    dd = tl.zeros((BLOCK,), dtype=ACC)
    dh = tl.zeros((BLOCK,), dtype=ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        inside = index < numel
        th, h = _theta_and_jacobian(p, g, index, inside, wd, ACC)
        hh += h * h
        th_th += th * th
        d = tl.load(w + index, mask=inside, other=0.0).to(ACC) - th
        dd += d * d
        dh += d * h
    out = partials + pid * N_SUM
    tl.store(out + SUM_HH, tl.sum(hh, axis=0))
    tl.store(out + SUM_THETA_THETA, tl.where(wd != 0.0, tl.sum(th_th, axis=0), 0.0))
    tl.store(out + SUM_DD, tl.sum(dd, axis=0))
    tl.store(out + SUM_DH, tl.sum(dh, axis=0))


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
                           N_COEF: tl.constexpr, COEF_C_V: tl.constexpr, COEF_C_H: tl.constexpr,
                           COEF_C_HP: tl.constexpr, COEF_STEP_V: tl.constexpr, COEF_STEP_H: tl.constexpr,
                           COEF_KEEP_HP: tl.constexpr, COEF_TAKE_H: tl.constexpr, LIST_PARAM: tl.constexpr,
                           LIST_GRAD: tl.constexpr, LIST_H_PREV: tl.constexpr, LIST_V: tl.constexpr,
                           DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """E14, E16, E17 with the layer's row of coefficients, masked by ``ok``."""
    go = tl.load(ok) != 0  # a skipped step writes nothing and never reads the gradient
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, LIST_PARAM, WIDTH, DTYPE)
    g = _address(table, layer, LIST_GRAD, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    h_prevs, vs = _address(table, layer, LIST_H_PREV, WIDTH, DTYPE), _address(table, layer, LIST_V, WIDTH, DTYPE)
    c = coefficients + tl.load(rows + layer) * N_COEF
    c_v = tl.load(c + COEF_C_V).to(ACC)
    c_h = tl.load(c + COEF_C_H).to(ACC)
    c_hp = tl.load(c + COEF_C_HP).to(ACC)
    step_v = tl.load(c + COEF_STEP_V).to(ACC)
    step_h = tl.load(c + COEF_STEP_H).to(ACC)
    keep_hp = tl.load(c + COEF_KEEP_HP).to(ACC)
    take_h = tl.load(c + COEF_TAKE_H).to(ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        inside = (index < numel) & go
        th, h = _theta_and_jacobian(p, g, index, inside, wd, ACC)
        h_prev = tl.load(h_prevs + index, mask=inside, other=0.0).to(ACC)
        v_new = c_v * tl.load(vs + index, mask=inside, other=0.0).to(ACC) + c_h * h + c_hp * h_prev
        tl.store(p + index, _rounded(th + step_v * v_new + step_h * h, DTYPE), mask=inside)
        tl.store(h_prevs + index, _rounded(keep_hp * h_prev + take_h * h, DTYPE), mask=inside)
        tl.store(vs + index, _rounded(v_new, DTYPE), mask=inside)


@triton.jit
def koala_v_update(table, chunks, rows, decays, coefficients, ok, WIDTH: tl.constexpr, DTYPE: tl.constexpr,
                   ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, LIST_PARAM: tl.constexpr,
                   LIST_GRAD: tl.constexpr, N_COEF: tl.constexpr, COEF_STEP: tl.constexpr):
    """E21: ``theta += step H`` with the layer's step, masked by ``ok``."""
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, LIST_PARAM, WIDTH, DTYPE)
    g = _address(table, layer, LIST_GRAD, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    go = tl.load(ok) != 0
    step = tl.load(coefficients + tl.load(rows + layer) * N_COEF + COEF_STEP).to(ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        inside = (index < numel) & go
        th, h = _theta_and_jacobian(p, g, index, inside, wd, ACC)
        tl.store(p + index, _rounded(th + step * h, DTYPE), mask=inside)


@triton.jit
def koala_m_update(table, chunks, rows, decays, coefficients, ok, decay, WIDTH: tl.constexpr,
                   DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                   LIST_PARAM: tl.constexpr, LIST_GRAD: tl.constexpr, LIST_W_AVG: tl.constexpr,
                   LIST_U: tl.constexpr, N_COEF: tl.constexpr, COEF_STEP_THETA: tl.constexpr,
                   COEF_STEP_U: tl.constexpr, COEF_KEEP_AVG: tl.constexpr, COEF_TAKE_THETA: tl.constexpr):
    """E33, E34 with the layer's row of coefficients, then E31's predict ``theta += u, u *= a`` from theta and u as
    stored (rounded where 16-bit, as the eager paths do); masked by ``ok``."""
    pid, layer, start, numel = _chunk(table, chunks, WIDTH)
    p = _address(table, layer, LIST_PARAM, WIDTH, DTYPE)
    g = _address(table, layer, LIST_GRAD, WIDTH, DTYPE)
    wd = tl.load(decays + layer).to(ACC)
    w = _address(table, layer, LIST_W_AVG, WIDTH, DTYPE)
    u = _address(table, layer, LIST_U, WIDTH, DTYPE)
    go = tl.load(ok) != 0
    c = coefficients + tl.load(rows + layer) * N_COEF
    k_theta = tl.load(c + COEF_STEP_THETA).to(ACC)
    k_u = tl.load(c + COEF_STEP_U).to(ACC)
    keep = tl.load(c + COEF_KEEP_AVG).to(ACC)
    take = tl.load(c + COEF_TAKE_THETA).to(ACC)
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # the chunk, not past the layer
        index = start + offset + tl.arange(0, BLOCK)
        inside = (index < numel) & go
        th, h = _theta_and_jacobian(p, g, index, inside, wd, ACC)
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
    koala_plus_plus_partials, koala_v_partials, koala_m_partials, combine, koala_plus_plus_coefficients,
    koala_v_coefficients, koala_m_coefficients, koala_plus_plus_update, koala_v_update, koala_m_update)}
