"""Triton kernels of the selective scan (Mamba-1): forward, backward, single-step update.

Time is cut into chunks of CHUNK steps; the forward saves the state at every chunk start and the
backward recomputes the rest from those. Variants (chosen in `triton_scan.scan_config`, see NOTES.md):

- `_fwd_state_loop_kernel` (default forward) and `_bwd_state_loop_kernel` (default backward): a program
  owns a tile of channels, walks the chunks in order (backward: in reverse) and, inside a chunk, loops
  over the state index n with (channels, CHUNK) register tiles; the recurrence along time is a
  `tl.associative_scan`. y (forward) and du, ddelta, dz (backward) are summed over n in registers; dB
  and dC are summed over the program's channels before one atomic add per (n, chunk).
- `_fwd_seq_kernel`: one channel per thread (or per 2 or 4 lanes) with its 16 states in registers, a
  sequential time loop without cross-lane work but one sum per 8 steps (d_state <= 16).
- `_bwd_seq_kernel` (in `triton_seq_backward`): the backward of `_fwd_seq_kernel` in its layout, a channel on one
  or two lanes; the default after a sequential forward (with few rows in pieces of time, NOTES v14).
- `_scan_fwd_kernel` + `_bwd_carry_kernel` + `_bwd_chunk_kernel`: a (channels, N, CHUNK) tile forward and
  a two-pass backward (a reverse sweep storing the adjoint at chunk starts, then all chunks in parallel).
- `_state_update_kernel`: one decoding step.

Strides are arguments, so a channels-last view of (batch, L, dim) is read as is. Sequences are described
per program row by (batch row, first time index, length), which covers the dense batch, per-row lengths
and packed `cu_seqlens` alike; positions past a sequence's length are treated as steps with delta = 0
(the state passes through unchanged) and their outputs are never written.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # torch.nn.functional.softplus's default: above it softplus(x) == x


@triton.jit
def _linear_combine(a_prev, b_prev, a_next, b_next):
    # composition of h -> a_prev h + b_prev followed by h -> a_next h + b_next
    return a_prev * a_next, a_next * b_prev + b_next


@triton.jit
def _adjoint_combine(first_r, q_r, g_r, first_l, q_l, g_l):
    """Reverse-scan combine for the adjoint g_t = src_t + a_{t+1} g_{t+1} on *unshifted* decays a_t.

    A segment [i..j] is (first = a_i, q = a_{i+1} ... a_j, g = the adjoint at i from the segment's own
    sources); joining it (on the left) to the accumulated segment on its right multiplies the right part
    by q_l * first_r. Elements start as (a_t, 1, src_t), so one exp per element-state serves both the
    forward and the adjoint scan instead of a second exp of the next step's delta."""
    w = q_l * first_r
    return first_l, w * q_r, g_l + w * g_r


@triton.jit
def _store_column(row_ptrs, tile, offs_k, column, mask_rows):
    """Store tile[:, column] at row_ptrs (one value per row), masked to that column. (A pointer tile
    constant along time; with Triton 3.6 this compiles to one predicated store per row.)"""
    mask = mask_rows[:, None] & (offs_k == column)[None, :]
    tl.store(row_ptrs[:, None] + offs_k[None, :] * 0, tile, mask=mask)


