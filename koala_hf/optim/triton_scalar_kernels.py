"""The fused steps' scalar kernels: a step's whole scalar part in one launch of one program (KOALA++, KOALA-V).

Between the reduction and the update (koala_hf.optim.triton_kernels) a step turns each layer's sums into its
update coefficients. Here one program does all of it for every layer of the step, in blocks of ``LAYERS``
layers, so that its cost does not grow with the layers in launches or host time:

1. E1 from the measurement's sums (as koala_hf.measurement.loss_and_noise), and whether the step may be taken:
   the loss and noise finite, the loss not negative, every layer's sums finite (as
   koala_hf.optim.step_inputs and group_step.complete_sums decide);
2. E2 per group (as koala_hf.optim.noise) and the variant's coefficients per layer (KOALA++: E10-E17, as
   koala_plus_plus.kalman_coefficients, its per-layer filter state written in place; KOALA-V: E20-E22, as
   koala_v.koala_v_coefficients, its covariance written in place);
3. the filter-wide state (as StepInputs.record): ``R`` where the step is taken, the counters, the loss.

Common arguments, in order: ``sums`` [n_layers, N_SUM] in the arithmetic dtype ``ACC``, ``groups`` int64
[n_layers] a layer's parameter group, ``hyper`` float64 [n_groups, N_HYPER] a group's hyperparameters (HYPER_*
their columns; HYPER_R is NaN where R_k is estimated, HYPER_MODE 0, 1, 2 for E1a, E1b, E1c; a constant goes
there too, not in a constexpr, which Triton makes a float32), ``stats`` the
measurement's sums, the filter-wide state (``noise`` [n_groups] R_k, the counters ``steps``, ``skipped``,
``negatives``, the last ``loss``), the outputs ``ok_out`` (the step was taken) and ``coefficients``
[n_layers, N_COEF], then ``n_layers`` and ``n_groups``; then the variant's own.
"""

import triton
import triton.language as tl


@triton.jit
def _finite(x):
    """Elementwise: ``x`` is neither infinite nor NaN (``x - x`` is then exactly 0)."""
    return (x - x) == 0.0


@triton.jit
def _measured(stats, sums, n_layers, ACC: tl.constexpr, LAYERS: tl.constexpr, N_SUM: tl.constexpr,
              STAT_LOSS_SUM: tl.constexpr, STAT_SQUARE_SUM: tl.constexpr, STAT_COUNT: tl.constexpr,
              STAT_FALLBACKS: tl.constexpr):
    """E1's loss and noise measurement in ``ACC``, whether the loss is negative, and whether the step may be taken
    (``stats``: the measurement's sums, STAT_* their positions, koala_hf.measurement.STATS)."""
    count = tl.load(stats + STAT_COUNT)
    mean = tl.load(stats + STAT_LOSS_SUM) / count
    noise = tl.where(tl.load(stats + STAT_FALLBACKS) > 0, mean * mean, tl.load(stats + STAT_SQUARE_SUM) / count)
    measured_noise = noise.to(ACC)
    measured_loss = mean.to(ACC)
    offsets = tl.arange(0, LAYERS)
    bad = tl.zeros((LAYERS,), dtype=tl.int32)
    for start in range(0, n_layers, LAYERS):
        rows = start + offsets
        inside = rows < n_layers
        for k in tl.static_range(N_SUM):
            x = tl.load(sums + rows * N_SUM + k, mask=inside, other=0.0)
            bad += (inside & ~_finite(x)).to(tl.int32)
    go = _finite(measured_loss) & _finite(measured_noise) & (measured_loss >= 0.0) & (tl.sum(bad, axis=0) == 0)
    return measured_loss, measured_noise, measured_loss < 0.0, go


