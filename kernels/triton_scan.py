"""The `triton` backend of `odyssey.kernels.selective_scan`: Mamba-1 selective scan in Triton.

Entry points (semantics of mamba-ssm's `selective_scan_fn` / `selective_state_update`):
- `selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)`
- `selective_scan_varlen_triton(..., seq_lens=..., cu_seqlens=...)`: per-row lengths (positions past a
  row's length cost nothing and come out as 0) or sequences packed along time in one row.
- `selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)`: one decoding step,
  the state updated in place.

Shapes: u, delta, z (batch, dim, L), any strides (a transposed view of (batch, L, dim) is read without
a copy); A (dim, N) real; B, C (batch, N, L) or (batch, G, N, L); D, delta_bias (dim,). The state is
float32 whatever the input dtype. Kernels are in `triton_scan_kernels`; the design is in
`kernels/NOTES.md`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import triton

from odyssey.kernels import triton_scan_kernels
from odyssey.kernels.triton_scan_kernels import (
    _bwd_carry_kernel,
    _bwd_chunk_kernel,
    _bwd_state_loop_kernel,
    _fwd_seq_kernel,
    _fwd_state_loop_kernel,
    _scan_fwd_kernel,
    _state_update_kernel,
)
from odyssey.kernels.triton_seq_backward import BWD_BLOCK, _bwd_seq_kernel

MAX_D_STATE = 256
# Register budget of one program's tile in float32 elements, for the tile-shaped kernels.
FWD_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 2048
# Enough chunk programs in the two-pass backward to fill a large GPU several times over.
BWD_TARGET_PROGRAMS = 1024
# The sequential forward holds all states of a channel in one thread, padded to SEQ_STATES, and reads
# SEQ_STEPS steps at a time.
SEQ_STATES = triton_scan_kernels.SEQ_STATES.value
SEQ_STEPS = triton_scan_kernels.SEQ_STEPS.value
SEQ_MIN_WARPS = 8  # per multiprocessor, for the sequential forward to be the default
SEQ_RESIDENT_PROGRAMS = 12  # of its 1-warp programs per multiprocessor (136 registers; ncu: block limit 12)
SEQ_MAX_SEGMENTS = 8  # pieces of time measured (kernels/NOTES.md v12), and more only for longer sequences:
SEQ_MIN_PIECE_STEPS = 2048  # the pieces' length at 8 pieces of 16,384 steps, kept at longer lengths (v20)
SEQ_FIRST_PASS_PARTS = 8  # programs a piece in the forward's first pass (v18)
SEQ_MIN_PART_STEPS = 256  # the shortest default part (v18 measured parts of 256 and 512 steps)
STATES_EVERY = 4  # chunks a kept state of the state-loop kernels covers at d_state > 16 (v19)
SEQ_BWD_SPLIT = 2  # lanes a channel in the sequential backward (kernels/NOTES.md v13)
# The sequential backward's time pieces (kernels/NOTES.md v14): none while its programs fill this many waves of
# SEQ_RESIDENT_PROGRAMS a multiprocessor (b32/L2048: 3,072 programs, 1.9 waves; a piece more would also put its
# checkpoint scratch, 50 MB a piece, over mamba-ssm's peak), else doubled while they stay within
# SEQ_BWD_PIECE_WAVES waves (b8/L16384: 768 programs in 8 pieces)
SEQ_BWD_ONE_PIECE_WAVES = 1.5
SEQ_BWD_PIECE_WAVES = 4
CHUNK = 64  # steps between saved states; the backward's time tile
SMALL_STATE_FWD = 16  # d_state (padded) up to which the forward runs 1-warp programs of
SMALL_STATE_FWD_CHANNELS = 4  # this many channels
SMALL_STATE_BWD = 64  # d_state (padded) up to which the backward runs 1-warp programs of
SMALL_STATE_BWD_CHANNELS = 4  # this many channels, under one of these register caps per thread:
SMALL_STATE_BWD_REGISTER_CAPS = (128, 168)  # 16 or 12 resident 1-warp programs per multiprocessor
REGISTERS_PER_MULTIPROCESSOR = 65536
# the second cap is taken when the first leaves the last wave of programs this empty or emptier
MIN_LAST_WAVE_FILL = 0.85
THREADS_PER_WARP = 32
# Triton versions whose TTGIR was read to check the lane flip's tile layout ([1, 8] x [4, 8] lanes)
LANE_FLIP_TRITON = ("3.6.",)

FWD_VARIANTS = ("seq", "state_loop", "tile3d")
BWD_VARIANTS = ("seq", "state_loop", "two_pass")


@dataclass(frozen=True)
class ScanConfig:
    block_n: int
    chunk: int
    fwd_variant: str
    bwd_variant: str
    block_d_fwd: int
    block_d_bwd: int
    warps_fwd: int
    warps_bwd: int
    warps_carry: int
    block_d_carry: int
    pair: int = 1
    maxnreg: int | None = None
    bwd_stages: int = 2
    fwd_stages: int = 2
    adjoint: int = 0
    one_exp: bool = False
    bwd_maxnreg: int | None = None
    reduce_dbc: bool = True
    bc_f32: bool = False
    unmasked_fwd: bool = False
    unmasked_bwd: bool = False
    lane_flip: bool = False
    fwd_end_tile: bool = False
    seq_split: int = 1
    seq_prefetch: bool | None = None
    seq_l1_prefetch: bool = True
    seq_segments: int = 1
    seq_first_pass_parts: int = 1
    approx_log_first_pass: bool = False
    seq_bwd_maxnreg: int | None = None
    seq_bwd_first_pass_maxnreg: int | None = None
    seq_bwd_split: int = SEQ_BWD_SPLIT
    seq_bwd_segments: int = 1
    approx_log: bool = True
    approx_log_fwd: bool = False
    seq_maxnreg: int | None = None
    seq_bwd_bc_ahead: bool = False
    seq_bwd_share: bool = False
    seq_bwd_ghat: bool = False
    seq_bwd_row_strides: bool = False
    states_every: int = 1
    few_rows_min_piece_steps: int = SEQ_MIN_PIECE_STEPS


OVERRIDES_ENV = "ODYSSEY_SCAN_OVERRIDES"


def overrides_from_env(environ=os.environ) -> dict:
    """ScanConfig fields from a JSON object in $ODYSSEY_SCAN_OVERRIDES (empty: none), so that a whole-model
    benchmark can run a configuration picked by the kernel sweep without code changes."""
    text = environ.get(OVERRIDES_ENV, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"${OVERRIDES_ENV} is not valid JSON ({exc}): {text!r}") from exc
    known = set(ScanConfig.__dataclass_fields__) | {"ranges"}
    if not isinstance(value, dict) or set(value) - known:
        raise ValueError(f"${OVERRIDES_ENV} must be a JSON object of ScanConfig fields "
                         f"({', '.join(sorted(known))}), got {text!r}")
    return value


# Bench/tuning hook, e.g. {"fwd_variant": "state_loop", "warps_fwd": 2}; keys are ScanConfig fields.
CONFIG_OVERRIDES: dict = overrides_from_env()


def _largest_pow2_divisor(value: int, cap: int) -> int:
    block = 1
    while block * 2 <= cap and value % (block * 2) == 0:
        block *= 2
    return block


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _wave_fill(programs: int, slots: int) -> float:
    """Mean occupancy of the waves `programs` equal programs take on `slots` concurrent slots."""
    waves = programs / slots
    return waves / math.ceil(waves) if programs else 1.0


def _bwd_register_cap(programs: int, multiprocessors: int) -> int:
    """Register cap of the 1-warp backward programs: the tighter cap (more resident warps, measured
    faster at b32/L2048) unless its last wave runs mostly empty (b8/L16384: 3,072 programs on 132
    multiprocessors fill 1.45 waves of 16 and 1.94 waves of 12; kernels/NOTES.md v7)."""
    tight, loose = SMALL_STATE_BWD_REGISTER_CAPS

    def fill(cap: int) -> float:
        return _wave_fill(programs, multiprocessors * (REGISTERS_PER_MULTIPROCESSOR // (cap * THREADS_PER_WARP)))

    return loose if fill(tight) < MIN_LAST_WAVE_FILL and fill(loose) > fill(tight) else tight


def _max_segments(dense_length: int) -> int:
    """Most pieces of time: SEQ_MAX_SEGMENTS (measured up to 16,384 steps), more for longer sequences while each
    piece keeps SEQ_MIN_PIECE_STEPS (a batch of one 65,536-step sequence has 48 warps of channels: 8 pieces left
    the forward 3 warps a multiprocessor; v20)."""
    return max(SEQ_MAX_SEGMENTS, dense_length // SEQ_MIN_PIECE_STEPS)


def _few_rows_max_segments(rows: int, dense_length: int, multiprocessors: int, min_piece_steps: int) -> int:
    """Most pieces of time where 8 leave too few rows for the sequential kernels: as many as bring the rows to
    their minimum, while each piece keeps `min_piece_steps`; never fewer than `_max_segments`."""
    usual = _max_segments(dense_length)
    needed_rows = SEQ_MIN_WARPS * THREADS_PER_WARP * multiprocessors
    if not dense_length or rows <= 0 or rows * SEQ_MAX_SEGMENTS >= needed_rows:
        return usual
    needed = triton.next_power_of_2(triton.cdiv(needed_rows, rows))
    return max(usual, min(needed, dense_length // min_piece_steps))


def _time_segments(rows: int, dense_length: int, multiprocessors: int, chunk: int, max_segments: int) -> int:
    """Pieces of time for the sequential forward of a dense batch: doubled while its 1-warp programs
    still fit one wave (SEQ_RESIDENT_PROGRAMS a multiprocessor) and every piece keeps two chunks, at
    most SEQ_MAX_SEGMENTS or pieces of SEQ_MIN_PIECE_STEPS (H200, b8/L16384: 1 piece 5.2 ms, 2 6.5, 4 3.6, 8 3.6;
    b32/L2048: 1 piece 0.93 ms, 2 1.69: a second wave costs more than the pieces gain)."""
    programs = triton.cdiv(rows, THREADS_PER_WARP)
    segments = 1
    while (dense_length and segments * 2 <= max_segments
           and programs * segments * 2 <= SEQ_RESIDENT_PROGRAMS * multiprocessors
           and dense_length >= segments * 2 * 2 * chunk):
        segments *= 2
    return segments


def _seq_bwd_segments(rows: int, split: int, dense_length: int, multiprocessors: int, chunk: int,
                      max_segments: int) -> int:
    """Pieces of time for the sequential backward (H200, b8/L16384, f+b: the state loop 14.6 ms; the sequential
    backward in 4 / 8 / 16 pieces 13.3 / 12.8 / 12.6, the last over mamba-ssm's peak memory)."""
    programs = triton.cdiv(rows * split, THREADS_PER_WARP)
    wave = SEQ_RESIDENT_PROGRAMS * multiprocessors
    segments = 1
    if programs >= SEQ_BWD_ONE_PIECE_WAVES * wave:
        return segments
    while (dense_length and segments * 2 <= max_segments
           and programs * segments * 2 <= SEQ_BWD_PIECE_WAVES * wave
           and dense_length >= segments * 2 * 2 * chunk):
        segments *= 2
    return segments


def _first_pass_parts(parts: int, chunk: int) -> int:
    """The forward's first-pass parts a piece: pieces are whole chunks, so parts of whole 8-step blocks need a
    divisor of chunk / SEQ_STEPS."""
    if parts < 1 or (chunk // SEQ_STEPS) % parts:
        raise ValueError(f"seq_first_pass_parts must divide {chunk // SEQ_STEPS} (chunk {chunk} / {SEQ_STEPS}-step "
                         f"blocks); got {parts}")
    return parts


def _default_first_pass_parts(chunk: int, dense_length: int, pieces: int) -> int:
    """SEQ_FIRST_PASS_PARTS (whole 8-step blocks of a chunk), halved while a part would be shorter than
    SEQ_MIN_PART_STEPS: each part pays its program's fixed costs (addresses, A, the first loads, its state)."""
    parts = math.gcd(SEQ_FIRST_PASS_PARTS, chunk // SEQ_STEPS)
    while parts > 1 and dense_length < max(pieces, 1) * parts * SEQ_MIN_PART_STEPS:
        parts //= 2
    return parts


def scan_config(d_state: int, channels_per_group: int, rows: int = 0, multiprocessors: int = 1,
                dense_length: int = 0) -> ScanConfig:
    """Kernel variants and tile sizes for a problem of `rows` = sequences x channels (`dense_length`:
    the length of a dense batch, 0 for per-row lengths or packed sequences); a channel tile never
    straddles two groups of B/C."""
    over = CONFIG_OVERRIDES
    block_n = triton.next_power_of_2(max(d_state, 1))
    # the sequential forward (v10) for d_state <= 16 when its rows (channel rows times pieces of time)
    # keep SEQ_MIN_WARPS warps on every multiprocessor: one channel a thread has no cross-lane work but
    # only its own dependency chain to hide latency with (H200: b32/L2048 forward 1.63 -> 0.93 ms with
    # the L1 prefetch of v11, forward+backward 6.67 -> 5.96; b8/L16384 in 4 pieces 3.9 -> 3.6 ms, in one
    # piece, 2.9 warps per multiprocessor, 5.2)
    chunk = over.get("chunk", CHUNK)
    # where 8 pieces of time leave too few rows for the sequential kernels, shorter pieces may bring them in:
    # `few_rows_min_piece_steps` 512 puts one 16,384-step sequence, which the state loop runs 2.5x slower than
    # mamba-ssm (H200, f+b 6.35 against 2.51 ms), in 32 pieces. Untimed: a SWEEP row of b1_L16384_N16
    # (kernels/NOTES.md 0k); the default keeps v20's 2,048, and batches with more rows are never affected
    # (b4/L16384's backward in 16 pieces was over mamba-ssm's peak memory)
    min_piece_steps = over.get("few_rows_min_piece_steps", SEQ_MIN_PIECE_STEPS)
    max_segments = _few_rows_max_segments(rows, dense_length, multiprocessors, min_piece_steps)
    segments = _time_segments(rows, dense_length, multiprocessors, chunk, max_segments)
    enough_rows = rows * segments >= SEQ_MIN_WARPS * THREADS_PER_WARP * multiprocessors
    fwd_variant = over.get("fwd_variant", "seq" if block_n <= SEQ_STATES and enough_rows else "state_loop")
    if fwd_variant == "seq" and (block_n > SEQ_STATES or chunk % SEQ_STEPS):
        fwd_variant = "state_loop"  # a thread holds all states of its channel: only for small d_state
    # the sequential backward (kernels/NOTES.md v13) after the sequential forward, a channel on 2 lanes (8 states
    # a thread, 168 registers, 12 resident warps): H100, b32/L2048 f+b 6.10 -> 5.58 ms (a channel a thread, 255
    # registers: 6.84); with few rows in pieces of time (v14, H200, b8/L16384: 14.6 -> 12.8 ms in 8 pieces; in
    # one piece, 384 warps, it was 20.1 ms against the state loop's 15.0)
    seq_segments = over.get("seq_segments", segments)
    seq_bwd_split = over.get("seq_bwd_split", SEQ_BWD_SPLIT)
    seq_bwd_fits = fwd_variant == "seq" and channels_per_group % (THREADS_PER_WARP // seq_bwd_split) == 0
    bwd_variant = over.get("bwd_variant", "seq" if seq_bwd_fits else "state_loop")
    if bwd_variant == "seq" and not seq_bwd_fits:
        # it reads the sequential forward's padded states; a program is a warp's channels of one group
        bwd_variant = "state_loop"
    seq_bwd_segments = over.get("seq_bwd_segments", _seq_bwd_segments(rows, seq_bwd_split, dense_length,
                                                                      multiprocessors, chunk, max_segments))
    if fwd_variant not in FWD_VARIANTS or bwd_variant not in BWD_VARIANTS:
        raise ValueError(f"unknown scan variants {fwd_variant!r}, {bwd_variant!r}")
    # 1-warp forward programs of 4 channels for small d_state since v8: the per-state chunk-end
    # store no longer synchronizes 4 warps twice per state index (H200: S1 1.80 -> 1.68 ms, S2 4.10 ->
    # 3.74); measured at d_state 16 only, so larger states keep 16 channels x 4 warps
    small_state_fwd = fwd_variant == "state_loop" and block_n <= SMALL_STATE_FWD
    # 1-warp programs of the sequential forward: a long sequence leaves few channel rows (b8 x 1536: 384
    # warps in all), and small programs spread them over every multiprocessor
    default_fwd_warps = 1 if small_state_fwd or fwd_variant == "seq" else 4
    warps_fwd = over.get("warps_fwd", default_fwd_warps)
    # 1-warp backward programs for small d_state: dB/dC sums stay inside a warp (no cross-warp
    # reduction or barrier per state index; v4: 8 channels x 1 warp 9% faster than 32 x 4). Since v7
    # 4 channels under a register cap (more resident warps); since v8 up to d_state 64 (at 64: backward
    # 38.8 -> 24.0 ms, H200, b32/L2048, against 32 channels x 4 warps). Larger d_state keeps 4-warp tiles.
    small_state = block_n <= SMALL_STATE_BWD and bwd_variant == "state_loop"
    warps_bwd = over.get("warps_bwd", 1 if small_state else 4)
    state_loop_cap = SMALL_STATE_BWD_CHANNELS if small_state else max(1, min(32, BWD_TILE_ELEMENTS // block_n))
    seq_split = over.get("seq_split", 1)
    if fwd_variant == "seq":
        fwd_cap = THREADS_PER_WARP * warps_fwd // seq_split
    elif fwd_variant == "state_loop":
        fwd_cap = SMALL_STATE_FWD_CHANNELS if small_state_fwd else max(1, min(16, BWD_TILE_ELEMENTS // block_n))
    else:
        fwd_cap = max(1, FWD_TILE_ELEMENTS // (block_n * chunk))
    bwd_cap = state_loop_cap if bwd_variant == "state_loop" else max(1, BWD_TILE_ELEMENTS // (block_n * chunk))
    block_d_bwd = _largest_pow2_divisor(channels_per_group, over.get("block_d_bwd", bwd_cap))
    capped = small_state and block_d_bwd == SMALL_STATE_BWD_CHANNELS
    bwd_maxnreg = over.get("bwd_maxnreg", _bwd_register_cap(max(rows, 1) // block_d_bwd, multiprocessors)
                           if capped else None)
    # chunk-start states kept every this many chunks (the state-loop kernels, large d_state): the float32 states
    # every 64 steps put the forward+backward peak above mamba-ssm's at d_state 64 (1,252 against 1,032 MiB at
    # b32/L2048, 384 MiB of them states); the backward recomputes the others, a group of chunks at a time (v19,
    # H200: every 4 chunks 1,001 MiB, f+b 24.65 -> 29.08 ms, 0.76x -> 0.89x mamba-ssm's 32.56; every 2: 1,072 MiB).
    # `states_every: 1` in ODYSSEY_SCAN_OVERRIDES buys the speed back where memory is not short
    both_state_loops = fwd_variant == "state_loop" and bwd_variant == "state_loop"
    states_every = over.get("states_every", STATES_EVERY if both_state_loops and block_n > SEQ_STATES else 1)
    if states_every < 1 or (states_every > 1 and not both_state_loops):
        raise ValueError(f"states_every {states_every}: a positive count, above 1 only with the state-loop forward "
                         f"and backward (got {fwd_variant!r}, {bwd_variant!r})")
    # the sequential backward's per-channel work split between a channel's two lanes, and its adjoint as g-hat
    # (below); in pieces of time the two pay only together with the constant row strides (v16c)
    seq_bwd_share = over.get("seq_bwd_share", True) and seq_bwd_split == 2
    seq_bwd_ghat = over.get("seq_bwd_ghat", seq_bwd_share)
    return ScanConfig(
        block_n=block_n,
        chunk=chunk,
        fwd_variant=fwd_variant,
        bwd_variant=bwd_variant,
        block_d_fwd=_largest_pow2_divisor(channels_per_group, over.get("block_d_fwd", fwd_cap)),
        block_d_bwd=block_d_bwd,
        warps_fwd=warps_fwd,
        warps_bwd=warps_bwd,
        warps_carry=over.get("warps_carry", 4),
        block_d_carry=_largest_pow2_divisor(channels_per_group, max(1, FWD_TILE_ELEMENTS // (block_n * chunk))),
        # two state indices per forward iteration: two independent scans in flight (v7: 1.91 -> 1.81 ms)
        pair=over.get("pair", 2),
        maxnreg=over.get("maxnreg"),
        # software-pipelined state loops (the next state index's loads in flight), H100, b32/L2048/N16
        # (kernels/NOTES.md v5, v6): backward 10.1 -> 9.3 ms f+b, forward 2.14 -> 1.91 ms
        # (the capped 4-channel backward since v8 without: its buffers cost spills under the cap;
        # S1 backward 6.68 -> 5.89 ms, kernels/NOTES.md v8)
        bwd_stages=over.get("bwd_stages", 1 if capped else 2),
        fwd_stages=over.get("fwd_stages", 2),
        # the adjoint scan as a forward scan between explicit flips along time: Triton 3.6 lowers
        # reverse=True to whole-warp lane reversals (5 shuffles per element and flip), tl.flip along
        # time needs 3 (H200, b32/L2048/N16: f+b 8.83 -> 8.02 ms); with 4-channel programs, the
        # chunk's tiles flipped once per chunk and only C and the result per state index (adjoint 3:
        # 7.83 ms, and 17.0 vs 20.2 ms at b8/L16384; kernels/NOTES.md v7)
        # (adjoint 5, the same with the source C_n dy flipped as one tile: no reversed dy tile live
        # through the state loop; with the lane flip below, H200 v9: S1 f+b 7.58 -> 6.72 ms, S2
        # 16.28 -> 14.74, N 64 27.9 -> 24.7; kernels/NOTES.md v9)
        adjoint=over.get("adjoint", 5 if capped else 1),
        one_exp=over.get("one_exp", False),
        bwd_maxnreg=bwd_maxnreg,
        reduce_dbc=over.get("reduce_dbc", True),
        # the backward reads B and C converted to float32 once per call (bf16 costs ~1.5 conversion
        # instructions a value per state index); the forward keeps them as they come: its pipelined
        # loads of float32 rows went through shared memory as scalars (v8: 1.80 -> 2.16 ms at S1)
        bc_f32=over.get("bc_f32", True),
        # per-state loads without masks (and their zero fill) where every (channel, step) is in range;
        # with bc_f32 and an unpipelined backward state loop (v8, H200: S1 backward 6.03 -> 5.89 ms,
        # S2 12.93 -> 12.52)
        unmasked_fwd=over.get("unmasked_fwd", False),
        unmasked_bwd=over.get("unmasked_bwd", True),
        # flips along time as one lane shuffle (inline PTX, GPU only, 16-bit inputs; see _lane_flip_safe)
        lane_flip=over.get("lane_flip", True),
        # the forward's chunk-end states gathered in a register tile and stored once per chunk
        # instead of once per state index through a shared-memory layout conversion (untimed)
        fwd_end_tile=over.get("fwd_end_tile", False),
        # lanes per channel of the sequential forward (1, 2, 4): more threads for few channel rows
        seq_split=seq_split,
        # the next 8-step block's u and delta loaded while this one computes (register prefetch); None:
        # when no chunk states are stored (H200, b32/L2048: no_grad forward 1.58 -> 1.46 ms, but
        # forward+backward 6.17 -> 6.65; v14, 5.02 against 4.97) or time is cut into pieces (v14, H200,
        # b8/L16384 f+b 12.89 -> 12.36 ms)
        seq_prefetch=over.get("seq_prefetch"),
        # the next block's B and C rows prefetched into L1 (PTX prefetch; ncu, S1: 43% of stalls waited
        # on L1 misses, 41% L1 hit rate: each 128-byte line holds two steps of B or C)
        seq_l1_prefetch=over.get("seq_l1_prefetch", True),
        # time cut into this many pieces, a program each, for dense batches with few channel rows
        seq_segments=seq_segments,
        # the forward's first pass (each piece's end state from zero) in this many parts a piece, a program each:
        # it runs in 96 registers against the second pass's 134, so more programs still fit one wave, and it is
        # latency-bound like the second (v18, H200, medians of 3 alternating rounds: b8/L16384 forward 1 / 2 / 4 / 8
        # parts 3.61 / 3.38 / 3.31 / 3.23 ms, f+b 12.16 -> 11.74 with 8; b4/L16384 1 / 4 parts 1.81 / 1.72)
        seq_first_pass_parts=_first_pass_parts(over.get("seq_first_pass_parts",
                                                        _default_first_pass_parts(chunk, dense_length, seq_segments)),
                                               chunk),
        # softplus's lg2.approx in that first pass alone (local compile: 910 -> 744 instructions a block, the same 96
        # registers, unlike the second pass, where approx_log_fwd lost registers and latency hiding; v18: b8/L16384
        # forward 3.31 -> 3.28 ms with 4 parts, 3.23 -> 3.20 with 8)
        approx_log_first_pass=over.get("approx_log_first_pass", True),
        seq_bwd_maxnreg=over.get("seq_bwd_maxnreg", 168 if seq_bwd_ghat else None),
        # a register cap of the backward's first pass over pieces of time (the adjoint alone) of its own; None: the
        # second pass's. Local compile: 116 registers under the 168 cap (17 resident warps a multiprocessor; b4/L16384
        # runs 2,688 of its programs, S2 5,376), 64 without spills and +2% instructions (32 warps). v18, H200: 64 and 80
        # no faster (b8/L16384 f+b 12.22 -> 12.15 / 12.15 ms, within spread; b4/L16384 6.20 -> 6.30 at 64)
        seq_bwd_first_pass_maxnreg=over.get("seq_bwd_first_pass_maxnreg"),
        # lanes per channel of the sequential backward (1 or 2: 16 or 8 states a thread)
        seq_bwd_split=seq_bwd_split,
        # time pieces of the sequential backward (dense batches with few rows; _seq_bwd_segments)
        seq_bwd_segments=seq_bwd_segments,
        # softplus's logarithm as one lg2.approx instead of libdevice's polynomial (GPU only), in the backward
        # kernels (approx_log) and the forward ones (approx_log_fwd). H200, ncu at b32/L2048: the sequential
        # backward 4.14 -> 4.06 ms (2.34 -> 2.08 G instructions), but the sequential forward under gradients
        # 0.90 -> 1.15 ms with 14% fewer instructions (long-scoreboard stalls per instruction 2.2 -> 4.6;
        # 110 registers instead of 136); kernels/NOTES.md v14
        approx_log=over.get("approx_log", True),
        approx_log_fwd=over.get("approx_log_fwd", False),
        # a register cap for the sequential forward (136 registers, 12 resident warps; 110 with approx_log_fwd; a
        # cap of 96, 20 warps: S1 forward 0.90 -> 1.24 ms, v14)
        seq_maxnreg=over.get("seq_maxnreg"),
        # the sequential backward's adjoint steps read the next step's B and C rows a step ahead, before this
        # step's math and its dB/dC atomic add (same 168 registers in the local compile); in one piece of time
        # only (v14e, H200, f+b: b32/L2048 5.05 -> 4.87 ms; b8/L16384 in 8 pieces 12.53 -> 12.73)
        seq_bwd_bc_ahead=over.get("seq_bwd_bc_ahead", seq_bwd_segments == 1),
        # with a channel on two lanes, each lane does the per-channel work (softplus, the gate, the outputs) of two
        # of a block's four steps and the lanes exchange the results, instead of both doing all four (v16, H200, f+b:
        # b32/L2048 4.88 -> 4.68 ms; b8/L16384 in 8 pieces of time alone 12.53 -> 12.63, with g-hat and the constant
        # row strides 12.52 -> 12.32, v16c)
        seq_bwd_share=seq_bwd_share,
        # the adjoint carried as g-hat = decay * g, so that g decay h_{t-1} is g-hat h_{t-1} (one instruction an
        # element-state less; the block's first state stays live: 246 registers uncapped, 168 without spills when
        # capped, which seq_bwd_maxnreg then defaults to). Local compile: reverse loop 975 -> 944. With the shared
        # per-channel work only (timed there: v16, H200, S1 f+b 4.70 -> 4.60 ms; v16c 4.76 -> 4.65)
        seq_bwd_ghat=seq_bwd_ghat,
        # the B / C rows' and dB / dC rows' time strides as compile-time constants (they are 16 and 32 floats as
        # allocated), so that a step's row offsets are immediates of the loads: local compile of the S1 default,
        # reverse loop 944 -> 894 and chunk pass 233 -> 207 instructions a block, same 168 registers. H200 (v16c,
        # medians of 3 alternating rounds): b32/L2048 4.653 -> 4.655 ms (even), b8/L16384 in 8 pieces with the
        # shared work and g-hat 12.43 -> 12.32
        seq_bwd_row_strides=over.get("seq_bwd_row_strides", True),
        states_every=states_every,
        few_rows_min_piece_steps=min_piece_steps,
    )


def _ranges_per_group(channels_per_group: int, block_d: int, chunk_programs: int) -> int:
    """How many programs split one group's channels in the backward chunk kernel (fewest that fill the GPU)."""
    if "ranges" in CONFIG_OVERRIDES:
        wanted = CONFIG_OVERRIDES["ranges"]
    else:
        wanted = max(1, -(-BWD_TARGET_PROGRAMS // max(chunk_programs, 1)))
    tiles = channels_per_group // block_d
    ranges = 1
    for candidate in range(1, tiles + 1):
        if tiles % candidate == 0:
            ranges = candidate
            if candidate >= wanted:
                break
    return ranges


def _check_device(*tensors: torch.Tensor) -> None:
    interpreting = _interpreting()
    for tensor in tensors:
        if not tensor.is_cuda and not interpreting:
            raise ValueError(
                "the triton scan backend needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
            )


def _as_grouped(BC: torch.Tensor, name: str, batch: int, length: int) -> torch.Tensor:
    if BC.dim() == 3:
        BC = BC.unsqueeze(1)
    if BC.dim() != 4 or BC.shape[0] != batch or BC.shape[-1] != length:
        raise ValueError(f"{name} must be (batch, N, L) or (batch, G, N, L) with batch {batch} and L {length}, "
                         f"got {tuple(BC.shape)}")
    return BC


def _validate(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported by the triton backend")
    d_state = A.shape[1]
    if not 1 <= d_state <= MAX_D_STATE:
        raise ValueError(f"d_state must be in [1, {MAX_D_STATE}], got {d_state}")
    B4 = _as_grouped(B, "B", batch, length)
    C4 = _as_grouped(C, "C", batch, length)
    for name, BC in (("B", B4), ("C", C4)):
        if BC.shape[2] != d_state:
            raise ValueError(f"{name} has d_state {BC.shape[2]} but A has {d_state}")
        if dim % BC.shape[1]:
            raise ValueError(f"dim {dim} is not divisible by {name}'s number of groups {BC.shape[1]}")
    if B4.shape[1] != C4.shape[1]:
        raise ValueError(f"B and C must have the same number of groups, got {B4.shape[1]} and {C4.shape[1]}")
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and vec.shape != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got {tuple(vec.shape)}")
    _check_device(*(t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None))
    return B4, C4


@dataclass(frozen=True)
class _Sequences:
    """Per-sequence (batch row, first time step, length) on the device, and the longest length."""

    batch_row: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    max_len: int
    dense: bool

    @property
    def count(self) -> int:
        return self.batch_row.numel()


def _dense_sequences(batch: int, length: int, device) -> _Sequences:
    rows = torch.arange(batch, device=device, dtype=torch.int32)
    return _Sequences(rows, torch.zeros_like(rows), torch.full_like(rows, length), length, True)


def _varlen_sequences(batch, length, device, seq_lens, cu_seqlens, max_seqlen) -> _Sequences:
    if (seq_lens is None) == (cu_seqlens is None):
        raise ValueError("give exactly one of seq_lens (per-row lengths) and cu_seqlens (packed sequences)")
    if seq_lens is not None:
        if seq_lens.dim() != 1 or seq_lens.numel() != batch:
            raise ValueError(f"seq_lens must be (batch={batch},), got {tuple(seq_lens.shape)}")
        lengths = seq_lens.to(device=device, dtype=torch.int32)
        rows = torch.arange(batch, device=device, dtype=torch.int32)
        starts = torch.zeros_like(rows)
    else:
        if batch != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch 1, got batch {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be (n_sequences + 1,), got {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        starts = cu[:-1].contiguous()
        lengths = (cu[1:] - cu[:-1]).contiguous()
        rows = torch.zeros_like(starts)
        if bool((starts < 0).any()) or int(cu[-1]) > length:
            raise ValueError(f"cu_seqlens must lie in [0, L={length}], got {cu_seqlens.tolist()}")
    if bool((lengths < 0).any()) or bool((starts + lengths > length).any()):
        raise ValueError(f"sequence lengths must lie in [0, L={length}]")
    max_len = int(lengths.max()) if max_seqlen is None else int(max_seqlen)
    return _Sequences(rows, starts, lengths, max_len, False)


def _full_tiles(seqs: _Sequences, dim: int, block_d: int, chunk: int, d_state: int, pair: int = 1) -> bool:
    """Every tile a program loads in its state loop lies inside the tensors: a dense batch whose
    length fills whole chunks, channel tiles that divide dim, state indices that fill whole pairs."""
    return seqs.dense and seqs.max_len % chunk == 0 and dim % block_d == 0 and d_state % pair == 0


def _interpreting() -> bool:
    """Kernels run under the Triton interpreter, which has no inline assembly."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _lane_flip_safe(cfg: ScanConfig, *tiles: torch.Tensor | None) -> bool:
    """The lane-shuffle flip assumes the layout Triton gives 1-warp (4, 64) tiles read with 16-byte
    loads: 8 steps per thread on lanes 0-7 of each channel's group. That needs 16-bit values (float32
    rows come 4 steps per thread: wrong gradients, H200 v9), time-contiguous, 16-byte aligned rows,
    compiled code (the interpreter has no inline assembly) and a Triton whose layouts were read
    (LANE_FLIP_TRITON; kernels/NOTES.md v8)."""
    if _interpreting() or not triton.__version__.startswith(LANE_FLIP_TRITON):
        return False
    if cfg.warps_bwd != 1 or cfg.chunk != 64:
        return False
    if cfg.block_d_bwd != SMALL_STATE_BWD_CHANNELS or cfg.adjoint not in (3, 5):
        return False
    for t in tiles:
        if t is None:
            continue
        # Triton vectorises a row's loads only when it can prove the row starts 16-byte aligned: from
        # strides it specialised as divisible by 16 (elements), never from a multiple of 8
        if t.element_size() != 2 or t.stride(2) != 1 or t.data_ptr() % 16 or t.stride(0) % 16 or t.stride(1) % 16:
            return False
    return True


def _approx_log(cfg: ScanConfig, forward: bool = False) -> bool:
    """Whether a kernel's softplus takes lg2.approx (inline PTX: not under the interpreter)."""
    return (cfg.approx_log_fwd if forward else cfg.approx_log) and not _interpreting()


def _strides3(t: torch.Tensor | None):
    return (0, 0, 0) if t is None else tuple(t.stride())


def _forward(u, delta, A, B4, C4, D, z, delta_bias, softplus, seqs: _Sequences, store_states: bool):
    batch, dim, length = u.shape
    d_state = A.shape[1]
    groups = B4.shape[1]
    cpg = dim // groups
    cfg = scan_config(d_state, cpg, rows=seqs.count * dim, multiprocessors=_multiprocessors(u.device),
                      dense_length=seqs.max_len if seqs.dense else 0)
    n_chunks = max(1, triton.cdiv(seqs.max_len, cfg.chunk))
    if cfg.fwd_variant == "seq":
        out, last, states = _forward_seq(u, delta, A, B4, C4, D, z, delta_bias, softplus, seqs, store_states,
                                         cfg, n_chunks)
        return out, last, states, cfg
    out = torch.empty_like(u) if seqs.dense else torch.zeros_like(u)
    # without store_states (nothing to differentiate) the state-loop forward still carries its
    # chunk-end states through memory, in two slots used in turn: O(dim x N), not O(chunks x dim x N)
    # with store_states, every cfg.states_every-th chunk's start (the backward recomputes the rest), then the
    # scratch slots of one group (`_state_slot`)
    every = cfg.states_every
    kept = triton.cdiv(n_chunks, every)
    states = torch.empty(seqs.count, kept + every - 1 if store_states else 2, dim, d_state,
                         device=u.device, dtype=torch.float32)
    last = torch.empty(seqs.count, dim, d_state, device=u.device, dtype=torch.float32)
    grid = (triton.cdiv(dim, cfg.block_d_fwd), seqs.count)
    kernel = {"state_loop": _fwd_state_loop_kernel, "tile3d": _scan_fwd_kernel}
    extra = {"APPROX_LOG": _approx_log(cfg, forward=True)}
    if cfg.fwd_variant == "state_loop":
        full = cfg.unmasked_fwd and _full_tiles(seqs, dim, cfg.block_d_fwd, cfg.chunk, d_state, cfg.pair)
        extra.update(PAIR=cfg.pair, STAGES=cfg.fwd_stages, FULL=full, END_TILE=cfg.fwd_end_tile,
                     SAVE_EVERY=every if store_states else 1, scratch0=kept)
    if cfg.maxnreg:
        extra["maxnreg"] = cfg.maxnreg
    kernel[cfg.fwd_variant][grid](
        u, delta, A, B4, C4, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, out, states, last,
        seqs.batch_row, seqs.start, seqs.length, seqs.max_len,
        dim, d_state, cpg,
        *u.stride(), *delta.stride(), *A.stride(), *B4.stride(), *C4.stride(),
        *_strides3(z), *out.stride(), *states.stride(), *last.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, VARLEN=not seqs.dense,
        STORE_STATES=store_states, STORE_LAST=True,
        BLOCK_D=cfg.block_d_fwd, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk, num_warps=cfg.warps_fwd, **extra,
    )
    return out, last, states, cfg


def _time_major_rows(X4: torch.Tensor, steps: int) -> torch.Tensor:
    """(batch, groups, N, L) -> (batch, groups, steps, SEQ_STATES) float32, zero-padded in N and time."""
    batch, groups, d_state, length = X4.shape
    rows = X4.new_zeros(batch, groups, steps, SEQ_STATES, dtype=torch.float32)
    rows[:, :, :length, :d_state] = X4.transpose(-1, -2)
    return rows


def _padded_A2(A: torch.Tensor) -> torch.Tensor:
    """A * log2(e) as (dim, SEQ_STATES) float32, zero-padded: the sequential kernels' exp2 argument rows."""
    A2 = torch.zeros(A.shape[0], SEQ_STATES, device=A.device, dtype=torch.float32)
    A2[:, :A.shape[1]] = A.float() * math.log2(math.e)
    return A2


def _time_pieces(seqs: _Sequences, length: int, pieces: int, chunk: int, A2: torch.Tensor, parts: int = 1):
    """Time cut into `pieces` of whole chunks for a sequential kernel (dense batches only): (pieces,
    piece length, a (sequences, pieces x parts, dim, SEQ_STATES) buffer of per-piece (or per-part) states, a
    (sequences, pieces x parts, dim) buffer of their sums). One piece: no buffers, A2 stands in (never read)."""
    if not seqs.dense or pieces <= 1:
        stand_in = A2.view(1, 1, *A2.shape)
        return 1, length, stand_in, stand_in
    piece_length = triton.cdiv(triton.cdiv(length, pieces), chunk) * chunk
    pieces = triton.cdiv(length, piece_length)
    dim = A2.shape[0]
    states = torch.empty(seqs.count, pieces * parts, dim, SEQ_STATES, device=A2.device, dtype=torch.float32)
    sums = torch.empty(seqs.count, pieces * parts, dim, device=A2.device, dtype=torch.float32)
    return pieces, piece_length, states, sums


def _forward_seq(u, delta, A, B4, C4, D, z, delta_bias, softplus, seqs: _Sequences, store_states: bool,
                 cfg: ScanConfig, n_chunks: int):
    """The sequential forward: states padded to SEQ_STATES in its buffers, handed back as views of
    d_state columns (the backward reads them through strides)."""
    batch, dim, length = u.shape
    d_state = A.shape[1]
    out = torch.empty_like(u) if seqs.dense else torch.zeros_like(u)
    states = torch.empty(seqs.count, n_chunks if store_states else 0, dim, SEQ_STATES,
                         device=u.device, dtype=torch.float32)
    last = torch.empty(seqs.count, dim, SEQ_STATES, device=u.device, dtype=torch.float32)
    A2 = _padded_A2(A)
    # every 8-step block reads whole rows: pad time past the last block of the latest sequence
    steps = length + SEQ_STEPS
    BT, CT = _time_major_rows(B4, steps), _time_major_rows(C4, steps)
    # each piece's (or each part of it's) end state from zero and its sum of delta, for the pieces after it
    segments, segment_length, part, dtsum = _time_pieces(seqs, length, cfg.seq_segments, cfg.chunk, A2,
                                                         cfg.seq_first_pass_parts)
    parts = cfg.seq_first_pass_parts if segments > 1 else 1
    prefetch = (not store_states or segments > 1) if cfg.seq_prefetch is None else cfg.seq_prefetch
    common = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                  VARLEN=not seqs.dense, BLOCK_D=cfg.block_d_fwd, CHUNK=cfg.chunk, SPLIT=cfg.seq_split,
                  PREFETCH=prefetch, PREFETCH_L1=cfg.seq_l1_prefetch and not _interpreting(),
                  num_warps=cfg.warps_fwd,
                  **({"maxnreg": cfg.seq_maxnreg} if cfg.seq_maxnreg else {}))
    for phase in (1, 2) if segments > 1 else (2,):
        first = phase == 1
        programs = segments * parts if first else segments  # the first pass: a program a part
        approx_log = _approx_log(cfg, forward=True) or (first and cfg.approx_log_first_pass and not _interpreting())
        _fwd_seq_kernel[(triton.cdiv(dim, cfg.block_d_fwd), seqs.count * programs)](
            u, delta, A2, BT, CT, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, out, states, last,
            seqs.batch_row, seqs.start, seqs.length, seqs.max_len, dim, dim // B4.shape[1],
            part, dtsum, segment_length // parts if first else segment_length, part.stride(0), part.stride(1),
            part.stride(2), dtsum.stride(0), dtsum.stride(1),
            *u.stride(), *delta.stride(), BT.stride(0), BT.stride(1), BT.stride(2),
            *_strides3(z), *out.stride(), states.stride(0), states.stride(1), states.stride(2),
            last.stride(0), last.stride(1),
            STORE_STATES=store_states and not first, STORE_LAST=not first, PHASE=phase, SEGMENTS=programs, PARTS=parts,
            APPROX_LOG=approx_log, **common,
        )
    return out, last[..., :d_state], states[..., :d_state]


def _backward(ctx, dout, dlast):
    u, delta, A, B4, C4, D, z, delta_bias, states, seq_batch, seq_start, seq_len = ctx.saved_tensors
    if not ctx.has_D:
        D = None
    if not ctx.has_z:
        z = None
    if not ctx.has_bias:
        delta_bias = None
    seqs = _Sequences(seq_batch, seq_start, seq_len, ctx.max_len, ctx.dense)
    batch, dim, length = u.shape
    d_state = A.shape[1]
    groups = B4.shape[1]
    cpg = dim // groups
    cfg = ctx.cfg
    n_chunks = states.shape[1]
    if dout is None:
        dout = torch.zeros_like(u)

    alloc = torch.empty_like if seqs.dense else torch.zeros_like
    du = alloc(u)
    ddelta = alloc(delta)
    dz = alloc(z) if z is not None else None
    dD = torch.zeros(dim, device=u.device, dtype=torch.float32) if D is not None else None
    dbias = torch.zeros(dim, device=u.device, dtype=torch.float32) if delta_bias is not None else None
    if cfg.bwd_variant == "seq":  # its own padded dA and time-major dB/dC buffers
        return _backward_seq(u, delta, A, B4, C4, D, z, delta_bias, ctx.softplus, seqs, states, dout, dlast,
                             du, ddelta, dz, dD, dbias, cfg)
    dA = torch.zeros(dim, d_state, device=u.device, dtype=torch.float32)
    dB = torch.zeros(B4.shape, device=u.device, dtype=torch.float32)
    dC = torch.zeros(C4.shape, device=u.device, dtype=torch.float32)
    dummy = dA
    if cfg.bwd_variant == "state_loop":
        if cfg.bc_f32:  # no copy when they already are float32; dB, dC are float32 either way
            B4, C4 = B4.float(), C4.float()
        carry = torch.empty(seqs.count, 2, dim, d_state, device=u.device, dtype=torch.float32)
        C_rev = C4.flip(-1).contiguous() if cfg.adjoint == 4 else C4
        _bwd_state_loop_kernel[(triton.cdiv(dim, cfg.block_d_bwd), seqs.count)](
            u, delta, A, B4, C4, D if D is not None else dummy, z if z is not None else u,
            delta_bias if delta_bias is not None else dummy, dout, states,
            dlast if dlast is not None else states, carry,
            du, ddelta, dz if dz is not None else du, dA, dB, dC,
            dD if dD is not None else dummy, dbias if dbias is not None else dummy,
            seqs.batch_row, seqs.start, seqs.length, seqs.max_len,
            dim, d_state, cpg,
            *u.stride(), *delta.stride(), *A.stride(), *B4.stride(), *C4.stride(),
            *_strides3(z), *dout.stride(), *states.stride(),
            *(dlast.stride() if dlast is not None else (0, 0, 0)), *carry.stride(),
            *du.stride(), *ddelta.stride(), *_strides3(dz), *dB.stride(), *dC.stride(),
            C_rev, *C_rev.stride(), length,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus, VARLEN=not seqs.dense,
            HAS_DLAST=dlast is not None, STAGES=cfg.bwd_stages, APPROX_LOG=_approx_log(cfg),
            # `states` holds the kept states, then the states_every - 1 scratch slots (_forward)
            SAVE_EVERY=cfg.states_every, scratch0=n_chunks - (cfg.states_every - 1),
            ADJOINT=cfg.adjoint, ONE_EXP=cfg.one_exp, REDUCE_DBC=cfg.reduce_dbc,
            LANE_FLIP=cfg.lane_flip and _lane_flip_safe(cfg, u, delta, z, dout, du, ddelta, dz),
            FULL=cfg.unmasked_bwd and _full_tiles(seqs, dim, cfg.block_d_bwd, cfg.chunk, d_state),
            BLOCK_D=cfg.block_d_bwd, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk, num_warps=cfg.warps_bwd,
            **({"maxnreg": cfg.bwd_maxnreg or cfg.maxnreg} if (cfg.bwd_maxnreg or cfg.maxnreg) else {}),
        )
        return du, ddelta, dA, dB, dC, dD, dz, dbias

    # the chunk kernel reads states and gstates with one set of strides (states may be a padded view)
    gstates = torch.empty_strided(states.shape, states.stride(), device=states.device, dtype=states.dtype)
    grid_carry = (triton.cdiv(dim, cfg.block_d_carry), seqs.count)
    _bwd_carry_kernel[grid_carry](
        dout, delta, A, C4, z if z is not None else u, delta_bias if delta_bias is not None else u,
        dlast if dlast is not None else states, gstates,
        seqs.batch_row, seqs.start, seqs.length, seqs.max_len,
        dim, d_state, cpg,
        *dout.stride(), *delta.stride(), *A.stride(), *C4.stride(), *_strides3(z),
        *gstates.stride(), *(dlast.stride() if dlast is not None else (0, 0, 0)),
        HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus, VARLEN=not seqs.dense,
        HAS_DLAST=dlast is not None, APPROX_LOG=_approx_log(cfg),
        BLOCK_D=cfg.block_d_carry, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk, num_warps=cfg.warps_carry,
    )

    ranges = _ranges_per_group(cpg, cfg.block_d_bwd, n_chunks * seqs.count * groups)
    grid = (n_chunks, seqs.count, groups * ranges)
    _bwd_chunk_kernel[grid](
        u, delta, A, B4, C4, D if D is not None else dummy, z if z is not None else u,
        delta_bias if delta_bias is not None else dummy, dout, states, gstates,
        du, ddelta, dz if dz is not None else du, dA, dB, dC,
        dD if dD is not None else dummy, dbias if dbias is not None else dummy,
        seqs.batch_row, seqs.start, seqs.length, seqs.max_len,
        dim, d_state, cpg, cpg // ranges,
        *u.stride(), *delta.stride(), *A.stride(), *B4.stride(), *C4.stride(),
        *_strides3(z), *dout.stride(), *states.stride(),
        *du.stride(), *ddelta.stride(), *_strides3(dz), *dB.stride(), *dC.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus, VARLEN=not seqs.dense,
        BLOCK_D=cfg.block_d_bwd, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk, APPROX_LOG=_approx_log(cfg),
        num_warps=cfg.warps_bwd,
    )
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def _backward_seq(u, delta, A, B4, C4, D, z, delta_bias, softplus, seqs: _Sequences, states, dout, dlast,
                  du, ddelta, dz, dD, dbias, cfg: ScanConfig):
    """The sequential backward: reads the sequential forward's padded states, sums dA in (dim, 16) and
    dB, dC in one time-major (batch, groups, steps, 32) buffer, handed back as (batch, groups, N, L)."""
    batch, dim, length = u.shape
    d_state = A.shape[1]
    groups = B4.shape[1]
    count = seqs.count
    padded = states.as_strided((*states.shape[:3], SEQ_STATES), states.stride())
    A2 = _padded_A2(A)
    steps = length + SEQ_STEPS
    BT, CT = _time_major_rows(B4, steps), _time_major_rows(C4, steps)
    if dlast is not None:
        dlast16 = torch.zeros(count, dim, SEQ_STATES, device=u.device, dtype=torch.float32)
        dlast16[..., :d_state] = dlast
    else:
        dlast16 = A2.view(1, dim, SEQ_STATES)
    # each piece's g at its start from zero, and its carry exponent
    segments, segment_length, part, usum = _time_pieces(seqs, length, cfg.seq_bwd_segments, cfg.chunk, A2)
    ckpt = torch.empty(count * segments, cfg.chunk // BWD_BLOCK.value, dim, SEQ_STATES, device=u.device,
                       dtype=torch.float32)
    dA16 = torch.zeros(dim, SEQ_STATES, device=u.device, dtype=torch.float32)
    dBC = torch.zeros(batch, groups, steps, 2 * SEQ_STATES, device=u.device, dtype=torch.float32)
    grid = (triton.cdiv(dim, THREADS_PER_WARP // cfg.seq_bwd_split), count * segments)
    if cfg.seq_bwd_row_strides and (BT.stride(2), dBC.stride(2)) != (SEQ_STATES, 2 * SEQ_STATES):
        raise AssertionError(f"row strides {BT.stride(2)}, {dBC.stride(2)} are not the kernel's constants")
    for phase in (1, 2) if segments > 1 else (2,):
        maxnreg = (phase == 1 and cfg.seq_bwd_first_pass_maxnreg) or cfg.seq_bwd_maxnreg
        _bwd_seq_kernel[grid](
            u, delta, A2, BT, CT, D if D is not None else A2, z if z is not None else u,
            delta_bias if delta_bias is not None else A2, dout, padded, dlast16, ckpt,
            du, ddelta, dz if dz is not None else du, dA16, dBC,
            dD if dD is not None else A2, dbias if dbias is not None else A2,
            seqs.batch_row, seqs.start, seqs.length, seqs.max_len, dim, dim // groups,
            part, usum, segment_length, part.stride(0), part.stride(1), part.stride(2), usum.stride(0),
            usum.stride(1),
            *u.stride(), *delta.stride(), BT.stride(0), BT.stride(1), BT.stride(2),
            *_strides3(z), *dout.stride(), padded.stride(0), padded.stride(1), padded.stride(2),
            dlast16.stride(0), dlast16.stride(1), ckpt.stride(0), ckpt.stride(1), ckpt.stride(2),
            *du.stride(), *ddelta.stride(), *_strides3(dz), dBC.stride(0), dBC.stride(1), dBC.stride(2),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            VARLEN=not seqs.dense, HAS_DLAST=dlast is not None, CHUNK=cfg.chunk, LANE_ASM=not _interpreting(),
            SPLIT=cfg.seq_bwd_split, SEGMENTS=segments, PHASE=phase, APPROX_LOG=_approx_log(cfg),
            BC_AHEAD=cfg.seq_bwd_bc_ahead, SHARE=cfg.seq_bwd_share, GHAT=cfg.seq_bwd_ghat,
            ROW_STRIDES=cfg.seq_bwd_row_strides, num_warps=1, **({"maxnreg": maxnreg} if maxnreg else {}),
        )
    dB = dBC[:, :, :length, :d_state].transpose(-1, -2)
    dC = dBC[:, :, :length, SEQ_STATES:SEQ_STATES + d_state].transpose(-1, -2)
    return du, ddelta, dA16[:, :d_state].contiguous(), dB, dC, dD, dz, dbias


def _differentiated(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want a backward: grad mode on (read by the caller: inside Function.forward it
    is always off) and an input that requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper: the forward keeps the states at chunk starts, the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, seqs: _Sequences, store_states: bool):
        B4 = _as_grouped(B, "B", u.shape[0], u.shape[2])
        C4 = _as_grouped(C, "C", u.shape[0], u.shape[2])
        out, last, states, ctx.cfg = _forward(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, seqs,
                                              store_states=store_states)
        ctx.softplus = bool(delta_softplus)
        ctx.has_D, ctx.has_z, ctx.has_bias = D is not None, z is not None, delta_bias is not None
        ctx.max_len, ctx.dense = seqs.max_len, seqs.dense
        ctx.B_dim, ctx.C_dim = B.dim(), C.dim()
        placeholder = states.new_empty(0)
        ctx.save_for_backward(
            u, delta, A, B4, C4,
            D if D is not None else placeholder, z if z is not None else placeholder,
            delta_bias if delta_bias is not None else placeholder,
            states, seqs.batch_row, seqs.start, seqs.length,
        )
        ctx.input_dtypes = tuple(None if t is None else t.dtype for t in (A, B, C, D, delta_bias))
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        du, ddelta, dA, dB, dC, dD, dz, dbias = _backward(ctx, dout, dlast)
        A_dtype, B_dtype, C_dtype, D_dtype, bias_dtype = ctx.input_dtypes
        if ctx.B_dim == 3:
            dB = dB.squeeze(1)
        if ctx.C_dim == 3:
            dC = dC.squeeze(1)
        return (
            du, ddelta, dA.to(A_dtype), dB.to(B_dtype), dC.to(C_dtype),
            None if dD is None else dD.to(D_dtype), dz,
            None if dbias is None else dbias.to(bias_dtype), None, None, None,
        )


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """mamba-ssm `selective_scan_fn` semantics; returns out, or (out, last_state float32 (batch, dim, N))."""
    _validate(u, delta, A, B, C, D, z, delta_bias)
    seqs = _dense_sequences(u.shape[0], u.shape[2], u.device)
    out, last = SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seqs,
                                          _differentiated(u, delta, A, B, C, D, z, delta_bias))
    return (out, last) if return_last_state else out


def selective_scan_varlen_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                 return_last_state=False, *, seq_lens=None, cu_seqlens=None, max_seqlen=None):
    """Variable-length scan: each sequence starts from a zero state and padding costs no compute.

    Either `seq_lens` (batch,): row b holds one sequence in [0, seq_lens[b]); outputs and gradients past
    it are 0. Or `cu_seqlens` (n_seq + 1,) with batch 1: sequence i occupies [cu[i], cu[i+1]) of the
    time axis. `last_state` is (n_seq, dim, N): each sequence's state after its last step.
    `max_seqlen` (the longest length) avoids a device-to-host read when given.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias)
    seqs = _varlen_sequences(u.shape[0], u.shape[2], u.device, seq_lens, cu_seqlens, max_seqlen)
    out, last = SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seqs,
                                          _differentiated(u, delta, A, B, C, D, z, delta_bias))
    return (out, last) if return_last_state else out


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step: state <- exp(dt A) state + dt B x (in place); returns y = C.state + D x, gated by silu(z).

    state (batch, dim, N); x, dt, z (batch, dim); A (dim, N); B, C (batch, N) or (batch, G, N).
    """
    if state.dim() != 3:
        raise ValueError(f"state must be (batch, dim, N), got {tuple(state.shape)}")
    batch, dim, d_state = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and t.shape != (batch, dim):
            raise ValueError(f"{name} must be (batch={batch}, dim={dim}), got {tuple(t.shape)}")
    if A.shape != (dim, d_state):
        raise ValueError(f"A must be ({dim}, {d_state}), got {tuple(A.shape)}")
    B3 = B.unsqueeze(1) if B.dim() == 2 else B
    C3 = C.unsqueeze(1) if C.dim() == 2 else C
    for name, BC in (("B", B3), ("C", C3)):
        if BC.dim() != 3 or BC.shape[0] != batch or BC.shape[2] != d_state or dim % BC.shape[1]:
            raise ValueError(f"{name} must be (batch, N) or (batch, G, N) with G dividing dim, got {tuple(BC.shape)}")
    for name, vec in (("D", D), ("dt_bias", dt_bias)):
        if vec is not None and vec.shape != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got {tuple(vec.shape)}")
    _check_device(*(t for t in (state, x, dt, A, B, C, D, z, dt_bias) if t is not None))
    out = torch.empty_like(x)
    block_n = triton.next_power_of_2(d_state)
    block_d = max(1, min(64, 4096 // block_n))
    grid = (triton.cdiv(dim, block_d), batch)
    _state_update_kernel[grid](
        state, x, dt, A, B3, C3, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else x, out,
        dim, d_state, dim // B3.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B3.stride(), *C3.stride(),
        *(z.stride() if z is not None else (0, 0)), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4,
    )
    return out
