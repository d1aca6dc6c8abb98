"""The sequential backward of the selective scan (d_state <= 16): the backward of `_fwd_seq_kernel`, the
default after a sequential forward (kernels/NOTES.md v13; with few rows in pieces of time, v14).

A channel's 16 states sit on one lane (SPLIT 1) or on two neighbouring lanes, 8 states each (SPLIT 2, the
default: half the registers, 12 resident warps instead of 8). Time runs backward chunk by chunk (the forward
saved the state at every chunk start). Per chunk:

1. a forward pass from the saved state writes the state at the start of every 4-step block (`ckpt`,
   global scratch the program rereads soon, mostly from cache);
2. blocks from last to first: the block's 4 states are recomputed into registers from its checkpoint,
   then the adjoint g steps back through them.

du, ddelta, dz are sums over a channel's states: in the thread, plus one shuffle with SPLIT 2. With SHARE (SPLIT 2,
the default in one piece of time) the two lanes of a channel split the per-channel work of a block, two steps each,
exchanging delta and dy and reduce-scattering those sums, and the adjoint is carried as g-hat = decay * g (GHAT:
g decay h_{t-1} is then g-hat h_{t-1}, one instruction an element-state less; kernels/NOTES.md v16). dB and dC are
sums over channels, that is over lanes: each step's g dtu and h dy values are reduce-scattered across the
warp in butterfly rounds (inline PTX; 32 shuffles a step where a per-value warp sum would take 160). Lane l
ends with the warp's total of one value and adds it to a time-major (batch, groups, steps, 32) buffer: one
coalesced 128-byte atomic add per warp and step.
"""

from __future__ import annotations

import triton
import triton.language as tl

from odyssey.kernels.triton_scan_kernels import (
    SEQ_STATES,
    _effective_delta,
    _halves,
    _interleave,
    _load_delta,
    _sequence,
    _softplus,
)

LN2 = tl.constexpr(0.6931471805599453)
BWD_BLOCK = tl.constexpr(4)  # steps whose states sit in registers at once
LANES = tl.constexpr(32)


@triton.jit
def _columns4(x):
    """(R, 4) -> its four (R,) columns."""
    rows: tl.constexpr = x.shape[0]
    even, odd = _halves(x)
    c0, c2 = _halves(even)
    c1, c3 = _halves(odd)
    return tl.reshape(c0, [rows]), tl.reshape(c1, [rows]), tl.reshape(c2, [rows]), tl.reshape(c3, [rows])


@triton.jit
def _rows4(c0, c1, c2, c3):
    """Inverse of _columns4."""
    return _interleave(_interleave(c0, c2), _interleave(c1, c3))


@triton.jit
def _lane_ids(like):
    """The lane (0-31) of the thread that holds each element of the int32 tensor `like`."""
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _exchange(even, odd, mask):
    """A reduce-scatter round between lanes l and l ^ mask: a lane whose `mask` bit is set keeps the odd
    columns and receives its partner's, the other the even ones (two selects a value)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred keep_odd;
        .reg .b32 lane, send, keep, got;
        mov.u32 lane, %laneid;
        and.b32 lane, lane, $3;
        setp.ne.u32 keep_odd, lane, 0;
        selp.b32 send, $1, $2, keep_odd;
        selp.b32 keep, $2, $1, keep_odd;
        shfl.sync.bfly.b32 got, send, $3, 0x1f, 0xffffffff;
        add.f32 $0, keep, got;
        }""",
        "=r,r,r,r", [even, odd, mask], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _exchange_uniform(even, odd, mask):
    """The same round without selects, for a column bit the lanes store XOR-ed with their `mask` bit (see
    _quad_xor): every lane keeps its even columns and sends its odd ones."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 got;
        shfl.sync.bfly.b32 got, $2, $3, 0x1f, 0xffffffff;
        add.f32 $0, $1, got;
        }""",
        "=r,r,r,r", [even, odd, mask], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _all_reduce(x, mask):
    """x + x of lane l ^ mask."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 got;
        shfl.sync.bfly.b32 got, $1, $2, 0x1f, 0xffffffff;
        add.f32 $0, $1, got;
        }""",
        "=r,r,r", [x, mask], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _round(x, MASK: tl.constexpr, UNIFORM: tl.constexpr):
    even, odd = _halves(x)
    mask = tl.full(even.shape, MASK, tl.int32)
    return _exchange_uniform(even, odd, mask) if UNIFORM else _exchange(even, odd, mask)