@triton.jit
def _noise_estimate(hyper, noise, group, inside, measured_noise, measured_loss, N_HYPER: tl.constexpr,
                    HYPER_R: tl.constexpr, HYPER_MODE: tl.constexpr, HYPER_ALPHA_R: tl.constexpr,
                    HYPER_ONE_MINUS_ALPHA_R: tl.constexpr, ACC: tl.constexpr):
    """R_{k-1} and R_k of ``group`` (E2): its fixed ``r``, or ``alpha_r R_{k-1} + (1 - alpha_r) m_k`` with m_k by
    its mode (E1a-E1c)."""
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
def _layers(sums, groups, hyper, noise, start, n_layers, measured_noise, measured_loss, ACC: tl.constexpr,
            LAYERS: tl.constexpr, N_SUM: tl.constexpr, SUM_HH: tl.constexpr, SUM_THETA_THETA: tl.constexpr,
            N_HYPER: tl.constexpr, HYPER_LR: tl.constexpr, HYPER_HALF_DECAY: tl.constexpr, HYPER_R: tl.constexpr,
            HYPER_MODE: tl.constexpr, HYPER_ALPHA_R: tl.constexpr, HYPER_ONE_MINUS_ALPHA_R: tl.constexpr):
    """A block of layers from ``start``: their rows, which of them exist, their rows of sums, ``H.H`` and
    ``theta.theta``, their groups, the groups' lr and wd/2, and R_k (E2)."""
    rows = start + tl.arange(0, LAYERS)
    inside = rows < n_layers
    row = sums + rows * N_SUM
    hh = tl.load(row + SUM_HH, mask=inside, other=1.0).to(ACC)
    theta_sq = tl.load(row + SUM_THETA_THETA, mask=inside, other=0.0).to(ACC)
    group = tl.load(groups + rows, mask=inside, other=0)
    lr = tl.load(hyper + group * N_HYPER + HYPER_LR, mask=inside, other=0.0).to(ACC)
    half_decay = tl.load(hyper + group * N_HYPER + HYPER_HALF_DECAY, mask=inside, other=0.0).to(ACC)
    _, r = _noise_estimate(hyper, noise, group, inside, measured_noise, measured_loss, N_HYPER, HYPER_R, HYPER_MODE,
                           HYPER_ALPHA_R, HYPER_ONE_MINUS_ALPHA_R, ACC)
    return rows, inside, row, hh, theta_sq, group, lr, half_decay, r


