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
layer's tensors are read through a table of addresses (``data_ptr``), its lists in the variant's order, and
the sums and coefficients are read and written in the variant's columns: every position is a ``tl.constexpr``
argument taken from koala_hf.optim.layouts. Arithmetic runs in float32 (float64 for
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
def _finite(x):
    """Elementwise: ``x`` is neither infinite nor NaN (``x - x`` is then exactly 0)."""
    return (x - x) == 0.0


# The scalar step after the reduction, in one program for every layer of the step: ``sums`` [n_layers, N_SUM] in
# the arithmetic dtype, ``filters`` int64 [n_layers] the address of each layer's ``filter`` state (ACC, written
# in place, its columns FILTER_*), ``groups`` int64 [n_layers] a layer's parameter group, ``hyper`` float64
# [n_groups, N_HYPER] a group's hyperparameters (HYPER_* their columns; HYPER_R is NaN where R_k is estimated,
# HYPER_MODE 0, 1, 2 for E1a, E1b, E1c), ``stats`` the measurement's sums (koala_hf.measurement), and the
# filter-wide state: ``noise`` [n_groups] R_k (read, then written where the step is taken), the counters
# ``steps``, ``skipped``, ``negatives`` and the last ``loss``; writes ``ok_out`` (the step was taken) and
# ``coefficients`` [n_layers, N_COEF].

@triton.jit
def _noise_estimate(hyper, noise, group, inside, measured_noise, measured_loss, N_HYPER: tl.constexpr,
                    HYPER_R: tl.constexpr, HYPER_MODE: tl.constexpr, HYPER_ALPHA_R: tl.constexpr,
                    HYPER_ONE_MINUS_ALPHA_R: tl.constexpr, ACC: tl.constexpr):
    """R_{k-1} and R_k of ``group`` (E2): its fixed ``r``, or ``alpha_r R_{k-1} + (1 - alpha_r) m_k`` with m_k by
    its mode (E1a-E1c), as koala_hf.optim.noise computes it."""
    h = hyper + group * N_HYPER
    previous = tl.load(noise + group, mask=inside, other=1.0).to(ACC)
    fixed = tl.load(h + HYPER_R, mask=inside, other=0.0).to(ACC)
    mode = tl.load(h + HYPER_MODE, mask=inside, other=0.0)
    alpha = tl.load(h + HYPER_ALPHA_R, mask=inside, other=0.0).to(ACC)
    one_minus_alpha = tl.load(h + HYPER_ONE_MINUS_ALPHA_R, mask=inside, other=0.0).to(ACC)
    variance = tl.maximum(measured_noise - measured_loss * measured_loss, 0.0)
    m = tl.where(mode == 0.0, measured_noise, tl.where(mode == 1.0, variance, 0.0))
    return previous, tl.where(fixed == fixed, fixed, alpha * previous + one_minus_alpha * m)


@triton.jit
def koala_plus_plus_coefficients(sums, filters, groups, hyper, stats, noise, steps, skipped, negatives, loss,
                                 ok_out, coefficients, n_layers, n_groups,
                                 ACC: tl.constexpr, LAYERS: tl.constexpr, N_SUM: tl.constexpr,
                                 SUM_HH: tl.constexpr, SUM_H_HPREV: tl.constexpr, SUM_H_V: tl.constexpr,
                                 SUM_THETA_THETA: tl.constexpr, N_COEF: tl.constexpr, COEF_C_V: tl.constexpr,
                                 COEF_C_H: tl.constexpr, COEF_C_HP: tl.constexpr, COEF_STEP_V: tl.constexpr,
                                 COEF_STEP_H: tl.constexpr, COEF_KEEP_HP: tl.constexpr, COEF_TAKE_H: tl.constexpr,
                                 N_HYPER: tl.constexpr, HYPER_LR: tl.constexpr, HYPER_SIGMA: tl.constexpr,
                                 HYPER_Q: tl.constexpr, HYPER_SIGMA_PLUS_Q: tl.constexpr,
                                 HYPER_HALF_DECAY: tl.constexpr, HYPER_SYMMETRIC: tl.constexpr,
                                 HYPER_R: tl.constexpr, HYPER_MODE: tl.constexpr, HYPER_ALPHA_R: tl.constexpr,
                                 HYPER_ONE_MINUS_ALPHA_R: tl.constexpr,
                                 FILTER_S_PREV: tl.constexpr, FILTER_HH_PREV: tl.constexpr,
                                 FILTER_VH_PREV: tl.constexpr, FILTER_READY: tl.constexpr, MIN_HH: tl.constexpr):
    """A KOALA++ step's scalar part in one program: E1 from the measurement's sums (as
    koala_hf.measurement.loss_and_noise), E2 per group, whether the step may be taken (the loss and noise
    finite, the loss not negative, every sum finite: as koala_hf.optim.step_inputs and group_step.complete_sums
    decide), E10-E17 for every layer in blocks of ``LAYERS`` (as koala_plus_plus.kalman_coefficients), and the
    filter-wide state's update (as StepInputs.record)."""
    loss_sum = tl.load(stats + 0)
    square_sum = tl.load(stats + 1)
    count = tl.load(stats + 2)
    mean = loss_sum / count
    measured_noise = tl.where(tl.load(stats + 3) > 0, mean * mean, square_sum / count).to(ACC)  # E1
    measured_loss = mean.to(ACC)
    negative = measured_loss < 0.0
    offsets = tl.arange(0, LAYERS)
    bad = tl.zeros((LAYERS,), dtype=tl.int32)
    for start in range(0, n_layers, LAYERS):
        rows = start + offsets
        inside = rows < n_layers
        for k in tl.static_range(N_SUM):
            x = tl.load(sums + rows * N_SUM + k, mask=inside, other=0.0)
            bad += (inside & ~_finite(x)).to(tl.int32)
    go = _finite(measured_loss) & _finite(measured_noise) & ~negative & (tl.sum(bad, axis=0) == 0)
    for start in range(0, n_layers, LAYERS):
        rows = start + offsets
        inside = rows < n_layers
        row = sums + rows * N_SUM
        hh = tl.load(row + SUM_HH, mask=inside, other=1.0).to(ACC)
        a = tl.load(row + SUM_H_HPREV, mask=inside, other=1.0).to(ACC)
        b = tl.load(row + SUM_H_V, mask=inside, other=1.0).to(ACC)
        theta_sq = tl.load(row + SUM_THETA_THETA, mask=inside, other=0.0).to(ACC)
        state = tl.load(filters + rows, mask=inside, other=0).to(tl.pointer_type(ACC))
        kept_s_prev = tl.load(state + FILTER_S_PREV, mask=inside, other=1.0)
        kept_x = tl.load(state + FILTER_HH_PREV, mask=inside, other=1.0)
        kept_y = tl.load(state + FILTER_VH_PREV, mask=inside, other=0.0)
        ready_value = tl.load(state + FILTER_READY, mask=inside, other=0.0)
        ready = ready_value > 0
        group = tl.load(groups + rows, mask=inside, other=0)
        h = hyper + group * N_HYPER
        lr = tl.load(h + HYPER_LR, mask=inside, other=0.0).to(ACC)
        sigma = tl.load(h + HYPER_SIGMA, mask=inside, other=0.0).to(ACC)
        q = tl.load(h + HYPER_Q, mask=inside, other=0.0).to(ACC)
        sigma_plus_q = tl.load(h + HYPER_SIGMA_PLUS_Q, mask=inside, other=1.0).to(ACC)  # no 0/0 past the layers
        half_decay = tl.load(h + HYPER_HALF_DECAY, mask=inside, other=0.0).to(ACC)
        symmetric = tl.load(h + HYPER_SYMMETRIC, mask=inside, other=0.0) != 0
        _, r = _noise_estimate(hyper, noise, group, inside, measured_noise, measured_loss, N_HYPER, HYPER_R, HYPER_MODE,
                               HYPER_ALPHA_R, HYPER_ONE_MINUS_ALPHA_R, ACC)
        # E10: a layer without history starts from v_prev = sigma H, H_prev = H.
        s_prev = tl.where(ready, kept_s_prev, sigma_plus_q * hh + r)
        x = tl.where(ready, kept_x, hh)
        y = tl.where(ready, kept_y, sigma * hh)
        a = tl.where(ready, a, hh)
        b = tl.where(ready, b, sigma * hh)
        lam = (b + q * a) / s_prev  # E11
        alpha = a / x  # E12
        rho = tl.where(symmetric, b / x - a * y / (x * x), 0.0)  # E13
        c_v = alpha - lam  # E14
        c_hp = rho - q * lam
        c_h = tl.where(ready, q, sigma * c_v + q + c_hp)
        c_v = tl.where(ready, c_v, 0.0)
        c_hp = tl.where(ready, c_hp, 0.0)
        vh = c_v * b + c_h * hh + c_hp * a
        s = vh + q * hh + r  # E15
        gain = lr * (measured_loss + half_decay * theta_sq) / s  # E16
        stable = (s > 0) & _finite(s) & _finite(gain) & _finite(c_v) & _finite(c_h) & _finite(c_hp)
        usable = tl.where(go, hh >= MIN_HH, False)  # (a scalar flag & a block: Triton's interpreter refuses it)
        update = usable & stable
        keep = tl.where(usable & ~stable, 0.0, 1.0)  # an unstable layer restarts from E10
        out = coefficients + rows * N_COEF
        tl.store(out + COEF_C_V, tl.where(update, c_v, keep), mask=inside)
        tl.store(out + COEF_C_H, tl.where(update, c_h, 0.0), mask=inside)
        tl.store(out + COEF_C_HP, tl.where(update, c_hp, 0.0), mask=inside)
        tl.store(out + COEF_STEP_V, tl.where(update, -gain, 0.0), mask=inside)
        tl.store(out + COEF_STEP_H, tl.where(update, -gain * q, 0.0), mask=inside)
        tl.store(out + COEF_KEEP_HP, tl.where(update, 0.0, keep), mask=inside)
        tl.store(out + COEF_TAKE_H, tl.where(update, 1.0, 0.0), mask=inside)
        # E17, or the filter as it was (cleared where the layer restarts).
        tl.store(state + FILTER_S_PREV, tl.where(update, s, kept_s_prev * keep), mask=inside)
        tl.store(state + FILTER_HH_PREV, tl.where(update, hh, kept_x * keep), mask=inside)
        tl.store(state + FILTER_VH_PREV, tl.where(update, vh, kept_y * keep), mask=inside)
        tl.store(state + FILTER_READY, tl.where(update, 1.0, ready_value * keep), mask=inside)
    tl.debug_barrier()  # every R_{k-1} above is read before R_k is written below
    for start in range(0, n_groups, LAYERS):
        rows = start + offsets
        inside = rows < n_groups
        previous, estimate = _noise_estimate(hyper, noise, rows, inside, measured_noise, measured_loss, N_HYPER,
                                             HYPER_R, HYPER_MODE, HYPER_ALPHA_R, HYPER_ONE_MINUS_ALPHA_R, ACC)
        tl.store(noise + rows, tl.where(go, estimate, previous), mask=inside)
    tl.store(ok_out, go)
    tl.store(skipped, tl.load(skipped) + tl.where(go, 0, 1))
    tl.store(negatives, tl.load(negatives) + tl.where(negative, 1, 0))
    tl.store(steps, tl.load(steps) + tl.where(go, 1, 0))  # steps taken; skipped ones are counted apart
    tl.store(loss, tl.where(go, measured_loss, tl.load(loss)))


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
    koala_plus_plus_update, koala_v_update, koala_m_update)}