@triton.jit
def _lane_sums(x, SPLIT: tl.constexpr, LANE_ASM: tl.constexpr):
    """(32, 16 / SPLIT) state rows, a row per lane (a channel on SPLIT neighbouring lanes, lane bit 0 the part
    when SPLIT is 2) -> (32,): lane l gets register column (l // SPLIT) % columns summed over the lanes of its
    part. Register columns are _load_states' order; the bits that pick a 16-byte quad come first, and the
    lanes store quads XOR-ed (_quad_xor) so that those rounds need no selects; the last round is an
    all-reduce over lane bit 4: 15 + 1 shuffles and 6 selects for a (32, 16) tile, 7 + 1 and 6 for (32, 8). Without
    inline assembly (the interpreter, quad XOR 0) the same from plain sums, row r standing for lane r."""
    rows: tl.constexpr = x.shape[0]
    columns: tl.constexpr = x.shape[1]
    if LANE_ASM:
        if SPLIT == 1:
            x = _round(x, 1, True)
        x = _round(x, 2, True)
        x = _round(x, 4, False)
        x = _round(x, 8, False)
        out = _all_reduce(tl.reshape(x, [rows]), tl.full([rows], 16, tl.int32))
    else:
        r = tl.arange(0, rows)
        same_part = (r[:, None] % SPLIT) == (r[None, :] % SPLIT)  # [lane, other lane]
        column = (r // SPLIT) % columns
        picked = tl.sum(tl.where(tl.arange(0, columns)[None, :] == column[:, None], 1.0, 0.0)[:, None, :]
                        * tl.where(same_part, 1.0, 0.0)[:, :, None] * x[None, :, :], axis=2)
        out = tl.sum(picked, axis=1)
    return out


@triton.jit
def _channel_sum(x, SPLIT: tl.constexpr, LANE_ASM: tl.constexpr):
    """(32, m) per-lane partial sums over a channel's states -> the channel's sums on both of its lanes."""
    if SPLIT == 1:
        out = x
    elif LANE_ASM:
        out = _all_reduce(x, tl.full(x.shape, 1, tl.int32))
    else:
        rows: tl.constexpr = x.shape[0]
        pairs = tl.sum(tl.reshape(x, [rows // 2, 2, x.shape[1]]), axis=1)
        out = tl.reshape(tl.broadcast_to(pairs[:, None, :], [rows // 2, 2, x.shape[1]]), [rows, x.shape[1]])
    return out


@triton.jit
def _partner(x, LANE_ASM: tl.constexpr):
    """(32, m): each row replaced by the other row of its channel (lane l ^ 1). The shuffle is right only when row r
    sits on lane r, which Triton's layout choice decides: operands must come from row-per-lane tiles (see
    _own_delta)."""
    if LANE_ASM:
        out = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 1, 0x1f, 0xffffffff;", "=r,r", [x],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        rows: tl.constexpr = x.shape[0]
        m: tl.constexpr = x.shape[1]
        even, odd = tl.split(tl.permute(tl.reshape(x, [rows // 2, 2, m]), (0, 2, 1)))
        out = tl.reshape(tl.permute(tl.join(odd, even), (0, 2, 1)), [rows, m])
    return out


@triton.jit
def _step_halves(x):
    """(R, 4) -> its steps 0-1 and its steps 2-3, (R, 2) each."""
    rows: tl.constexpr = x.shape[0]
    return tl.split(tl.permute(tl.reshape(x, [rows, 2, 2]), (0, 2, 1)))


@triton.jit
def _own_half(x, upper):
    """A channel's (R, 4) block row -> the two steps its lane works on: 0-1 on the first lane, 2-3 on the second."""
    low, high = _step_halves(x)
    return tl.where(upper[:, None], high, low)


@triton.jit
def _own_delta(raw4, upper, own_mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, APPROX_LOG: tl.constexpr):
    """_load_delta on a lane's two steps of a loaded (R, 4) block row. The row is read whole by both lanes of a
    channel (the addresses the unshared path uses). Loading each lane's two steps through per-lane offsets let
    Triton give those (R, 2) loads a [16, 2]-lanes layout when the channel stride is not a multiple of 16, and
    _partner's xor-1 shuffle then swapped a lane's two steps instead of exchanging with the other lane (v16)."""
    return _effective_delta(_own_half(raw4, upper), own_mask, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)


@triton.jit
def _gathered_columns(own, upper, LANE_ASM: tl.constexpr):
    """A lane's two steps of a per-channel value and its partner's -> the block's four (R,) step columns."""
    theirs = _partner(own, LANE_ASM)
    c0, c1 = tl.split(tl.where(upper[:, None], theirs, own))
    c2, c3 = tl.split(tl.where(upper[:, None], own, theirs))
    return c0, c1, c2, c3


@triton.jit
def _scattered_sum(c0, c1, c2, c3, upper, LANE_ASM: tl.constexpr):
    """Four (R,) step columns of per-lane partial sums -> the channel's sums over both lanes at the lane's two
    steps (a reduce-scatter: 2 shuffles where an all-reduce of the four takes 4)."""
    low = tl.join(c0, c1)
    high = tl.join(c2, c3)
    kept = tl.where(upper[:, None], high, low)
    sent = tl.where(upper[:, None], low, high)
    return kept + _partner(sent, LANE_ASM)


@triton.jit
def _lanes(offs_r, LANE_ASM: tl.constexpr):
    return _lane_ids(offs_r) if LANE_ASM else offs_r % LANES


@triton.jit
def _quad_xor(lane, SPLIT: tl.constexpr, LANE_ASM: tl.constexpr):
    """Which 16-byte quad of its state row a lane keeps first: quad k is stored at k ^ this, chosen so that
    in the select-free rounds a butterfly partner's odd columns line up with a lane's even ones."""
    if not LANE_ASM:
        out = lane * 0
    elif SPLIT == 1:
        out = 2 * (lane & 1) + ((lane >> 1) & 1)
    else:
        out = (lane >> 1) & 1
    return out


@triton.jit
def _lane_columns(lane, SPLIT: tl.constexpr):
    """Column of the (batch, groups, steps, 32) dB/dC buffer a lane's sum belongs to: lanes 0-15 dB, 16-31
    dC. SPLIT 1: register column j = lane % 16 holds state 8 (j & 1) + 4 ((j >> 1) & 1) + (j >> 2); SPLIT 2:
    part p = lane & 1, register column j = (lane >> 1) & 7 holds state 8 p + 4 (j & 1) + (j >> 1)."""
    if SPLIT == 1:
        j = lane & 15
        state = 8 * (j & 1) + 4 * ((j >> 1) & 1) + (j >> 2)
    else:
        j = (lane >> 1) & 7
        state = 8 * (lane & 1) + 4 * (j & 1) + (j >> 1)
    return (lane >> 4) * SEQ_STATES + state


@triton.jit
def _quad_offsets(quad_xor, k: tl.constexpr):
    return (4 * (k ^ quad_xor))[:, None] + tl.arange(0, 4)[None, :]


@triton.jit
def _load_row(rows, quad_xor, mask_rows, PER_ROW: tl.constexpr, MASKED: tl.constexpr = True):
    """_load_states for 16 or 8 values a row, quad k read from quad k ^ quad_xor of the row."""
    m = mask_rows[:, None] if MASKED else None
    other = 0.0 if MASKED else None
    t0 = tl.load(rows[:, None] + _quad_offsets(quad_xor, 0), mask=m, other=other)
    t1 = tl.load(rows[:, None] + _quad_offsets(quad_xor, 1), mask=m, other=other)
    if PER_ROW == 8:
        x = tl.reshape(tl.join(t0, t1), [rows.shape[0], 8])
    else:
        t2 = tl.load(rows[:, None] + _quad_offsets(quad_xor, 2), mask=m, other=other)
        t3 = tl.load(rows[:, None] + _quad_offsets(quad_xor, 3), mask=m, other=other)
        x = tl.reshape(tl.join(tl.join(t0, t1), tl.join(t2, t3)), [rows.shape[0], 16])
    return x


@triton.jit
def _write_row(rows, quad_xor, x, mask_rows, ATOMIC: tl.constexpr):
    """Inverse of _load_row: a store, or an atomic add."""
    PER_ROW: tl.constexpr = x.shape[1]
    if PER_ROW == 8:
        t0, t1 = tl.split(tl.reshape(x, [x.shape[0], 4, 2]))
        _write_quad(rows, quad_xor, 0, t0, mask_rows, ATOMIC)
        _write_quad(rows, quad_xor, 1, t1, mask_rows, ATOMIC)
    else:
        first, second = tl.split(tl.reshape(x, [x.shape[0], 4, 2, 2]))
        t0, t1 = tl.split(first)
        t2, t3 = tl.split(second)
        _write_quad(rows, quad_xor, 0, t0, mask_rows, ATOMIC)
        _write_quad(rows, quad_xor, 1, t1, mask_rows, ATOMIC)
        _write_quad(rows, quad_xor, 2, t2, mask_rows, ATOMIC)
        _write_quad(rows, quad_xor, 3, t3, mask_rows, ATOMIC)


@triton.jit
def _write_quad(rows, quad_xor, k: tl.constexpr, values, mask_rows, ATOMIC: tl.constexpr):
    ptrs = rows[:, None] + _quad_offsets(quad_xor, k)
    if ATOMIC:
        tl.atomic_add(ptrs, values, mask=mask_rows[:, None], sem="relaxed")
    else:
        tl.store(ptrs, values, mask=mask_rows[:, None])


@triton.jit
def _state_step(h, A2, dt, dtu, Bt_rows, quad_xor):
    return tl.exp2(A2 * dt[:, None]) * h + _load_row(Bt_rows, quad_xor, dt, h.shape[1], False) * dtu[:, None]


@triton.jit
def _adjoint_step(g, dt_next, h, A2, dt, dtu, dy, Bt, Ct, next_bt_rows, next_ct_rows, quad_xor, dA_acc, bc_ptrs,
                  dC_lane, in_time, SPLIT: tl.constexpr, LANE_ASM: tl.constexpr, AHEAD: tl.constexpr,
                  HAS_NEXT: tl.constexpr, h_prev=None, GHAT: tl.constexpr = False):
    """Step t backward. In: g of step t + 1 and that step's delta (its decay is recomputed here: one
    register a row carried between steps instead of 16), h the state after step t, step t's B and C rows. Out: g
    of step t, dA summed on, step t's sums over states of g B, g (h - drive) A2 and h C, the row's dB/dC lane sum
    added in, and step t - 1's B and C rows (HAS_NEXT), read before that atomic add (AHEAD) or after it.
    GHAT: g in and out is g-hat (decay * g) of step t + 1 and of step t, h_prev the state before step t, and
    dt_next is not read."""
    B_next = Bt
    C_next = Ct
    if HAS_NEXT and AHEAD:  # a step ahead: in flight while this step computes
        B_next = _load_row(next_bt_rows, quad_xor, dt, h.shape[1], False)
        C_next = _load_row(next_ct_rows, quad_xor, dt, h.shape[1], False)
    # "+ 0.0" keeps the compiler from reusing the recompute pass's decays (the same expression): holding
    # them costs 48 registers and spills (local sm_90 compile: 208 B of stack), recomputing costs 16 exp2
    if GHAT:  # g carries g-hat_{t+1} = decay_{t+1} g_{t+1}; g_t decay_t h_{t-1} = g-hat_t h_{t-1}
        g = g + Ct * dy[:, None]
        g_hat = tl.exp2(A2 * dt[:, None] + 0.0) * g
        g_prev = g_hat * h_prev
    else:
        g = tl.exp2(A2 * dt_next[:, None] + 0.0) * g + Ct * dy[:, None]
        # g_t * decay_t * h_{t-1}, from the state after the step (no state before it kept)
        g_prev = g * (h - Bt * dtu[:, None])
    dA_acc += g_prev * dt[:, None]
    gB = tl.sum(g * Bt, axis=1)
    gA2 = tl.sum(g_prev * A2, axis=1)
    y = tl.sum(h * Ct, axis=1)
    sums = tl.where(dC_lane, _lane_sums(h * dy[:, None], SPLIT, LANE_ASM),
                    _lane_sums(g * dtu[:, None], SPLIT, LANE_ASM))
    # added at once: the compiler may not move later B / C loads above this (possibly aliasing) atomic, which
    # keeps them from being hoisted and held in registers for the whole block
    tl.atomic_add(bc_ptrs, sums, mask=tl.full(dtu.shape, 1, tl.int1) & in_time, sem="relaxed")
    if HAS_NEXT and not AHEAD:
        B_next = _load_row(next_bt_rows, quad_xor, dt, h.shape[1], False)
        C_next = _load_row(next_ct_rows, quad_xor, dt, h.shape[1], False)
    if GHAT:
        g = g_hat
    return g, dA_acc, gB, gA2, y, B_next, C_next


@triton.jit
def _source_step(g, A2, dt_next, dy, Ct_rows, quad_xor):
    """The adjoint's step alone (phase 1 of time pieces)."""
    return tl.exp2(A2 * dt_next[:, None]) * g + _load_row(Ct_rows, quad_xor, dy, g.shape[1], False) * dy[:, None]


@triton.jit
def _bwd_seq_kernel(
    u_ptr, dt_ptr, A2_ptr, BT_ptr, CT_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, dlast_ptr, ckpt_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dBC_ptr, dD_ptr, dbias_ptr,
    seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length,
    dim, channels_per_group,
    part_ptr, usum_ptr, segment_length, sp_s, sp_g, sp_d, sus_s, sus_g,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sBT_b, sBT_g, sBT_l,
    sz_b, sz_d, sz_l, sdo_b, sdo_d, sdo_l,
    ss_s, ss_c, ss_d, sl_s, sl_d, sk_s, sk_k, sk_d,
    sdu_b, sdu_d, sdu_l, sddt_b, sddt_d, sddt_l, sdz_b, sdz_d, sdz_l, sbc_b, sbc_g, sbc_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    VARLEN: tl.constexpr, HAS_DLAST: tl.constexpr, CHUNK: tl.constexpr, LANE_ASM: tl.constexpr,
    SPLIT: tl.constexpr = 1, SEGMENTS: tl.constexpr = 1, PHASE: tl.constexpr = 2, APPROX_LOG: tl.constexpr = False,
    BC_AHEAD: tl.constexpr = False, SHARE: tl.constexpr = False, GHAT: tl.constexpr = False,
    ROW_STRIDES: tl.constexpr = False,
):
    """One program: a warp of one sequence, time from last to first: 32 channels a channel a thread, or
    (SPLIT 2) 16 channels a channel on two neighbouring lanes, 8 states each (half the registers a thread).
    A2_ptr: A * log2(e) padded to 16 states; BT_ptr / CT_ptr: time-major float32 B and C rows
    (batch, groups, steps, 16), zero-padded; states_ptr: the forward's chunk-start states (padded rows);
    dlast_ptr: (sequences, dim, 16) padded; ckpt_ptr: (sequences x SEGMENTS, CHUNK / 4, dim, 16) scratch; dA_ptr:
    (dim, 16); dBC_ptr: (batch, groups, steps, 32) float32, dB in columns 0-15 and dC in 16-31.

    SEGMENTS > 1 (dense batches with few channel rows): time is cut into pieces of `segment_length` steps (whole
    chunks), a program each, as in the forward. PHASE 1 runs the adjoint alone over every piece but the first,
    from zero at its end, and writes g at its first step (`part_ptr`) and U, the sum of delta over its steps
    after the first and the step after it (`usum_ptr`: the piece carries g from its end to its start by
    exp2(A2 * U)). PHASE 2 starts each piece from the later pieces' results combined."""
    if ROW_STRIDES:  # the B / C rows and the dB / dC rows as the launcher allocates them: offsets become immediates
        sBT_l = SEQ_STATES
        sbc_l = 2 * SEQ_STATES
    BLOCK_R: tl.constexpr = LANES
    CHANNELS: tl.constexpr = LANES // SPLIT
    PER_ROW: tl.constexpr = SEQ_STATES // SPLIT
    pid_d = tl.program_id(0)
    seq = tl.program_id(1) // SEGMENTS
    segment = tl.program_id(1) % SEGMENTS
    b, t_first, length = _sequence(seq, seq_batch_ptr, seq_start_ptr, seq_len_ptr, dense_length, VARLEN)
    begin = segment * segment_length
    end = tl.minimum(begin + segment_length, length) if SEGMENTS > 1 else length
    if PHASE == 1:  # the first piece's result is nobody's input
        end = tl.where(segment == 0, begin, end)
    offs_r = tl.arange(0, BLOCK_R)
    chan = pid_d * CHANNELS + offs_r // SPLIT
    part = offs_r % SPLIT  # a row's states start at part * PER_ROW
    mask_r = chan < dim
    first_part = mask_r & (part == 0)  # the row that writes its channel's outputs
    group = (pid_d * CHANNELS) // channels_per_group
    lane = _lanes(offs_r, LANE_ASM)
    quad_xor = _quad_xor(lane, SPLIT, LANE_ASM)
    dC_lane = lane >= SEQ_STATES
    A2 = _load_row(A2_ptr + chan * SEQ_STATES + part * PER_ROW, quad_xor, mask_r, PER_ROW)
    if HAS_D:
        Dv = tl.load(D_ptr + chan, mask=mask_r, other=0.0).to(tl.float32)
    # (this prologue repeats _fwd_seq_kernel's on purpose: moving the bias load and the B / C row pointers into
    # shared helpers changes the compiled code of both kernels, the forward's by +64 instructions; NOTES v14)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=mask_r, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_R], tl.float32)
    steps = tl.arange(0, BWD_BLOCK)
    u_rows = u_ptr + b * su_b + chan * su_d
    dt_rows = dt_ptr + b * sdt_b + chan * sdt_d
    z_rows = z_ptr + b * sz_b + chan * sz_d
    do_rows = dout_ptr + b * sdo_b + chan * sdo_d
    du_rows = du_ptr + b * sdu_b + chan * sdu_d
    ddt_rows = ddt_ptr + b * sddt_b + chan * sddt_d
    dz_rows = dz_ptr + b * sdz_b + chan * sdz_d
    # the same B_t / C_t row for every channel of the program (a broadcast load)
    bt_rows = BT_ptr + b * sBT_b + group * sBT_g + part * PER_ROW
    ct_rows = CT_ptr + b * sBT_b + group * sBT_g + part * PER_ROW
    st_rows = states_ptr + seq * ss_s + chan * ss_d + part * PER_ROW
    ck_rows = ckpt_ptr + (seq * SEGMENTS + segment) * sk_s + chan * sk_d + part * PER_ROW
    part_rows = part_ptr + seq * sp_s + chan * sp_d + part * PER_ROW
    usum_rows = usum_ptr + seq * sus_s + chan
    bc_cols = dBC_ptr + b * sbc_b + group * sbc_g + _lane_columns(lane, SPLIT)
    # SHARE (SPLIT 2): the per-channel work of a block (softplus, the gate, the outputs) split between a channel's
    # two lanes, two steps each, instead of done by both
    upper = part == 1
    own_steps = 2 * part[:, None] + tl.arange(0, 2)[None, :]

    if HAS_DLAST and PHASE == 2:
        g = _load_row(dlast_ptr + seq * sl_s + chan * sl_d + part * PER_ROW, quad_xor, mask_r, PER_ROW)
    else:
        g = tl.zeros([BLOCK_R, PER_ROW], tl.float32)
    if PHASE == 2 and SEGMENTS > 1:  # g entering this piece at its end, from the later pieces' results
        for later in range(0, SEGMENTS - 1 - segment):
            q = SEGMENTS - 1 - later
            u_sum = tl.load(usum_rows + q * sus_g, mask=mask_r, other=0.0)
            g = _load_row(part_rows + q * sp_g, quad_xor, mask_r, PER_ROW) + tl.exp2(A2 * u_sum[:, None]) * g
    # delta of the step after the piece (0 past the sequence: decay 1)
    after = mask_r & (offs_r * 0 + end < length)
    dt_next = tl.load(dt_rows + (t_first + end) * sdt_l, mask=after, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_next += bias
    if SOFTPLUS:
        dt_next = _softplus(dt_next, APPROX_LOG)
    dt_next = tl.where(after, dt_next, 0.0)
    dA_acc = tl.zeros([BLOCK_R, PER_ROW], tl.float32)
    dD_acc = tl.zeros([BLOCK_R], tl.float32)
    dbias_acc = tl.zeros([BLOCK_R], tl.float32)

    if PHASE == 1:  # the adjoint alone, from zero at the piece's end
        u_sum = tl.zeros([BLOCK_R], tl.float32)
        n_blocks = tl.cdiv(end - begin, BWD_BLOCK)
        for k_rev in range(0, n_blocks):
            t0 = begin + (n_blocks - 1 - k_rev) * BWD_BLOCK
            t_local = t0 + steps
            mask = mask_r[:, None] & (t_local < length)[None, :]
            t = t_first + t_local
            dt, _ = _load_delta(dt_rows[:, None] + t[None, :] * sdt_l, mask, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
            dy = tl.load(do_rows[:, None] + t[None, :] * sdo_l, mask=mask, other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z_rows[:, None] + t[None, :] * sz_l, mask=mask, other=0.0).to(tl.float32)
                dy = dy * zv * tl.sigmoid(zv)
            d0, d1, d2, d3 = _columns4(dt)
            y0, y1, y2, y3 = _columns4(dy)
            ct = ct_rows + (t_first + t0) * sBT_l
            u_sum += dt_next + d3 + d2 + d1
            g = _source_step(g, A2, dt_next, y3, ct + 3 * sBT_l, quad_xor)
            g = _source_step(g, A2, d3, y2, ct + 2 * sBT_l, quad_xor)
            g = _source_step(g, A2, d2, y1, ct + sBT_l, quad_xor)
            g = _source_step(g, A2, d1, y0, ct, quad_xor)
            dt_next = d0
        _write_row(part_rows + segment * sp_g, quad_xor, g, mask_r, False)
        tl.store(usum_rows + segment * sus_g, u_sum, mask=first_part)
        return

    if GHAT:  # the carried adjoint as g-hat: g entering at the end times the decay of the step after it
        g = tl.exp2(A2 * dt_next[:, None]) * g
    c_first = begin // CHUNK
    n_chunks = tl.cdiv(end, CHUNK) - c_first
    for c_rev in range(0, n_chunks):
        c = c_first + n_chunks - 1 - c_rev
        blocks = tl.cdiv(tl.minimum(CHUNK, end - c * CHUNK), BWD_BLOCK)
        # 1. the chunk forward from its saved start state: each block's start state to the scratch
        h = _load_row(st_rows + c * ss_c, quad_xor, mask_r, PER_ROW)
        for k in range(0, blocks):
            _write_row(ck_rows + k * sk_k, quad_xor, h, mask_r, False)
            t_local = c * CHUNK + k * BWD_BLOCK + steps
            mask = mask_r[:, None] & (t_local < length)[None, :]
            t = t_first + t_local
            u = tl.load(u_rows[:, None] + t[None, :] * su_l, mask=mask, other=0.0).to(tl.float32)
            if SHARE:
                own_local = c * CHUNK + k * BWD_BLOCK + own_steps
                own_mask = mask_r[:, None] & (own_local < length)
                raw4 = tl.load(dt_rows[:, None] + t[None, :] * sdt_l, mask=mask, other=0.0)
                dt_own, _ = _own_delta(raw4, upper, own_mask, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
                d0, d1, d2, d3 = _gathered_columns(dt_own, upper, LANE_ASM)
                u0, u1, u2, u3 = _columns4(u)
                v0, v1, v2, v3 = d0 * u0, d1 * u1, d2 * u2, d3 * u3
            else:
                dt, _ = _load_delta(dt_rows[:, None] + t[None, :] * sdt_l, mask, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
                d0, d1, d2, d3 = _columns4(dt)
                v0, v1, v2, v3 = _columns4(dt * u)
            bt = bt_rows + (t_first + c * CHUNK + k * BWD_BLOCK) * sBT_l
            h = _state_step(h, A2, d0, v0, bt, quad_xor)
            h = _state_step(h, A2, d1, v1, bt + sBT_l, quad_xor)
            h = _state_step(h, A2, d2, v2, bt + 2 * sBT_l, quad_xor)
            h = _state_step(h, A2, d3, v3, bt + 3 * sBT_l, quad_xor)
        # 2. blocks from last to first: states recomputed, then the adjoint steps back through them
        for k_rev in range(0, blocks):
            k = blocks - 1 - k_rev
            t0 = c * CHUNK + k * BWD_BLOCK
            t_local = t0 + steps
            in_time = t_local < length
            mask = mask_r[:, None] & in_time[None, :]
            t = t_first + t_local
            u = tl.load(u_rows[:, None] + t[None, :] * su_l, mask=mask, other=0.0).to(tl.float32)
            if SHARE:  # this lane's two steps: `own_*` (R, 2) tiles
                own_local = t0 + own_steps
                own_mask = mask_r[:, None] & (own_local < length)
                t_own = t_first + own_local
                raw4 = tl.load(dt_rows[:, None] + t[None, :] * sdt_l, mask=mask, other=0.0)
                dt, dt_raw = _own_delta(raw4, upper, own_mask, bias, HAS_BIAS, SOFTPLUS, APPROX_LOG)
                dout = _own_half(tl.load(do_rows[:, None] + t[None, :] * sdo_l, mask=mask, other=0.0),
                                 upper).to(tl.float32)
            else:
                dt, dt_raw = _load_delta(dt_rows[:, None] + t[None, :] * sdt_l, mask, bias, HAS_BIAS, SOFTPLUS,
                                         APPROX_LOG)
                dout = tl.load(do_rows[:, None] + t[None, :] * sdo_l, mask=mask, other=0.0).to(tl.float32)
            dy = dout
            if HAS_Z:
                if SHARE:
                    zv = _own_half(tl.load(z_rows[:, None] + t[None, :] * sz_l, mask=mask, other=0.0),
                                   upper).to(tl.float32)
                else:
                    zv = tl.load(z_rows[:, None] + t[None, :] * sz_l, mask=mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zv)
                dy = dout * zv * sig
                dz_of_y = dout * sig * (1.0 + zv * (1.0 - sig))  # dz = dz_of_y * y
            if SOFTPLUS:
                dt_raw = tl.sigmoid(dt_raw)  # d softplus / d raw
            if SHARE:
                d0, d1, d2, d3 = _gathered_columns(dt, upper, LANE_ASM)
                u0, u1, u2, u3 = _columns4(u)
                v0, v1, v2, v3 = d0 * u0, d1 * u1, d2 * u2, d3 * u3
                y0, y1, y2, y3 = _gathered_columns(dy, upper, LANE_ASM)
            else:
                d0, d1, d2, d3 = _columns4(dt)
                v0, v1, v2, v3 = _columns4(dt * u)
                y0, y1, y2, y3 = _columns4(dy)
            bt = bt_rows + (t_first + t0) * sBT_l
            ct = ct_rows + (t_first + t0) * sBT_l
            h0 = _load_row(ck_rows + k * sk_k, quad_xor, mask_r, PER_ROW, False)
            h1 = _state_step(h0, A2, d0, v0, bt, quad_xor)
            h2 = _state_step(h1, A2, d1, v1, bt + sBT_l, quad_xor)
            h3 = _state_step(h2, A2, d2, v2, bt + 2 * sBT_l, quad_xor)
            h4 = _state_step(h3, A2, d3, v3, bt + 3 * sBT_l, quad_xor)
            # dB / dC: one lane sum per step, added where the step lies inside the sequence
            bc = bc_cols + (t_first + t0) * sbc_l
            B3 = _load_row(bt + 3 * sBT_l, quad_xor, d3, PER_ROW, False)
            C3 = _load_row(ct + 3 * sBT_l, quad_xor, d3, PER_ROW, False)
            g, dA_acc, gB3, gA3, yc3, B2, C2 = _adjoint_step(
                g, dt_next, h4, A2, d3, v3, y3, B3, C3, bt + 2 * sBT_l, ct + 2 * sBT_l, quad_xor, dA_acc,
                bc + 3 * sbc_l, dC_lane, t0 + 3 < length, SPLIT, LANE_ASM, BC_AHEAD, True, h3, GHAT)
            g, dA_acc, gB2, gA2, yc2, B1, C1 = _adjoint_step(
                g, d3, h3, A2, d2, v2, y2, B2, C2, bt + sBT_l, ct + sBT_l, quad_xor, dA_acc, bc + 2 * sbc_l,
                dC_lane, t0 + 2 < length, SPLIT, LANE_ASM, BC_AHEAD, True, h2, GHAT)
            g, dA_acc, gB1, gA1, yc1, B0, C0 = _adjoint_step(
                g, d2, h2, A2, d1, v1, y1, B1, C1, bt, ct, quad_xor, dA_acc, bc + sbc_l,
                dC_lane, t0 + 1 < length, SPLIT, LANE_ASM, BC_AHEAD, True, h1, GHAT)
            g, dA_acc, gB0, gA0, yc0, _, _ = _adjoint_step(
                g, d1, h1, A2, d0, v0, y0, B0, C0, bt, ct, quad_xor, dA_acc, bc, dC_lane, t0 < length, SPLIT,
                LANE_ASM, BC_AHEAD, False, h0, GHAT)
            dt_next = d0
            if SHARE:  # each lane writes its own two steps
                out_mask = own_mask
                out_t = t_own
                u = _own_half(u, upper)
                gB = _scattered_sum(gB0, gB1, gB2, gB3, upper, LANE_ASM)
                gA = _scattered_sum(gA0, gA1, gA2, gA3, upper, LANE_ASM)
            else:
                out_mask = mask & (part == 0)[:, None]  # a channel's SPLIT rows hold the same sums
                out_t = t[None, :]
                own_mask = mask
                gB = _channel_sum(_rows4(gB0, gB1, gB2, gB3), SPLIT, LANE_ASM)
                gA = _channel_sum(_rows4(gA0, gA1, gA2, gA3), SPLIT, LANE_ASM)
            du = dt * gB
            ddt = gA * LN2 + u * gB
            if HAS_D:
                du += Dv[:, None] * dy
                dD_acc += tl.sum(dy * u, axis=1)
            if HAS_Z:
                if SHARE:
                    y = _scattered_sum(yc0, yc1, yc2, yc3, upper, LANE_ASM)
                else:
                    y = _channel_sum(_rows4(yc0, yc1, yc2, yc3), SPLIT, LANE_ASM)
                if HAS_D:
                    y += Dv[:, None] * u
                dz = dz_of_y * y
                tl.store(dz_rows[:, None] + out_t * sdz_l, dz.to(dz_ptr.dtype.element_ty), mask=out_mask)
            tl.store(du_rows[:, None] + out_t * sdu_l, du.to(du_ptr.dtype.element_ty), mask=out_mask)
            if SOFTPLUS:
                ddt = ddt * dt_raw
            ddt = tl.where(own_mask, ddt, 0.0)
            dbias_acc += tl.sum(ddt, axis=1)
            tl.store(ddt_rows[:, None] + out_t * sddt_l, ddt.to(ddt_ptr.dtype.element_ty), mask=out_mask)

    _write_row(dA_ptr + chan * SEQ_STATES + part * PER_ROW, quad_xor, dA_acc, mask_r, True)
    sum_rows = mask_r if SHARE else first_part  # shared: each lane holds its steps' part of the sums
    if HAS_D:
        tl.atomic_add(dD_ptr + chan, dD_acc, mask=sum_rows, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + chan, dbias_acc, mask=sum_rows, sem="relaxed")