@triton.jit
def _record(hyper, noise, steps, skipped, negatives, loss, ok_out, n_groups, go, negative, measured_noise,
            measured_loss, LAYERS: tl.constexpr, N_HYPER: tl.constexpr, HYPER_R: tl.constexpr,
            HYPER_MODE: tl.constexpr, HYPER_ALPHA_R: tl.constexpr, HYPER_ONE_MINUS_ALPHA_R: tl.constexpr,
            ACC: tl.constexpr):
    """The filter-wide state after the step: R_k where it was taken, the counters, the loss; and ``ok_out``."""
    tl.debug_barrier()  # every R_{k-1} the layers read is read before R_k is written
    offsets = tl.arange(0, LAYERS)
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
def koala_plus_plus_coefficients(sums, groups, hyper, stats, noise, steps, skipped, negatives, loss, ok_out,
                                 coefficients, n_layers, n_groups, filters,
                                 ACC: tl.constexpr, LAYERS: tl.constexpr, STAT_LOSS_SUM: tl.constexpr,
                         STAT_SQUARE_SUM: tl.constexpr, STAT_COUNT: tl.constexpr, STAT_FALLBACKS: tl.constexpr,
                         N_SUM: tl.constexpr,
                                 SUM_HH: tl.constexpr, SUM_H_HPREV: tl.constexpr, SUM_H_V: tl.constexpr,
                                 SUM_THETA_THETA: tl.constexpr, N_COEF: tl.constexpr, COEF_C_V: tl.constexpr,
                                 COEF_C_H: tl.constexpr, COEF_C_HP: tl.constexpr, COEF_STEP_V: tl.constexpr,
                                 COEF_STEP_H: tl.constexpr, COEF_KEEP_HP: tl.constexpr, COEF_TAKE_H: tl.constexpr,
                                 N_HYPER: tl.constexpr, HYPER_LR: tl.constexpr, HYPER_HALF_DECAY: tl.constexpr,
                                 HYPER_R: tl.constexpr, HYPER_MODE: tl.constexpr, HYPER_ALPHA_R: tl.constexpr,
                                 HYPER_ONE_MINUS_ALPHA_R: tl.constexpr, HYPER_SIGMA: tl.constexpr,
                                 HYPER_Q: tl.constexpr, HYPER_SIGMA_PLUS_Q: tl.constexpr,
                                 HYPER_SYMMETRIC: tl.constexpr, FILTER_S_PREV: tl.constexpr,
                                 FILTER_HH_PREV: tl.constexpr, FILTER_VH_PREV: tl.constexpr,
                                 FILTER_READY: tl.constexpr, HYPER_MIN_HH: tl.constexpr):
    """KOALA++'s scalar step; ``filters``: int64 [n_layers], the address of each layer's ``filter`` state (ACC,
    its columns FILTER_*), read and written in place (E17)."""
    measured_loss, measured_noise, negative, go = _measured(stats, sums, n_layers, ACC, LAYERS, N_SUM, STAT_LOSS_SUM,
                                                          STAT_SQUARE_SUM, STAT_COUNT, STAT_FALLBACKS)
    for start in range(0, n_layers, LAYERS):
        rows, inside, row, hh, theta_sq, group, lr, half_decay, r = _layers(
            sums, groups, hyper, noise, start, n_layers, measured_noise, measured_loss, ACC, LAYERS, N_SUM, SUM_HH,
            SUM_THETA_THETA, N_HYPER, HYPER_LR, HYPER_HALF_DECAY, HYPER_R, HYPER_MODE, HYPER_ALPHA_R,
            HYPER_ONE_MINUS_ALPHA_R)
        a = tl.load(row + SUM_H_HPREV, mask=inside, other=1.0).to(ACC)
        b = tl.load(row + SUM_H_V, mask=inside, other=1.0).to(ACC)
        state = tl.load(filters + rows, mask=inside, other=0).to(tl.pointer_type(ACC))
        kept_s_prev = tl.load(state + FILTER_S_PREV, mask=inside, other=1.0)
        kept_x = tl.load(state + FILTER_HH_PREV, mask=inside, other=1.0)
        kept_y = tl.load(state + FILTER_VH_PREV, mask=inside, other=0.0)
        ready_value = tl.load(state + FILTER_READY, mask=inside, other=0.0)
        ready = ready_value > 0
        h = hyper + group * N_HYPER
        sigma = tl.load(h + HYPER_SIGMA, mask=inside, other=0.0).to(ACC)
        q = tl.load(h + HYPER_Q, mask=inside, other=0.0).to(ACC)
        sigma_plus_q = tl.load(h + HYPER_SIGMA_PLUS_Q, mask=inside, other=1.0).to(ACC)  # no 0/0 past the layers
        symmetric = tl.load(h + HYPER_SYMMETRIC, mask=inside, other=0.0) != 0
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
        usable = tl.where(go, hh >= tl.load(hyper + HYPER_MIN_HH).to(ACC), False)  # (a scalar flag & a block: Triton's interpreter refuses it)
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
    _record(hyper, noise, steps, skipped, negatives, loss, ok_out, n_groups, go, negative, measured_noise,
            measured_loss, LAYERS, N_HYPER, HYPER_R, HYPER_MODE, HYPER_ALPHA_R, HYPER_ONE_MINUS_ALPHA_R, ACC)