@triton.jit
def _load_f32(ptrs, mask, FULL: tl.constexpr):
    """A float32 load that drops its mask when every element is known in range (FULL): masked loads
    zero their registers first and predicate the load, two extra instructions per value."""
    if FULL:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _flip_time(x, LANE_FLIP: tl.constexpr):
    """x reversed along its last axis (64 steps). LANE_FLIP, for 2-D tiles only: with 8 steps per
    thread on lanes 0-7 of each row's group (the layout Triton 3.6 gives the aligned (4, 64) tiles of
    a 1-warp program), one `shfl.bfly` with lane mask 7 and an in-thread register reversal, instead
    of tl.flip's three butterfly rounds. GPU only (the interpreter has no inline assembly); a 1-D row
    loaded on its own gets another layout (v8: a float32 C row came 2 per lane on 32 lanes, and the
    lane flip of it was wrong), so rows go through tl.flip."""
    rank: tl.constexpr = len(x.shape)
    steps: tl.constexpr = x.shape[rank - 1]
    if not LANE_FLIP or rank == 1:
        flipped = tl.flip(x, rank - 1)
    else:
        swapped = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 0x7, 0x1f, 0xffffffff;", "=r,r", [x],
                                            dtype=tl.float32, is_pure=True, pack=1)
        rows: tl.constexpr = x.shape[0]
        flipped = tl.reshape(tl.flip(tl.reshape(swapped, [rows, steps // 8, 8]), 2), [rows, steps])
    return flipped


@triton.jit
def _softplus(x, APPROX_LOG: tl.constexpr = False):
    """log(1 + e^x). APPROX_LOG (GPU only): the logarithm as one `lg2.approx` (MUFU) instead of libdevice's
    logf polynomial, ~25 instructions: a sixth of the sequential forward's loop (kernels/NOTES.md v14). Its
    absolute error near 1, ~4e-7, is of the order of rounding 1 + e^x to float32 (6e-8) that both forms pay."""
    e = 1.0 + tl.exp2(x * LOG2E)
    if APPROX_LOG:
        log = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [e], dtype=tl.float32, is_pure=True,
                                        pack=1) * LN2
    else:
        log = tl.log(e)
    return tl.where(x > SOFTPLUS_THRESHOLD, x, log)


@triton.jit
def _load_delta(ptr, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, APPROX_LOG: tl.constexpr = False):
    """Effective step delta' (and the pre-softplus value) with masked positions set to 0."""
    return _effective_delta(tl.load(ptr, mask=mask, other=0.0), mask, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)


@triton.jit
def _effective_delta(raw, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, APPROX_LOG: tl.constexpr):
    """_load_delta of loaded (rows, steps) values."""
    raw = raw.to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    eff = _softplus(raw, APPROX_LOG) if SOFTPLUS else raw
    return tl.where(mask, eff, 0.0), raw


@triton.jit
def _sequence(seq, seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length, VARLEN: tl.constexpr):
    """(batch row, first step, length) of sequence `seq`. A dense batch passes its length as an
    argument so that the compiler knows its alignment and vectorizes the time-contiguous tiles."""
    if VARLEN:
        b = tl.load(seq_batch_ptr + seq).to(tl.int64)
        t_first = tl.load(seq_start_ptr + seq).to(tl.int64)
        length = tl.load(seq_len_ptr + seq)
    else:
        b = seq.to(tl.int64)
        t_first = 0
        length = dense_length
    return b, t_first, length


@triton.jit
def _state_slot(j, SAVE_EVERY: tl.constexpr, scratch0):
    """Slot in `states` of the state at the start of chunk j: every SAVE_EVERY-th chunk's is kept for the
    backward (slot j / SAVE_EVERY); the others share SAVE_EVERY - 1 scratch slots from `scratch0` on, the
    forward's carry and the backward's recomputed states of one group of chunks."""
    if SAVE_EVERY == 1:
        return j
    else:
        r = j % SAVE_EVERY
        return tl.where(r == 0, j // SAVE_EVERY, scratch0 + r - 1)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr, last_ptr,
    seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length,
    dim, N, channels_per_group,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l, so_b, so_d, so_l,
    ss_s, ss_c, ss_d, ss_n, sl_s, sl_d, sl_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    VARLEN: tl.constexpr,
    STORE_STATES: tl.constexpr, STORE_LAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    APPROX_LOG: tl.constexpr = False,
):
    pid_d = tl.program_id(0)
    seq = tl.program_id(1)
    b, t_first, length = _sequence(seq, seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length, VARLEN)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, CHUNK)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    group = (pid_d * BLOCK_D) // channels_per_group  # a channel tile never straddles two groups

    mask_dn = mask_d[:, None] & mask_n[None, :]
    A2 = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0)
    A2 = A2.to(tl.float32) * LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], tl.float32)

    u_row = u_ptr + b * su_b + offs_d[:, None] * su_d
    dt_row = dt_ptr + b * sdt_b + offs_d[:, None] * sdt_d
    z_row = z_ptr + b * sz_b + offs_d[:, None] * sz_d
    o_row = out_ptr + b * so_b + offs_d[:, None] * so_d
    B_row = B_ptr + b * sB_b + group * sB_g + offs_n[:, None] * sB_n
    C_row = C_ptr + b * sC_b + group * sC_g + offs_n[:, None] * sC_n
    st_tile = states_ptr + seq * ss_s + offs_d[:, None] * ss_d + offs_n[None, :] * ss_n

    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    n_chunks = tl.cdiv(length, CHUNK)
    for c in range(0, n_chunks):
        if STORE_STATES:
            tl.store(st_tile + c * ss_c, h, mask=mask_dn)
        t_local = c * CHUNK + offs_k
        mask_t = t_local < length
        t = t_first + t_local
        mask_dt = mask_d[:, None] & mask_t[None, :]
        u = tl.load(u_row + t[None, :] * su_l, mask=mask_dt, other=0.0).to(tl.float32)
        dt, _ = _load_delta(dt_row + t[None, :] * sdt_l, mask_dt, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
        mask_nt = mask_n[:, None] & mask_t[None, :]
        Bt = tl.load(B_row + t[None, :] * sB_l, mask=mask_nt, other=0.0).to(tl.float32)
        Ct = tl.load(C_row + t[None, :] * sC_l, mask=mask_nt, other=0.0).to(tl.float32)

        decay = tl.exp2(dt[:, None, :] * A2[:, :, None])
        drive = (dt * u)[:, None, :] * Bt[None, :, :]
        first = (offs_k == 0)[None, None, :]
        drive = tl.where(first, drive + decay * h[:, :, None], drive)
        _, hs = tl.associative_scan((decay, drive), axis=2, combine_fn=_linear_combine)
        y = tl.sum(hs * Ct[None, :, :], axis=1)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zv = tl.load(z_row + t[None, :] * sz_l, mask=mask_dt, other=0.0).to(tl.float32)
            y = y * zv * tl.sigmoid(zv)
        tl.store(o_row + t[None, :] * so_l, y.to(out_ptr.dtype.element_ty), mask=mask_dt)
        last = (offs_k == CHUNK - 1)[None, None, :]
        h = tl.sum(tl.where(last, hs, 0.0), axis=2)
    if STORE_LAST:
        tl.store(last_ptr + seq * sl_s + offs_d[:, None] * sl_d + offs_n[None, :] * sl_n, h, mask=mask_dn)


@triton.jit
def _bwd_carry_kernel(
    dout_ptr, dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dlast_ptr, gstates_ptr,
    seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length,
    dim, N, channels_per_group,
    sdo_b, sdo_d, sdo_l, sdt_b, sdt_d, sdt_l, sA_d, sA_n,
    sC_b, sC_g, sC_n, sC_l, sz_b, sz_d, sz_l,
    ss_s, ss_c, ss_d, ss_n, sl_s, sl_d, sl_n,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    APPROX_LOG: tl.constexpr = False,
):
    """Stores g entering each chunk from the right: gstates[seq, c] = dL/dh at the chunk's last step
    coming from later steps (times the next step's decay), seeded with the last state's gradient."""
    pid_d = tl.program_id(0)
    seq = tl.program_id(1)
    b, t_first, length = _sequence(seq, seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length, VARLEN)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, CHUNK)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    group = (pid_d * BLOCK_D) // channels_per_group
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A2 = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0)
    A2 = A2.to(tl.float32) * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], tl.float32)

    do_row = dout_ptr + b * sdo_b + offs_d[:, None] * sdo_d
    dt_row = dt_ptr + b * sdt_b + offs_d[:, None] * sdt_d
    z_row = z_ptr + b * sz_b + offs_d[:, None] * sz_d
    C_row = C_ptr + b * sC_b + group * sC_g + offs_n[:, None] * sC_n
    st_tile = gstates_ptr + seq * ss_s + offs_d[:, None] * ss_d + offs_n[None, :] * ss_n

    if HAS_DLAST:
        g = tl.load(dlast_ptr + seq * sl_s + offs_d[:, None] * sl_d + offs_n[None, :] * sl_n,
                    mask=mask_dn, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    n_chunks = tl.cdiv(length, CHUNK)
    for c_rev in range(0, n_chunks):
        c = n_chunks - 1 - c_rev
        tl.store(st_tile + c * ss_c, g, mask=mask_dn)
        t_local = c * CHUNK + offs_k
        mask_t = t_local < length
        t = t_first + t_local
        mask_dt = mask_d[:, None] & mask_t[None, :]
        mask_next = mask_d[:, None] & (t_local + 1 < length)[None, :]
        dt_next, _ = _load_delta(dt_row + (t + 1)[None, :] * sdt_l, mask_next, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
        dy = tl.load(do_row + t[None, :] * sdo_l, mask=mask_dt, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_row + t[None, :] * sz_l, mask=mask_dt, other=0.0).to(tl.float32)
            dy = dy * zv * tl.sigmoid(zv)
        mask_nt = mask_n[:, None] & mask_t[None, :]
        Ct = tl.load(C_row + t[None, :] * sC_l, mask=mask_nt, other=0.0).to(tl.float32)

        decay_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
        src = Ct[None, :, :] * dy[:, None, :]
        last = (offs_k == CHUNK - 1)[None, None, :]
        src = tl.where(last, src + decay_next * g[:, :, None], src)
        _, gs = tl.associative_scan((decay_next, src), axis=2, combine_fn=_linear_combine, reverse=True)
        # g at the chunk's first step, times that step's own decay, is what the previous chunk sees;
        # the previous chunk's last position multiplies by decay_next itself, so carry g unscaled.
        first = (offs_k == 0)[None, None, :]
        g = tl.sum(tl.where(first, gs, 0.0), axis=2)


@triton.jit
def _bwd_chunk_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, gstates_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length,
    dim, N, channels_per_group, channels_per_program,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l, sdo_b, sdo_d, sdo_l,
    ss_s, ss_c, ss_d, ss_n,
    sdu_b, sdu_d, sdu_l, sddt_b, sddt_d, sddt_l, sdz_b, sdz_d, sdz_l,
    sdB_b, sdB_g, sdB_n, sdB_l, sdC_b, sdC_g, sdC_n, sdC_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    APPROX_LOG: tl.constexpr = False,
):
    c = tl.program_id(0)
    seq = tl.program_id(1)
    pid_r = tl.program_id(2)
    b, t_first, length = _sequence(seq, seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length, VARLEN)
    if c * CHUNK < length:
        offs_n = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, CHUNK)
        mask_n = offs_n < N
        t_local = c * CHUNK + offs_k
        mask_t = t_local < length
        t = t_first + t_local
        mask_next_t = (t_local + 1) < length
        d_begin = pid_r * channels_per_program
        group = d_begin // channels_per_group
        mask_nt = mask_n[:, None] & mask_t[None, :]
        B_tile = B_ptr + b * sB_b + group * sB_g + offs_n[:, None] * sB_n + t[None, :] * sB_l
        C_tile = C_ptr + b * sC_b + group * sC_g + offs_n[:, None] * sC_n + t[None, :] * sC_l
        Bt = tl.load(B_tile, mask=mask_nt, other=0.0).to(tl.float32)
        Ct = tl.load(C_tile, mask=mask_nt, other=0.0).to(tl.float32)
        dB_acc = tl.zeros([BLOCK_N, CHUNK], tl.float32)
        dC_acc = tl.zeros([BLOCK_N, CHUNK], tl.float32)
        first = (offs_k == 0)[None, None, :]
        last = (offs_k == CHUNK - 1)[None, None, :]

        for d0 in range(d_begin, d_begin + channels_per_program, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < dim
            mask_dn = mask_d[:, None] & mask_n[None, :]
            mask_dt = mask_d[:, None] & mask_t[None, :]
            A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0)
            A = A.to(tl.float32)
            A2 = A * LOG2E
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            else:
                bias = tl.zeros([BLOCK_D], tl.float32)
            st_off = seq * ss_s + c * ss_c + offs_d[:, None] * ss_d + offs_n[None, :] * ss_n
            h0 = tl.load(states_ptr + st_off, mask=mask_dn, other=0.0)
            g_end = tl.load(gstates_ptr + st_off, mask=mask_dn, other=0.0)

            u = tl.load(u_ptr + b * su_b + offs_d[:, None] * su_d + t[None, :] * su_l,
                        mask=mask_dt, other=0.0).to(tl.float32)
            dt_ptrs = dt_ptr + b * sdt_b + offs_d[:, None] * sdt_d + t[None, :] * sdt_l
            dt, dt_raw = _load_delta(dt_ptrs, mask_dt, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
            mask_next = mask_d[:, None] & mask_next_t[None, :]
            dt_next, _ = _load_delta(dt_ptrs + sdt_l, mask_next, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
            dy = tl.load(dout_ptr + b * sdo_b + offs_d[:, None] * sdo_d + t[None, :] * sdo_l,
                         mask=mask_dt, other=0.0).to(tl.float32)

            # forward states of the chunk, restarted from the saved state at its start
            decay = tl.exp2(dt[:, None, :] * A2[:, :, None])
            dtu = dt * u
            drive = dtu[:, None, :] * Bt[None, :, :]
            seeded = tl.where(first, drive + decay * h0[:, :, None], drive)
            _, hs = tl.associative_scan((decay, seeded), axis=2, combine_fn=_linear_combine)

            if HAS_D:
                Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z_ptr + b * sz_b + offs_d[:, None] * sz_d + t[None, :] * sz_l,
                             mask=mask_dt, other=0.0).to(tl.float32)
                y = tl.sum(hs * Ct[None, :, :], axis=1)
                if HAS_D:
                    y += Dv[:, None] * u
                sig = tl.sigmoid(zv)
                dz = dy * y * sig * (1.0 + zv * (1.0 - sig))
                tl.store(dz_ptr + b * sdz_b + offs_d[:, None] * sdz_d + t[None, :] * sdz_l,
                         dz.to(dz_ptr.dtype.element_ty), mask=mask_dt)
                dy = dy * zv * sig

            # adjoint states of the chunk, restarted from pass 1's carry at its end
            decay_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
            src = Ct[None, :, :] * dy[:, None, :]
            src = tl.where(last, src + decay_next * g_end[:, :, None], src)
            _, gs = tl.associative_scan((decay_next, src), axis=2, combine_fn=_linear_combine, reverse=True)

            gB = tl.sum(gs * Bt[None, :, :], axis=1)
            g_hprev = gs * (hs - drive)  # g_t * decay_t * h_{t-1}
            ddt = u * gB + tl.sum(g_hprev * A[:, :, None], axis=1)
            du = dt * gB
            if HAS_D:
                du += Dv[:, None] * dy
                tl.atomic_add(dD_ptr + offs_d, tl.sum(dy * u, axis=1), mask=mask_d, sem="relaxed")
            tl.store(du_ptr + b * sdu_b + offs_d[:, None] * sdu_d + t[None, :] * sdu_l,
                     du.to(du_ptr.dtype.element_ty), mask=mask_dt)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            ddt = tl.where(mask_dt, ddt, 0.0)
            tl.store(ddt_ptr + b * sddt_b + offs_d[:, None] * sddt_d + t[None, :] * sddt_l,
                     ddt.to(ddt_ptr.dtype.element_ty), mask=mask_dt)
            if HAS_BIAS:
                tl.atomic_add(dbias_ptr + offs_d, tl.sum(ddt, axis=1), mask=mask_d, sem="relaxed")
            dA = tl.sum(g_hprev * dt[:, None, :], axis=2)
            tl.atomic_add(dA_ptr + offs_d[:, None] * N + offs_n[None, :], dA, mask=mask_dn, sem="relaxed")
            dB_acc += tl.sum(gs * dtu[:, None, :], axis=0)
            dC_acc += tl.sum(hs * dy[:, None, :], axis=0)

        dB_tile = dB_ptr + b * sdB_b + group * sdB_g + offs_n[:, None] * sdB_n + t[None, :] * sdB_l
        dC_tile = dC_ptr + b * sdC_b + group * sdC_g + offs_n[:, None] * sdC_n + t[None, :] * sdC_l
        tl.atomic_add(dB_tile, dB_acc, mask=mask_nt, sem="relaxed")
        tl.atomic_add(dC_tile, dC_acc, mask=mask_nt, sem="relaxed")


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dim, N, channels_per_group,
    ss_b, ss_d, ss_n, sx_b, sx_d, sdt_b, sdt_d, sA_d, sA_n,
    sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sz_b, sz_d, so_b, so_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One recurrence step per (batch row, channel tile); the state is updated in place."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    group = offs_d // channels_per_group

    state_tile = state_ptr + b * ss_b + offs_d[:, None] * ss_d + offs_n[None, :] * ss_n
    h = tl.load(state_tile, mask=mask_dn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * sx_b + offs_d * sx_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * sdt_b + offs_d * sdt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A2 = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0)
    A2 = A2.to(tl.float32) * LOG2E
    Bv = tl.load(B_ptr + b * sB_b + group[:, None] * sB_g + offs_n[None, :] * sB_n,
                 mask=mask_dn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * sC_b + group[:, None] * sC_g + offs_n[None, :] * sC_n,
                 mask=mask_dn, other=0.0).to(tl.float32)
    h = tl.exp2(dt[:, None] * A2) * h + (dt * x)[:, None] * Bv
    tl.store(state_tile, h.to(state_ptr.dtype.element_ty), mask=mask_dn)
    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + b * sz_b + offs_d * sz_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(out_ptr + b * so_b + offs_d * so_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


# ---------------------------------------------------------------------------------------------------
# The sequential forward (v10): one channel a thread, its 16 states in registers, no cross-lane work.
# ---------------------------------------------------------------------------------------------------

SEQ_STATES = tl.constexpr(16)  # the sequential forward's register row: d_state padded to 16
SEQ_STEPS = tl.constexpr(8)  # steps of u, delta, z read at once: one 16-byte load of a 16-bit row


@triton.jit
def _halves(x):
    """(R, 2m) -> its even and odd columns; register moves when a row sits in one thread."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def _interleave(even, odd):
    """Inverse of _halves: (R,) or (R, m) even and odd columns -> (R, 2m)."""
    return tl.reshape(tl.join(even, odd), [even.shape[0], 2 * (even.numel // even.shape[0])])


@triton.jit
def _columns8(x):
    """(R, 8) -> its eight (R,) columns."""
    rows: tl.constexpr = x.shape[0]
    even, odd = _halves(x)
    e0, e1 = _halves(even)
    o0, o1 = _halves(odd)
    c0, c4 = _halves(e0)
    c2, c6 = _halves(e1)
    c1, c5 = _halves(o0)
    c3, c7 = _halves(o1)
    return (tl.reshape(c0, [rows]), tl.reshape(c1, [rows]), tl.reshape(c2, [rows]), tl.reshape(c3, [rows]),
            tl.reshape(c4, [rows]), tl.reshape(c5, [rows]), tl.reshape(c6, [rows]), tl.reshape(c7, [rows]))


@triton.jit
def _rows8(c0, c1, c2, c3, c4, c5, c6, c7):
    """Inverse of _columns8."""
    even = _interleave(_interleave(c0, c4), _interleave(c2, c6))
    odd = _interleave(_interleave(c1, c5), _interleave(c3, c7))
    return _interleave(even, odd)


@triton.jit
def _load_states(rows, mask_rows, PER_ROW: tl.constexpr, MASKED: tl.constexpr = True):
    """PER_ROW (4, 8 or 16) float32 values per pointer in `rows`, as 16-byte loads joined inside the
    thread (a direct (R, 16) load would spread each row over four lanes). The register order is a fixed
    permutation of the columns, the same for every row read this way and undone by _store_states.
    MASKED False: rows always in range (padded copies), no masks and no zero fill."""
    q = tl.arange(0, 4)
    m = mask_rows[:, None] if MASKED else None
    t0 = tl.load(rows[:, None] + q[None, :], mask=m, other=0.0 if MASKED else None)
    if PER_ROW == 4:
        x = t0
    else:
        t1 = tl.load(rows[:, None] + (q + 4)[None, :], mask=m, other=0.0 if MASKED else None)
        if PER_ROW == 8:
            x = tl.reshape(tl.join(t0, t1), [rows.shape[0], 8])
        else:
            t2 = tl.load(rows[:, None] + (q + 8)[None, :], mask=m, other=0.0 if MASKED else None)
            t3 = tl.load(rows[:, None] + (q + 12)[None, :], mask=m, other=0.0 if MASKED else None)
            x = tl.reshape(tl.join(tl.join(t0, t1), tl.join(t2, t3)), [rows.shape[0], 16])
    return x


@triton.jit
def _store_states(rows, x, mask_rows, PER_ROW: tl.constexpr):
    """Inverse of _load_states."""
    q = tl.arange(0, 4)
    m = mask_rows[:, None]
    if PER_ROW == 4:
        tl.store(rows[:, None] + q[None, :], x, mask=m)
    elif PER_ROW == 8:
        t0, t1 = tl.split(tl.reshape(x, [rows.shape[0], 4, 2]))
        tl.store(rows[:, None] + q[None, :], t0, mask=m)
        tl.store(rows[:, None] + (q + 4)[None, :], t1, mask=m)
    else:
        first, second = tl.split(tl.reshape(x, [rows.shape[0], 4, 2, 2]))
        t0, t1 = tl.split(first)
        t2, t3 = tl.split(second)
        tl.store(rows[:, None] + q[None, :], t0, mask=m)
        tl.store(rows[:, None] + (q + 4)[None, :], t1, mask=m)
        tl.store(rows[:, None] + (q + 8)[None, :], t2, mask=m)
        tl.store(rows[:, None] + (q + 12)[None, :], t3, mask=m)


@triton.jit
def _prefetch_l1(ptrs):
    """A hint, no data: bring the lines at `ptrs` into L1 (PTX prefetch; GPU only, the interpreter has
    no inline assembly)."""
    tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _seq_step(h, A2, dt, dtu, Bt_rows, Ct_rows, PER_ROW: tl.constexpr):
    """One time step of (rows, PER_ROW) states; the row's part of y is summed inside the thread. (Written out:
    a helper taking already-loaded rows, the same operations, compiled to 86 registers instead of 136 and other
    timings; kernels/NOTES.md v14.)"""
    h = tl.exp2(A2 * dt[:, None]) * h + _load_states(Bt_rows, dt, PER_ROW, False) * dtu[:, None]
    return h, tl.sum(h * _load_states(Ct_rows, dt, PER_ROW, False), axis=1)


@triton.jit
def _fwd_seq_kernel(
    u_ptr, dt_ptr, A2_ptr, BT_ptr, CT_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr, last_ptr,
    seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length,
    dim, channels_per_group,
    part_ptr, dtsum_ptr, segment_length, sp_s, sp_g, sp_d, sds_s, sds_g,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sBT_b, sBT_g, sBT_l,
    sz_b, sz_d, sz_l, so_b, so_d, so_l,
    ss_s, ss_c, ss_d, sl_s, sl_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    VARLEN: tl.constexpr, STORE_STATES: tl.constexpr, STORE_LAST: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SPLIT: tl.constexpr = 1, PREFETCH: tl.constexpr = False,
    PREFETCH_L1: tl.constexpr = False, SEGMENTS: tl.constexpr = 1, PHASE: tl.constexpr = 2,
    APPROX_LOG: tl.constexpr = False, PARTS: tl.constexpr = 1,
):
    """Sequential in time: each thread owns one channel's 16 states (SPLIT 2 or 4: half or a quarter
    of them, its neighbour lanes the rest, for more threads when there are few channel rows) in
    registers: per element and state one exp2 and four multiply-adds, no barriers; the only cross-lane
    work is summing y over a channel's SPLIT lanes once per 8 steps. u, delta, z come 8 steps at a time
    in one 16-byte load per row; B and C from time-major float32 copies (A2_ptr: A * log2(e), BT_ptr,
    CT_ptr: (batch, groups, steps, 16), zero-padded so every row read is in range).

    SEGMENTS > 1 (dense batches with few channel rows): time is cut into SEGMENTS pieces of
    `segment_length` steps (a whole number of chunks), a program each. PHASE 1 runs every piece from a
    zero state and writes its end state (`part_ptr`) and its sum of delta (`dtsum_ptr`: the piece's decay
    is exp2(A2 * sum)); PHASE 2 starts each piece from the state the earlier pieces' results combine to
    and writes y. PARTS > 1: the first pass runs in pieces PARTS times shorter (SEGMENTS counts those), and the
    second combines the PARTS results of each earlier piece."""
    PER_ROW: tl.constexpr = SEQ_STATES // SPLIT
    BLOCK_R: tl.constexpr = BLOCK_D * SPLIT
    pid_d = tl.program_id(0)
    seq = tl.program_id(1) // SEGMENTS
    segment = tl.program_id(1) % SEGMENTS
    b, t_first, length = _sequence(seq, seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length, VARLEN)
    begin = segment * segment_length
    end = tl.minimum(begin + segment_length, length) if SEGMENTS > 1 else length
    if PHASE == 1:  # the last piece's end state is nobody's start
        end = tl.where(segment >= SEGMENTS - PARTS, begin, end)

    offs_r = tl.arange(0, BLOCK_R)
    chan = pid_d * BLOCK_D + offs_r // SPLIT  # each row: one channel, states part * PER_ROW onwards
    part = offs_r % SPLIT
    mask_r = chan < dim
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    group = (pid_d * BLOCK_D) // channels_per_group
    A2 = _load_states(A2_ptr + chan * SEQ_STATES + part * PER_ROW, mask_r, PER_ROW)
    if HAS_D:  # added on one row per channel
        Dv = tl.load(D_ptr + chan, mask=mask_r & (part == 0), other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=mask_r, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_R], tl.float32)
    steps = tl.arange(0, SEQ_STEPS)
    u_rows = u_ptr + b * su_b + chan * su_d
    dt_rows = dt_ptr + b * sdt_b + chan * sdt_d
    z_rows = z_ptr + b * sz_b + offs_d * sz_d
    out_rows = out_ptr + b * so_b + offs_d * so_d
    # the same B_t / C_t row for every channel of the program (a broadcast load)
    bt_rows = BT_ptr + b * sBT_b + group * sBT_g + part * PER_ROW
    ct_rows = CT_ptr + b * sBT_b + group * sBT_g + part * PER_ROW
    st_rows = states_ptr + seq * ss_s + chan * ss_d + part * PER_ROW
    part_rows = part_ptr + seq * sp_s + chan * sp_d + part * PER_ROW
    dtsum_rows = dtsum_ptr + seq * sds_s + chan

    h = tl.zeros([BLOCK_R, PER_ROW], tl.float32)
    if PHASE == 2 and SEGMENTS > 1:  # the state entering this piece, from the earlier pieces' results
        for earlier in range(0, segment * PARTS):
            total = tl.load(dtsum_rows + earlier * sds_g, mask=mask_r, other=0.0)
            h = tl.exp2(A2 * total[:, None]) * h + _load_states(part_rows + earlier * sp_g, mask_r, PER_ROW)
    dt_total = tl.zeros([BLOCK_R], tl.float32)
    if PREFETCH:  # the first block's u and delta rows; later blocks' arrive while the one before computes
        first_mask = mask_r[:, None] & (begin + steps < end)[None, :]
        u_next = tl.load(u_rows[:, None] + (t_first + begin + steps)[None, :] * su_l, mask=first_mask, other=0.0)
        dt_next = tl.load(dt_rows[:, None] + (t_first + begin + steps)[None, :] * sdt_l, mask=first_mask,
                          other=0.0)
    for t0 in range(begin, end, SEQ_STEPS):
        if STORE_STATES and PHASE == 2:  # noqa: SIM102 (a compile-time and a run-time condition)
            if t0 % CHUNK == 0:
                _store_states(st_rows + (t0 // CHUNK) * ss_c, h, mask_r, PER_ROW)
        t = t_first + t0 + steps
        in_time = (t0 + steps < end)[None, :]
        mask = mask_r[:, None] & in_time
        if PREFETCH:
            u = u_next.to(tl.float32)
            raw = dt_next.to(tl.float32)
            next_mask = mask_r[:, None] & (steps + t0 + SEQ_STEPS < end)[None, :]
            u_next = tl.load(u_rows[:, None] + (t + SEQ_STEPS)[None, :] * su_l, mask=next_mask, other=0.0)
            dt_next = tl.load(dt_rows[:, None] + (t + SEQ_STEPS)[None, :] * sdt_l, mask=next_mask, other=0.0)
            if HAS_BIAS:
                raw = raw + bias[:, None]
            dt = tl.where(mask, _softplus(raw, APPROX_LOG) if SOFTPLUS else raw, 0.0)
        else:
            u = tl.load(u_rows[:, None] + t[None, :] * su_l, mask=mask, other=0.0).to(tl.float32)
            dt, _ = _load_delta(dt_rows[:, None] + t[None, :] * sdt_l, mask, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
        d0, d1, d2, d3, d4, d5, d6, d7 = _columns8(dt)
        v0, v1, v2, v3, v4, v5, v6, v7 = _columns8(dt * u)
        bt = bt_rows + (t_first + t0) * sBT_l
        ct = ct_rows + (t_first + t0) * sBT_l
        if PREFETCH_L1:  # the next block's B and C rows (8 x 64 bytes each), while this block computes
            for line in tl.static_range(0, SEQ_STEPS, 2):
                _prefetch_l1(bt + (SEQ_STEPS + line) * sBT_l)
                if PHASE == 2:
                    _prefetch_l1(ct + (SEQ_STEPS + line) * sBT_l)
        h, y0 = _seq_step(h, A2, d0, v0, bt, ct, PER_ROW)
        h, y1 = _seq_step(h, A2, d1, v1, bt + sBT_l, ct + sBT_l, PER_ROW)
        h, y2 = _seq_step(h, A2, d2, v2, bt + 2 * sBT_l, ct + 2 * sBT_l, PER_ROW)
        h, y3 = _seq_step(h, A2, d3, v3, bt + 3 * sBT_l, ct + 3 * sBT_l, PER_ROW)
        h, y4 = _seq_step(h, A2, d4, v4, bt + 4 * sBT_l, ct + 4 * sBT_l, PER_ROW)
        h, y5 = _seq_step(h, A2, d5, v5, bt + 5 * sBT_l, ct + 5 * sBT_l, PER_ROW)
        h, y6 = _seq_step(h, A2, d6, v6, bt + 6 * sBT_l, ct + 6 * sBT_l, PER_ROW)
        h, y7 = _seq_step(h, A2, d7, v7, bt + 7 * sBT_l, ct + 7 * sBT_l, PER_ROW)
        if PHASE == 1:  # the piece's end state only: y is never formed (its C loads go unused)
            dt_total += tl.sum(dt, axis=1)
        else:
            y = _rows8(y0, y1, y2, y3, y4, y5, y6, y7)
            if HAS_D:
                y += Dv[:, None] * u
            if SPLIT > 1:  # a channel's rows sit in neighbouring lanes
                y = tl.sum(tl.reshape(y, [BLOCK_D, SPLIT, SEQ_STEPS]), axis=1)
            mask_out = mask_d[:, None] & in_time
            if HAS_Z:
                zv = tl.load(z_rows[:, None] + t[None, :] * sz_l, mask=mask_out, other=0.0).to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            tl.store(out_rows[:, None] + t[None, :] * so_l, y.to(out_ptr.dtype.element_ty), mask=mask_out)
    if PHASE == 1:
        _store_states(part_rows + segment * sp_g, h, mask_r, PER_ROW)
        tl.store(dtsum_rows + segment * sds_g, dt_total, mask=mask_r & (part == 0))
    elif STORE_LAST:  # noqa: SIM102 (a compile-time and a run-time condition)
        if segment == SEGMENTS - 1:
            # masked steps have delta 0 and leave the state as it was: h is the state after `length` steps
            _store_states(last_ptr + seq * sl_s + chan * sl_d + part * PER_ROW, h, mask_r, PER_ROW)


@triton.jit
def _recompute_group_states(c, u_ptr, dt_ptr, A_ptr, B_ptr, states_ptr, b, seq, group, t_first, length,
                            offs_d, offs_k, mask_d, first, bias, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l,
                            sA_d, sA_n, sB_b, sB_g, sB_n, sB_l, ss_s, ss_c, ss_d, ss_n, N, scratch0,
                            HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, APPROX_LOG: tl.constexpr,
                            FULL: tl.constexpr, SAVE_EVERY: tl.constexpr, CHUNK: tl.constexpr):
    """The start states of chunks c0 + 1 .. c of the group c0 = c - c % SAVE_EVERY, scanned forward from the
    kept state of chunk c0 into the scratch slots by the forward's own step (`_fwd_one_state`; B stands in for
    the C it does not need here: the unused terms compile away, local sm_90 SASS the same as written out)."""
    row_states = states_ptr + seq * ss_s + offs_d * ss_d
    for j in range(c - c % SAVE_EVERY, c):
        t_local = j * CHUNK + offs_k
        mask_t = t_local < length
        t = t_first + t_local
        mask_dt = mask_d[:, None] & mask_t[None, :]
        dt, _ = _load_delta(dt_ptr + b * sdt_b + offs_d[:, None] * sdt_d + t[None, :] * sdt_l,
                            mask_dt, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
        dtu = dt * tl.load(u_ptr + b * su_b + offs_d[:, None] * su_d + t[None, :] * su_l,
                           mask=mask_dt, other=0.0).to(tl.float32)
        B_base = B_ptr + b * sB_b + group * sB_g + t * sB_l
        h_in = row_states + _state_slot(j, SAVE_EVERY, scratch0) * ss_c
        h_out = row_states + _state_slot(j + 1, SAVE_EVERY, scratch0) * ss_c
        for n in range(0, N):
            _fwd_one_state(n, N, mask_d, mask_t, first, False, dt, dtu, offs_d, offs_k, A_ptr, sA_d, sA_n,
                           B_base, sB_n, B_base, sB_n, h_in, h_out, ss_n, h_out, ss_n, False, FULL)
        tl.debug_barrier()


@triton.jit
def _bwd_state_loop_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, dlast_ptr, carry_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length,
    dim, N, channels_per_group,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l, sdo_b, sdo_d, sdo_l,
    ss_s, ss_c, ss_d, ss_n, sl_s, sl_d, sl_n, sg_s, sg_c, sg_d, sg_n,
    sdu_b, sdu_d, sdu_l, sddt_b, sddt_d, sddt_l, sdz_b, sdz_d, sdz_l,
    sdB_b, sdB_g, sdB_n, sdB_l, sdC_b, sdC_g, sdC_n, sdC_l,
    Crev_ptr, sCr_b, sCr_g, sCr_n, sCr_l, total_length,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    VARLEN: tl.constexpr, HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, STAGES: tl.constexpr = 1,
    ONE_EXP: tl.constexpr = False, ADJOINT: tl.constexpr = 0,
    REDUCE_DBC: tl.constexpr = True, FULL: tl.constexpr = False, LANE_FLIP: tl.constexpr = False,
    APPROX_LOG: tl.constexpr = False, SAVE_EVERY: tl.constexpr = 1, scratch0=0,
):
    """Backward over chunks from last to first, one state index n at a time on (channels, CHUNK) tiles:
    the forward scan restarts from the saved chunk-start state, the adjoint scan from the carry of
    the chunk to the right (kept in `carry`, two slots per sequence, written by the thread that holds
    it and read back after a barrier); du, ddelta, dz are summed over n in registers, dB and dC over
    the program's channels before one atomic add per (n, chunk). With SAVE_EVERY > 1 the forward kept
    every SAVE_EVERY-th chunk's start state: entering a group of chunks (from its last), the others'
    are recomputed from it into scratch slots (`_recompute_group_states`)."""
    pid_d = tl.program_id(0)
    seq = tl.program_id(1)
    b, t_first, length = _sequence(seq, seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length, VARLEN)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, CHUNK)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    group = (pid_d * BLOCK_D) // channels_per_group
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], tl.float32)
    first = (offs_k == 0)[None, :]
    last = (offs_k == CHUNK - 1)[None, :]
    dD_acc = tl.zeros([BLOCK_D], tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], tl.float32)
    # dA summed over all chunks in registers: one atomic add per program instead of one per (chunk, n)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)

    n_chunks = tl.cdiv(length, CHUNK)
    carry_rows = carry_ptr + seq * sg_s + offs_d * sg_d
    if HAS_DLAST:
        seed = tl.load(dlast_ptr + seq * sl_s + offs_d[:, None] * sl_d + offs_n[None, :] * sl_n,
                       mask=mask_dn, other=0.0).to(tl.float32)
    else:
        seed = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    # slot of the last chunk, (n_chunks - 1) % 2, written without a negative index when n_chunks == 0
    tl.store(carry_rows[:, None] + ((n_chunks + 1) % 2) * sg_c + offs_n[None, :] * sg_n, seed, mask=mask_dn)
    tl.debug_barrier()

    for c_rev in range(0, n_chunks):
        c = n_chunks - 1 - c_rev
        if SAVE_EVERY > 1:  # noqa: SIM102 (a compile-time and a run-time condition)
            if (c % SAVE_EVERY == SAVE_EVERY - 1) | (c_rev == 0):
                _recompute_group_states(c, u_ptr, dt_ptr, A_ptr, B_ptr, states_ptr, b, seq, group, t_first, length,
                                        offs_d, offs_k, mask_d, first, bias, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l,
                                        sA_d, sA_n, sB_b, sB_g, sB_n, sB_l, ss_s, ss_c, ss_d, ss_n, N, scratch0,
                                        HAS_BIAS, SOFTPLUS, APPROX_LOG, FULL, SAVE_EVERY, CHUNK)
        t_local = c * CHUNK + offs_k
        mask_t = t_local < length
        t = t_first + t_local
        mask_dt = mask_d[:, None] & mask_t[None, :]
        mask_next = mask_d[:, None] & (t_local + 1 < length)[None, :]
        # tiles used across the state loop; the rest is re-read after it (cheap L2 hits) so that
        # fewer tiles stay live in registers while the loop runs
        u_ptrs = u_ptr + b * su_b + offs_d[:, None] * su_d + t[None, :] * su_l
        dt_ptrs = dt_ptr + b * sdt_b + offs_d[:, None] * sdt_d + t[None, :] * sdt_l
        do_ptrs = dout_ptr + b * sdo_b + offs_d[:, None] * sdo_d + t[None, :] * sdo_l
        z_ptrs = z_ptr + b * sz_b + offs_d[:, None] * sz_d + t[None, :] * sz_l
        dt, _ = _load_delta(dt_ptrs, mask_dt, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
        if not ONE_EXP or ADJOINT >= 3:  # one exp per element-state goes with the reverse scan only
            dt_next, _ = _load_delta(dt_ptrs + sdt_l, mask_next, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
        dy = tl.load(do_ptrs, mask=mask_dt, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptrs, mask=mask_dt, other=0.0).to(tl.float32)
            dy = dy * zv * tl.sigmoid(zv)
        if ADJOINT >= 3:
            # the adjoint scan runs forward over the chunk read back to front (index k is step
            # CHUNK - 1 - k): the chunk's tiles are flipped once here, C_n and the result per n
            mask_t_rev = (c * CHUNK + (CHUNK - 1 - offs_k)) < length
            dt_next = _flip_time(dt_next, LANE_FLIP)
            if ADJOINT == 3 or ADJOINT == 4:
                dy_rev = _flip_time(dy, LANE_FLIP)
            # 4: C read back to front from a time-reversed copy (Crev[..., j] = C[..., L - 1 - j]),
            # so the per-state row needs no flip and is read with the same wide loads as B
            Crev_base = (Crev_ptr + b * sCr_b + group * sCr_g
                         + (total_length - CHUNK - t_first - c * CHUNK + offs_k) * sCr_l)
        dtu = dt * tl.load(u_ptrs, mask=mask_dt, other=0.0).to(tl.float32)
        gB_acc = tl.zeros([BLOCK_D, CHUNK], tl.float32)
        gA_acc = tl.zeros([BLOCK_D, CHUNK], tl.float32)
        y_acc = tl.zeros([BLOCK_D, CHUNK], tl.float32)
        B_base = B_ptr + b * sB_b + group * sB_g + t * sB_l
        C_base = C_ptr + b * sC_b + group * sC_g + t * sC_l
        h0_rows = states_ptr + seq * ss_s + _state_slot(c, SAVE_EVERY, scratch0) * ss_c + offs_d * ss_d
        g_in = carry_rows + (c % 2) * sg_c
        g_out = carry_rows + ((c + 1) % 2) * sg_c
        # STAGES > 1 lets the compiler prefetch the next state index's A, B, C and carries
        for n in tl.range(0, N, num_stages=STAGES):
            An = _load_f32(A_ptr + offs_d * sA_d + n * sA_n, mask_d, FULL)
            Bn = _load_f32(B_base + n * sB_n, mask_t, FULL)
            Cn = _load_f32(C_base + n * sC_n, mask_t, FULL)
            h0 = _load_f32(h0_rows + n * ss_n, mask_d, FULL)
            g_end = _load_f32(g_in + n * sg_n, mask_d, FULL)
            A2n = (An * LOG2E)[:, None]
            decay = tl.exp2(dt * A2n)
            drive = dtu * Bn[None, :]
            seeded = tl.where(first, drive + decay * h0[:, None], drive)
            _, hs = tl.associative_scan((decay, seeded), axis=1, combine_fn=_linear_combine)
            if HAS_Z:
                y_acc += hs * Cn[None, :]
            if ADJOINT >= 3:
                decay_next = tl.exp2(dt_next * A2n)
                if ADJOINT == 5:
                    # the source flipped as one (channels, CHUNK) tile: no reversed dy kept live
                    # through the loop, and the flip works on the tiles' own layout
                    src = _flip_time(Cn[None, :] * dy, LANE_FLIP)
                else:
                    if ADJOINT == 3:
                        Cn_rev = _flip_time(Cn, False)
                    else:
                        Cn_rev = _load_f32(Crev_base + n * sCr_n, mask_t_rev, FULL)
                    src = Cn_rev[None, :] * dy_rev
                src = tl.where(first, src + decay_next * g_end[:, None], src)
                _, gs_rev = tl.associative_scan((decay_next, src), axis=1, combine_fn=_linear_combine)
                _store_column(g_out + n * sg_n, gs_rev, offs_k, CHUNK - 1, mask_d)
                gs = _flip_time(gs_rev, LANE_FLIP)
            elif ONE_EXP:
                src = Cn[None, :] * dy
                # the carry is a_0 g_0 of the chunk to the right (or dlast): added to the last source
                src = tl.where(last, src + g_end[:, None], src)
                ones = tl.full([BLOCK_D, CHUNK], 1.0, tl.float32)
                _, _, gs = tl.associative_scan((decay, ones, src), axis=1, combine_fn=_adjoint_combine,
                                               reverse=True)
                carry_out = decay * gs
            else:
                src = Cn[None, :] * dy
                decay_next = tl.exp2(dt_next * A2n)
                src = tl.where(last, src + decay_next * g_end[:, None], src)
                if ADJOINT == 1:  # the reverse scan spelled out: flips along time around a forward scan
                    _, gs = tl.associative_scan((tl.flip(decay_next, 1), tl.flip(src, 1)), axis=1,
                                                combine_fn=_linear_combine)
                    gs = tl.flip(gs, 1)
                else:
                    _, gs = tl.associative_scan((decay_next, src), axis=1, combine_fn=_linear_combine,
                                                reverse=True)
                carry_out = gs
            if ADJOINT < 3:
                # the adjoint entering this chunk is what the chunk to the left continues from
                _store_column(g_out + n * sg_n, carry_out, offs_k, 0, mask_d)
            gB_acc += gs * Bn[None, :]
            g_hprev = gs * (hs - drive)
            gA_acc += g_hprev * An[:, None]
            dA_acc += tl.where(offs_n[None, :] == n, tl.sum(g_hprev * dt, axis=1)[:, None], 0.0)
            dB_row = dB_ptr + b * sdB_b + group * sdB_g + n * sdB_n + t * sdB_l
            dC_row = dC_ptr + b * sdC_b + group * sdC_g + n * sdC_n + t * sdC_l
            if REDUCE_DBC:
                tl.atomic_add(dB_row, tl.sum(gs * dtu, axis=0), mask=mask_t, sem="relaxed")
                tl.atomic_add(dC_row, tl.sum(hs * dy, axis=0), mask=mask_t, sem="relaxed")
            else:
                # every channel row adds its own product: no shuffles across the channel lanes, and
                # the atomics keep the tile's layout (more, smaller contributions per address)
                rows0 = offs_d[:, None] * 0
                tl.atomic_add(dB_row[None, :] + rows0, gs * dtu, mask=mask_dt, sem="relaxed")
                tl.atomic_add(dC_row[None, :] + rows0, hs * dy, mask=mask_dt, sem="relaxed")
        tl.debug_barrier()

        # pointers rebuilt rather than kept live through the loop (64-bit each, per element)
        u = tl.load(u_ptr + b * su_b + offs_d[:, None] * su_d + t[None, :] * su_l,
                    mask=mask_dt, other=0.0).to(tl.float32)
        _, dt_raw = _load_delta(dt_ptr + b * sdt_b + offs_d[:, None] * sdt_d + t[None, :] * sdt_l,
                                mask_dt, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
        du = dt * gB_acc
        ddt = u * gB_acc + gA_acc
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if HAS_Z:
            y = y_acc
            if HAS_D:
                y += Dv[:, None] * u
            dout = tl.load(dout_ptr + b * sdo_b + offs_d[:, None] * sdo_d + t[None, :] * sdo_l,
                           mask=mask_dt, other=0.0).to(tl.float32)
            # z re-read (an L2 hit) rather than kept live through the state loop
            zv = tl.load(z_ptr + b * sz_b + offs_d[:, None] * sz_d + t[None, :] * sz_l,
                         mask=mask_dt, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zv)
            dz = dout * y * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + b * sdz_b + offs_d[:, None] * sdz_d + t[None, :] * sdz_l,
                     dz.to(dz_ptr.dtype.element_ty), mask=mask_dt)
        tl.store(du_ptr + b * sdu_b + offs_d[:, None] * sdu_d + t[None, :] * sdu_l,
                 du.to(du_ptr.dtype.element_ty), mask=mask_dt)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        ddt = tl.where(mask_dt, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(ddt_ptr + b * sddt_b + offs_d[:, None] * sddt_d + t[None, :] * sddt_l,
                 ddt.to(ddt_ptr.dtype.element_ty), mask=mask_dt)

    tl.atomic_add(dA_ptr + offs_d[:, None] * N + offs_n[None, :], dA_acc, mask=mask_dn, sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD_acc, mask=mask_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, dbias_acc, mask=mask_d, sem="relaxed")


@triton.jit
def _fwd_one_state(n, N, mask_d, mask_t, first, is_final, dt, dtu, offs_d, offs_k,
                   A_ptr, sA_d, sA_n, B_base, sB_n, C_base, sC_n, h_in, h_out, ss_n, last_rows, sl_n,
                   STORE_LAST: tl.constexpr, FULL: tl.constexpr = False, END_TILE: tl.constexpr = False):
    """State index n of one chunk: scan from the chunk-start state, store the state after the chunk
    (END_TILE: return it instead, for one store per chunk), return its contribution C_n h_n to y.
    Indices n >= N contribute nothing."""
    md = mask_d & ((offs_d * 0 + n) < N)
    mt = mask_t & ((offs_k * 0 + n) < N)
    An = _load_f32(A_ptr + offs_d * sA_d + n * sA_n, md, FULL)
    Bn = _load_f32(B_base + n * sB_n, mt, FULL)
    Cn = _load_f32(C_base + n * sC_n, mt, FULL)
    h0 = _load_f32(h_in + n * ss_n, md, FULL)
    decay = tl.exp2(dt * (An * LOG2E)[:, None])
    drive = dtu * Bn[None, :]
    drive = tl.where(first, drive + decay * h0[:, None], drive)
    _, hs = tl.associative_scan((decay, drive), axis=1, combine_fn=_linear_combine)
    # the state after the chunk: the next chunk's start, or the sequence's last state
    column = offs_k.shape[0] - 1
    if END_TILE:
        # the state after the chunk as a per-channel vector: one lane's register, summed out of the
        # tile (the other terms are zeros) without the whole-tile layout conversion a store needs
        end = tl.sum(tl.where((offs_k == column)[None, :], hs, 0.0), axis=1)
    else:
        end = tl.zeros_like(An)
        if is_final:
            if STORE_LAST:
                _store_column(last_rows + n * sl_n, hs, offs_k, column, md)
        else:
            _store_column(h_out + n * ss_n, hs, offs_k, column, md)
    return hs * Cn[None, :], end


@triton.jit
def _fwd_state_loop_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr, last_ptr,
    seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length,
    dim, N, channels_per_group,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l, so_b, so_d, so_l,
    ss_s, ss_c, ss_d, ss_n, sl_s, sl_d, sl_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    VARLEN: tl.constexpr,
    STORE_STATES: tl.constexpr, STORE_LAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, PAIR: tl.constexpr = 1,
    STAGES: tl.constexpr = 1, FULL: tl.constexpr = False, END_TILE: tl.constexpr = False,
    APPROX_LOG: tl.constexpr = False, SAVE_EVERY: tl.constexpr = 1, scratch0=0,
):
    """Forward one state index n at a time on (channels, CHUNK) tiles, y summed over n in registers
    (for large d_state, where a thread cannot hold all states of a channel). With STORE_STATES, the start
    state of every SAVE_EVERY-th chunk is kept (`_state_slot`)."""
    pid_d = tl.program_id(0)
    seq = tl.program_id(1)
    b, t_first, length = _sequence(seq, seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length, VARLEN)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, CHUNK)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    group = (pid_d * BLOCK_D) // channels_per_group
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], tl.float32)
    first = (offs_k == 0)[None, :]
    st_tile = states_ptr + seq * ss_s + offs_d[:, None] * ss_d + offs_n[None, :] * ss_n

    st_rows = states_ptr + seq * ss_s + offs_d * ss_d
    last_rows = last_ptr + seq * sl_s + offs_d * sl_d
    n_chunks = tl.cdiv(length, CHUNK)
    tl.store(st_tile, tl.zeros([BLOCK_D, BLOCK_N], tl.float32), mask=mask_dn)
    tl.debug_barrier()
    for c in range(0, n_chunks):
        t_local = c * CHUNK + offs_k
        mask_t = t_local < length
        t = t_first + t_local
        mask_dt = mask_d[:, None] & mask_t[None, :]
        u = tl.load(u_ptr + b * su_b + offs_d[:, None] * su_d + t[None, :] * su_l,
                    mask=mask_dt, other=0.0).to(tl.float32)
        dt, _ = _load_delta(dt_ptr + b * sdt_b + offs_d[:, None] * sdt_d + t[None, :] * sdt_l,
                            mask_dt, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
        dtu = dt * u
        y = tl.zeros([BLOCK_D, CHUNK], tl.float32)
        B_base = B_ptr + b * sB_b + group * sB_g + t * sB_l
        C_base = C_ptr + b * sC_b + group * sC_g + t * sC_l
        # the carry between chunks goes through `states`: every chunk's start kept for the backward
        # (STORE_STATES), or two slots used in turn when nothing will be differentiated
        if STORE_STATES:
            slot, next_slot = _state_slot(c, SAVE_EVERY, scratch0), _state_slot(c + 1, SAVE_EVERY, scratch0)
        else:
            slot, next_slot = c % 2, (c + 1) % 2
        h_in = st_rows + slot * ss_c
        h_out = st_rows + next_slot * ss_c
        is_final = c == n_chunks - 1
        h_end = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        for n in tl.range(0, N, PAIR, num_stages=STAGES):
            # PAIR independent state indices per iteration give the scheduler two dependency chains
            part, end = _fwd_one_state(n, N, mask_d, mask_t, first, is_final, dt, dtu, offs_d, offs_k,
                                       A_ptr, sA_d, sA_n, B_base, sB_n, C_base, sC_n, h_in, h_out, ss_n, last_rows,
                                       sl_n, STORE_LAST, FULL, END_TILE)
            y += part
            if END_TILE:
                h_end = tl.where(offs_n[None, :] == n, end[:, None], h_end)
            if PAIR == 2:
                part, end = _fwd_one_state(n + 1, N, mask_d, mask_t, first, is_final, dt, dtu, offs_d,
                                           offs_k, A_ptr, sA_d, sA_n, B_base, sB_n, C_base, sC_n, h_in, h_out, ss_n,
                                           last_rows, sl_n, STORE_LAST, FULL, END_TILE)
                y += part
                if END_TILE:
                    h_end = tl.where(offs_n[None, :] == n + 1, end[:, None], h_end)
        if END_TILE:  # the chunk's end states, one store per chunk
            if is_final:
                if STORE_LAST:
                    tl.store(last_rows[:, None] + offs_n[None, :] * sl_n, h_end, mask=mask_dn)
            else:
                tl.store(st_tile + next_slot * ss_c, h_end, mask=mask_dn)
        tl.debug_barrier()
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zv = tl.load(z_ptr + b * sz_b + offs_d[:, None] * sz_d + t[None, :] * sz_l,
                         mask=mask_dt, other=0.0).to(tl.float32)
            y = y * zv * tl.sigmoid(zv)
        tl.store(out_ptr + b * so_b + offs_d[:, None] * so_d + t[None, :] * so_l,
                 y.to(out_ptr.dtype.element_ty), mask=mask_dt)
    if STORE_LAST:  # noqa: SIM102 (a compile-time and a run-time condition)
        if n_chunks == 0:
            tl.store(last_rows[:, None] + offs_n[None, :] * sl_n, tl.zeros([BLOCK_D, BLOCK_N], tl.float32),
                     mask=mask_dn)