@triton.jit
def koala_v_coefficients(sums, groups, hyper, stats, noise, steps, skipped, negatives, loss, ok_out, coefficients,
                         n_layers, n_groups, covariance,
                         ACC: tl.constexpr, LAYERS: tl.constexpr, STAT_LOSS_SUM: tl.constexpr,
                         STAT_SQUARE_SUM: tl.constexpr, STAT_COUNT: tl.constexpr, STAT_FALLBACKS: tl.constexpr,
                         N_SUM: tl.constexpr, SUM_HH: tl.constexpr,
                         SUM_THETA_THETA: tl.constexpr, N_COEF: tl.constexpr, COEF_STEP: tl.constexpr,
                         N_HYPER: tl.constexpr, HYPER_LR: tl.constexpr, HYPER_HALF_DECAY: tl.constexpr,
                         HYPER_R: tl.constexpr, HYPER_MODE: tl.constexpr, HYPER_ALPHA_R: tl.constexpr,
                         HYPER_ONE_MINUS_ALPHA_R: tl.constexpr, HYPER_Q: tl.constexpr, HYPER_MIN_HH: tl.constexpr):
    """KOALA-V's scalar step; ``covariance``: the filter-wide ``P`` (ACC), read and written in place (E22)."""
    measured_loss, measured_noise, negative, go = _measured(stats, sums, n_layers, ACC, LAYERS, N_SUM, STAT_LOSS_SUM,
                                                          STAT_SQUARE_SUM, STAT_COUNT, STAT_FALLBACKS)
    p = tl.load(covariance).to(ACC)
    p_hat = p + tl.load(hyper + HYPER_Q).to(ACC)  # E20 (q is the filter's: every group's is the same)
    most = tl.zeros((LAYERS,), dtype=ACC)  # the largest ||H||^2 / s of an updated layer (E22)
    for start in range(0, n_layers, LAYERS):
        rows, inside, row, hh, theta_sq, group, lr, half_decay, r = _layers(
            sums, groups, hyper, noise, start, n_layers, measured_noise, measured_loss, ACC, LAYERS, N_SUM, SUM_HH,
            SUM_THETA_THETA, N_HYPER, HYPER_LR, HYPER_HALF_DECAY, HYPER_R, HYPER_MODE, HYPER_ALPHA_R,
            HYPER_ONE_MINUS_ALPHA_R)
        s = p_hat * hh + r  # E21
        gain = lr * (measured_loss + half_decay * theta_sq) * p_hat / s
        update = tl.where(go, (hh >= tl.load(hyper + HYPER_MIN_HH).to(ACC)) & (s > 0) & _finite(gain), False) & inside
        tl.store(coefficients + rows * N_COEF + COEF_STEP, tl.where(update, -gain, 0.0), mask=inside)
        most = tl.maximum(most, tl.where(update, hh / s, 0.0))
    p_new = p_hat - p_hat * p_hat * tl.max(most, axis=0)  # E22
    _record(hyper, noise, steps, skipped, negatives, loss, ok_out, n_groups, go, negative, measured_noise,
            measured_loss, LAYERS, N_HYPER, HYPER_R, HYPER_MODE, HYPER_ALPHA_R, HYPER_ONE_MINUS_ALPHA_R, ACC)
    tl.store(covariance, tl.where(go, p_new, p))


@triton.jit
def koala_m_coefficients(sums, groups, hyper, stats, noise, steps, skipped, negatives, loss, ok_out, coefficients,
                         n_layers, n_groups, covariance, qw_avg, n_params,
                         ACC: tl.constexpr, LAYERS: tl.constexpr, STAT_LOSS_SUM: tl.constexpr,
                         STAT_SQUARE_SUM: tl.constexpr, STAT_COUNT: tl.constexpr, STAT_FALLBACKS: tl.constexpr,
                         N_SUM: tl.constexpr, SUM_HH: tl.constexpr,
                         SUM_THETA_THETA: tl.constexpr, SUM_DD: tl.constexpr, SUM_DH: tl.constexpr,
                         N_COEF: tl.constexpr, COEF_STEP_THETA: tl.constexpr, COEF_STEP_U: tl.constexpr,
                         COEF_KEEP_AVG: tl.constexpr, COEF_TAKE_THETA: tl.constexpr, N_HYPER: tl.constexpr,
                         HYPER_LR: tl.constexpr, HYPER_HALF_DECAY: tl.constexpr, HYPER_R: tl.constexpr,
                         HYPER_MODE: tl.constexpr, HYPER_ALPHA_R: tl.constexpr, HYPER_ONE_MINUS_ALPHA_R: tl.constexpr,
                         HYPER_A: tl.constexpr, HYPER_QV: tl.constexpr, HYPER_AVERAGE_KEEP: tl.constexpr,
                         HYPER_AVERAGE_TAKE: tl.constexpr, HYPER_AVERAGE_KEEP_SQUARED: tl.constexpr,
                         HYPER_NOISE_KEEP: tl.constexpr, HYPER_NOISE_TAKE: tl.constexpr, HYPER_MIN_HH: tl.constexpr):
    """KOALA-M's scalar step (E30-E36, as koala_m.koala_m_coefficients and KOALAM._update): ``covariance`` the
    filter-wide 2x2 ``P`` (ACC, row-major) and ``qw_avg``, read and written in place; ``n_params`` the number of
    parameters stepped (E30's distance is per parameter). Its averaging constants come in ``hyper`` (float64;
    a constexpr float would be a float32)."""
    measured_loss, measured_noise, negative, go = _measured(stats, sums, n_layers, ACC, LAYERS, N_SUM, STAT_LOSS_SUM,
                                                          STAT_SQUARE_SUM, STAT_COUNT, STAT_FALLBACKS)
    average_keep = tl.load(hyper + HYPER_AVERAGE_KEEP).to(ACC)
    average_take = tl.load(hyper + HYPER_AVERAGE_TAKE).to(ACC)
    average_keep_squared = tl.load(hyper + HYPER_AVERAGE_KEEP_SQUARED).to(ACC)
    p00 = tl.load(covariance + 0).to(ACC)
    p01 = tl.load(covariance + 1).to(ACC)
    p10 = tl.load(covariance + 2).to(ACC)
    p11 = tl.load(covariance + 3).to(ACC)
    most = tl.zeros((LAYERS,), dtype=ACC)  # the largest ||H||^2 / S of an updated layer (E35)
    distance_sq = tl.zeros((LAYERS,), dtype=ACC)  # ||w_avg - theta||^2 after the update (E30)
    for start in range(0, n_layers, LAYERS):
        rows, inside, row, hh, theta_sq, group, lr, half_decay, r = _layers(
            sums, groups, hyper, noise, start, n_layers, measured_noise, measured_loss, ACC, LAYERS, N_SUM, SUM_HH,
            SUM_THETA_THETA, N_HYPER, HYPER_LR, HYPER_HALF_DECAY, HYPER_R, HYPER_MODE, HYPER_ALPHA_R,
            HYPER_ONE_MINUS_ALPHA_R)
        dd = tl.load(row + SUM_DD, mask=inside, other=0.0).to(ACC)
        dh = tl.load(row + SUM_DH, mask=inside, other=0.0).to(ACC)
        s = hh * p00 + r  # E33
        scale = lr * (measured_loss + half_decay * theta_sq) / s
        k1 = scale * p00
        k2 = scale * p10
        update = tl.where(go, (hh >= tl.load(hyper + HYPER_MIN_HH).to(ACC)) & (s > 0) & _finite(k1) & _finite(k2), False) & inside
        moved = average_keep_squared * (dd + 2.0 * k1 * dh + k1 * k1 * hh)  # E30's d after E33-E34
        out = coefficients + rows * N_COEF
        tl.store(out + COEF_STEP_THETA, tl.where(update, -k1, 0.0), mask=inside)
        tl.store(out + COEF_STEP_U, tl.where(update, -k2, 0.0), mask=inside)
        tl.store(out + COEF_KEEP_AVG, tl.where(update, average_keep, 1.0), mask=inside)  # E34
        tl.store(out + COEF_TAKE_THETA, tl.where(update, average_take, 0.0), mask=inside)
        most = tl.maximum(most, tl.where(update, hh / s, 0.0))
        distance_sq += tl.where(update, moved, tl.where(inside, dd, 0.0))
    h = tl.max(most, axis=0)  # E35
    # E36: the posterior P - h c c^T with c = P[:, 0]; E30: qw_avg; E32: F P F^T + diag(qw_avg, qv), F = [[1, 1], [0, a]].
    q00 = p00 - h * (p00 * p00)
    q01 = p01 - h * (p00 * p10)
    q10 = p10 - h * (p10 * p00)
    q11 = p11 - h * (p10 * p10)
    distance = tl.sqrt(tl.where(go, tl.sum(distance_sq, axis=0), 0.0)) / n_params
    previous_qw = tl.load(qw_avg).to(ACC)
    qw = tl.load(hyper + HYPER_NOISE_KEEP).to(ACC) * previous_qw + tl.load(hyper + HYPER_NOISE_TAKE).to(ACC) * distance
    a = tl.load(hyper + HYPER_A).to(ACC)
    qv = tl.load(hyper + HYPER_QV).to(ACC)
    _record(hyper, noise, steps, skipped, negatives, loss, ok_out, n_groups, go, negative, measured_noise,
            measured_loss, LAYERS, N_HYPER, HYPER_R, HYPER_MODE, HYPER_ALPHA_R, HYPER_ONE_MINUS_ALPHA_R, ACC)
    tl.store(covariance + 0, tl.where(go, (q00 + q10) + (q01 + q11) + qw, p00))
    tl.store(covariance + 1, tl.where(go, (q01 + q11) * a, p01))
    tl.store(covariance + 2, tl.where(go, a * q10 + a * q11, p10))
    tl.store(covariance + 3, tl.where(go, a * q11 * a + qv, p11))
    tl.store(qw_avg, tl.where(go, qw, previous_qw))
