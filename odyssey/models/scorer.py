"""`EHRMambaScorer`: a task's risk, updated as new events arrive, at a cost that does not grow with history.

The scorer keeps each patient's recurrent state (per layer, the conv window and the SSM state) after the
events seen so far. New events advance that state; to score, the task's trailing prompt continues from
the advanced state without being written back, so the prompt never enters the patient's history. The
result equals running the whole prompted sequence through the parallel model
(`EHRMambaForTaskClassification`) up to float rounding.

States live in one pool per layer on the model's device (a row per patient). An update is one pass
over the layers for a chunk of tokens per patient, the new events and then the prompt
(`EHRMambaBlock.step_tokens`): each layer runs a handful of launches (norm, in_proj, a conv kernel,
x_proj, a scan kernel that folds dt_proj in, out_proj, residual) that read and write the pooled rows in
place, whatever the number of patients or tokens. On CUDA that pass is captured in a CUDA graph per
(patients, tokens) shape once the shape repeats, so a single patient's update is one host-to-device
copy, one graph replay and one device-to-host copy. Everywhere else it runs eagerly.

The first events of a patient must begin like a finetuning input: the task prompt in place of `[CLS]`
(`odyssey.finetune.data.prompt_input` builds one; drop its trailing prompt, which the scorer adds).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from odyssey.kernels import resolve_backend
from odyssey.kernels.step import triton_chunk_available

from .mixer import MixerState
from .modeling_ehrmamba import EHRMambaCache
from .modeling_ehrmamba_tasks import EHRMambaForTaskClassification

logger = logging.getLogger(__name__)

TOKEN_COLUMNS = ("input_ids", "token_type_ids", "ages", "times", "visit_orders", "visit_segments")
_FLOAT_COLUMNS = {"ages", "times"}
_SEGMENT_OF_PROMPT = 0
# The trailing prompt repeats the last event's age, time and visit.
_PROMPT_CONTEXT = ("ages", "times", "visit_orders")
_FIRST_CAPACITY = 8
# One update travels to the device as one byte buffer (`_Layout`): integer fields (rows, tokens) one
# after another, then each row's pool slot, as int64; then the float fields, as float32. The device reads
# every field as a contiguous view of that buffer: no conversion. The host computes what the embeddings
# would derive elementwise (each token's time since the previous one, the clamped visit order) with the
# same float32 operations, so those ten-odd small kernels leave the pass.
_INT_FIELDS = ("input_ids", "token_type_ids", "visit_orders", "visit_segments", "active")
_FLOAT_FIELDS = ("ages", "time_deltas")
_FIELD_OF_COLUMN = {"ages": "ages", "times": "time_deltas"}  # times are packed, then turned into deltas
_FEW_ROWS = 8  # up to this many patients, an update is packed row by row (fewer numpy calls)
# CUDA graphs: shapes are rounded up to powers of two (padding rows and tokens are inactive), captured
# the second time a shape is seen (a one-off shape, e.g. a trajectory's odd group, stays eager), and
# kept for the most recent few shapes.
_CAPTURE_AFTER_USES = 2
_MAX_GRAPHS = 8
_MAX_GRAPH_EVENTS = 64
_MAX_GRAPH_TOKENS = 1 << 16  # rows x tokens of one captured shape


class EHRMambaScorer:
    """Per-patient recurrent state and incremental risk of one task of a finetuned model.

    `cuda_graphs`: None (default) captures on CUDA when the Triton step kernels are available; False
    always runs eagerly (same results up to float rounding).
    """

    def __init__(self, model: EHRMambaForTaskClassification, task: str, task_token_type: int | None = None,
                 cuda_graphs: bool | None = None):
        names = list(model.config.task_names)
        if task not in names:
            raise ValueError(f"unknown task {task!r}; the model serves {names}")
        token_type = task_token_type if task_token_type is not None else getattr(model.config, "task_token_type", None)
        if token_type is None:
            raise ValueError("task_token_type is not in the model config; pass it (odyssey.tokenizer.TokenType.TASK)")
        self.model = model.eval()
        self.task = task
        self.task_index = names.index(task)
        self.prompt = [int(t) for t in model.config.task_prompt_ids[self.task_index]]
        self.task_token_type = int(token_type)
        self.device = next(model.parameters()).device
        self.step_backend = _step_backend(model.config.scan_backend, self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on a CUDA device, not {self.device}")
        if cuda_graphs and self.step_backend != "triton":
            raise ValueError("cuda_graphs needs the Triton step kernels (Triton is unavailable or the scan backend "
                             "is forced to torch)")
        self.cuda_graphs = self.step_backend == "triton" if cuda_graphs is None else bool(cuda_graphs)
        self.seen_tokens: dict[Hashable, int] = {}
        self._slots: dict[Hashable, int] = {}
        self._free: list[int] = []
        self._conv: torch.Tensor | None = None  # (layers, slots, intermediate, conv_kernel)
        self._ssm: torch.Tensor | None = None  # (layers, slots, intermediate, state_size), float32
        # Host mirrors per slot: the last event's time (for the next time delta) and the prompt's context.
        self._last_time = np.empty(0, dtype=np.float32)
        self._context: dict[str, np.ndarray] = {}
        self._graphs: OrderedDict[tuple[int, int], _GraphedForward | None] = OrderedDict()
        self._shape_uses: dict[tuple[int, int], int] = {}
        self._pad_to_buckets = self.cuda_graphs  # tests turn it on to check padding on CPU

    def __contains__(self, patient: Hashable) -> bool:
        return patient in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def forget(self, patient: Hashable) -> None:
        slot = self._slots.pop(patient, None)
        self.seen_tokens.pop(patient, None)
        if slot is not None:
            self._free.append(slot)

    def state(self, patient: Hashable) -> EHRMambaCache:
        """A copy of the patient's recurrent state."""
        slot = self._slot(patient)
        return EHRMambaCache(
            layers=[MixerState(conv[slot: slot + 1].clone(), ssm[slot: slot + 1].clone())
                    for conv, ssm in zip(self._conv, self._ssm, strict=True)],
            last_times=torch.tensor([self._last_time[slot]], device=self.device),
            seen_tokens=self.seen_tokens[patient],
        )

    def copy_patient(self, source: Hashable, target: Hashable) -> None:
        """Start `target` from a copy of `source`'s state (a what-if branch; `target` is replaced)."""
        old = self._slot(source)
        self.forget(target)
        new = self._take_slot()
        self._conv[:, new] = self._conv[:, old]
        self._ssm[:, new] = self._ssm[:, old]
        self._last_time[new] = self._last_time[old]
        for values in self._context.values():
            values[new] = values[old]
        self._slots[target] = new
        self.seen_tokens[target] = self.seen_tokens[source]

    @torch.no_grad()
    def update(self, patient: Hashable, events: Mapping[str, np.ndarray]) -> np.ndarray:
        """Advance `patient`'s state over `events` (token columns as 1-D arrays); return the task's risk.

        A patient seen for the first time is prefilled with the parallel scan (its first events must start
        with the task prompt); later events continue the carried state, one recurrence step per token.
        """
        return self.update_many({patient: events})[patient]

    @torch.no_grad()
    def update_many(self, events_by_patient: Mapping[Hashable, Mapping[str, np.ndarray]]) -> dict[Hashable, np.ndarray]:
        """`update` for many patients at once: the known ones advance together in one pass.

        Rows with fewer new events are padded (padding leaves a row's state unchanged), so a ward of patients
        costs about one patient's pass on a GPU. Returns each patient's risk.
        """
        new_events = {}
        for patient, events in events_by_patient.items():
            columns = _columns(events)
            if patient not in self._slots:
                self._prefill(patient, columns)
            elif len(columns["input_ids"]):
                new_events[patient] = columns
        return self._advance_and_score(list(events_by_patient), new_events)

    @torch.no_grad()
    def score(self, patient: Hashable) -> np.ndarray:
        """The task's probabilities now (one per task output); the patient's state is left untouched."""
        return self.score_many([patient])[patient]

    @torch.no_grad()
    def score_many(self, patients: Sequence[Hashable]) -> dict[Hashable, np.ndarray]:
        """`score` for many patients in one pass; each one's state is left untouched."""
        return self._advance_and_score(list(patients), {})

    @torch.no_grad()
    def trajectory(self, events: Mapping[str, np.ndarray], event_times: Sequence[Any]) -> list[tuple[Any, np.ndarray]]:
        """Risk after each moment of one patient's prompted history: [(time, probabilities)], oldest first.

        `events` starts with the task prompt (without the trailing one); `event_times` (one per token, never
        decreasing) says when each token became known. Tokens sharing a time are fed together, and the risk
        is read after each group, as a live scorer would see it.
        """
        times = list(event_times)
        if len(times) != len(np.asarray(events["input_ids"])):
            raise ValueError(f"{len(times)} event times for {len(np.asarray(events['input_ids']))} tokens")
        if any(later < earlier for earlier, later in zip(times[:-1], times[1:], strict=True)):
            raise ValueError("event times decrease; pass when each token became known (a running maximum)")
        patient = object()
        points = []
        start = 0
        # The prompt has no moment of its own: it joins the first group of events.
        for end in range(len(self.prompt) + 1, len(times) + 1):
            if end < len(times) and times[end] == times[end - 1]:
                continue
            risk = self.update(patient, {c: np.asarray(events[c])[start:end] for c in TOKEN_COLUMNS})
            points.append((times[end - 1], risk))
            start = end
        self.forget(patient)
        return points

    # One pass: the new events of each row, then the trailing prompt, through every layer.

    def _advance_and_score(self, patients: list[Hashable], events: dict[Hashable, dict[str, np.ndarray]]
                           ) -> dict[Hashable, np.ndarray]:
        if not patients:
            return {}
        slots = np.array([self._slot(p) for p in patients], dtype=np.int64)
        counts = np.array([len(events[p]["input_ids"]) if p in events else 0 for p in patients], dtype=np.int64)
        rows, width = len(patients), int(counts.max())
        if self._pad_to_buckets:
            rows, width = _bucket(rows), _bucket(width)
        layout = _Layout(rows, width + len(self.prompt))
        graph = self._graph(layout, width) if self.cuda_graphs else None
        buffer = graph.host_input if graph is not None else np.empty(layout.nbytes, dtype=np.uint8)
        self._pack(layout, buffer, patients, events, slots, counts, width)
        if graph is not None:
            probabilities = graph()
        else:
            packed = torch.from_numpy(buffer).to(self.device)
            probabilities = self._forward(layout, packed, width).cpu().numpy()
        for patient, count in zip(patients, counts.tolist(), strict=True):
            self.seen_tokens[patient] += count
        return {patient: probabilities[row] for row, patient in enumerate(patients)}

    def _pack(self, layout: _Layout, buffer: np.ndarray, patients, events, slots: np.ndarray, counts: np.ndarray,
              width: int) -> None:
        """Write the update's device input into `buffer`; also move the host mirrors past the new events."""
        buffer[:] = 0
        ints, row_slots, floats = layout.views(buffer)
        real = len(patients)
        row_slots[:real] = slots
        previous = np.zeros(layout.rows, dtype=np.float32)
        previous[:real] = self._last_time[slots]
        has = counts > 0
        if real <= _FEW_ROWS:
            for row, patient in enumerate(patients):
                if patient in events:
                    self._pack_row(ints, floats, row, slots[row], events[patient])
        elif has.any():
            order = [p for p in patients if p in events]
            row_of = np.repeat(np.arange(real), counts)
            column_of = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            last = (np.cumsum(counts) - 1)[has]
            for name in TOKEN_COLUMNS:
                values = np.concatenate([events[p][name] for p in order])
                target = _field(ints, floats, name)
                target[row_of, column_of] = values
                if name in _PROMPT_CONTEXT:
                    self._context[name][slots[has]] = values[last]
                if name == "times":
                    self._last_time[slots[has]] = values[last]
            ints[_INT_FIELDS.index("active"), row_of, column_of] = 1
        ints[_INT_FIELDS.index("input_ids"), :, width:] = self.prompt
        ints[_INT_FIELDS.index("token_type_ids"), :, width:] = self.task_token_type
        ints[_INT_FIELDS.index("visit_segments"), :, width:] = _SEGMENT_OF_PROMPT
        ints[_INT_FIELDS.index("visit_orders"), :real, width:] = self._context["visit_orders"][slots][:, None]
        for name in _FIELD_OF_COLUMN:
            _field(ints, floats, name)[:real, width:] = self._context[name][slots][:, None]
        active = ints[_INT_FIELDS.index("active")]
        active[:real, width:] = 1
        times = _field(ints, floats, "times")
        times[:] = _time_deltas(times, active, previous)
        orders = ints[_INT_FIELDS.index("visit_orders")]
        np.clip(orders, 0, self.model.config.max_visit_order - 1, out=orders)

    def _pack_row(self, ints: np.ndarray, floats: np.ndarray, row: int, slot: int, columns: dict[str, np.ndarray]
                  ) -> None:
        count = len(columns["input_ids"])
        for name in TOKEN_COLUMNS:
            target = _field(ints, floats, name)
            target[row, :count] = columns[name]
            if name in _PROMPT_CONTEXT:
                self._context[name][slot] = columns[name][-1]
        self._last_time[slot] = columns["times"][-1]
        ints[_INT_FIELDS.index("active"), row, :count] = 1

    def _forward(self, layout: _Layout, packed: torch.Tensor, width: int) -> torch.Tensor:
        """The packed update (a uint8 buffer on the device) -> probabilities (rows, prompt length)."""
        ints, slots, floats = layout.views(packed)
        columns = {name: ints[i] for i, name in enumerate(_INT_FIELDS)} | {
            name: floats[i] for i, name in enumerate(_FLOAT_FIELDS)}
        active = columns["active"]
        backbone = self.model.backbone
        hidden = backbone.embeddings.combine(columns["input_ids"], columns["token_type_ids"], columns["ages"],
                                             columns["time_deltas"], columns["visit_orders"], columns["visit_segments"])
        for layer, conv, ssm in zip(backbone.layers, self._conv, self._ssm, strict=True):
            hidden = layer.step_tokens(hidden, conv, ssm, slots, active, width, self.step_backend)
        hidden = backbone.norm_f(hidden[:, width:])  # (rows, prompt, hidden)
        offset = sum(self.model.config.task_outputs[: self.task_index])
        weight = self.model.classifier.weight[offset: offset + len(self.prompt)]
        bias = self.model.classifier.bias[offset: offset + len(self.prompt)]
        # output j reads prompt position j through its own classifier row: one batched product over j
        logits = torch.baddbmm(bias[:, None, None], hidden.to(weight.dtype).transpose(0, 1), weight[:, :, None])
        return torch.sigmoid(logits[..., 0].float()).t().contiguous()  # (rows, prompt); one plain copy out

    def _graph(self, layout: _Layout, width: int) -> _GraphedForward | None:
        """The captured pass for this shape, or None to run it eagerly this time."""
        key = (layout.rows, width)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        if width > _MAX_GRAPH_EVENTS or layout.rows * layout.tokens > _MAX_GRAPH_TOKENS:
            return None
        self._shape_uses[key] = self._shape_uses.get(key, 0) + 1
        if self._shape_uses[key] < _CAPTURE_AFTER_USES:
            return None
        try:
            graph = _GraphedForward(lambda packed: self._forward(layout, packed, width), layout, self.device)
        except RuntimeError as error:  # capture is not possible here: stay eager for this shape
            logger.warning("CUDA graph capture failed for %s rows x %s events (%s); running eagerly", *key, error)
            torch.cuda.synchronize(self.device)
            graph = None
        self._graphs[key] = graph
        while len(self._graphs) > _MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return graph

    # The pool: one row per patient slot.

    def _slot(self, patient: Hashable) -> int:
        if patient not in self._slots:
            raise KeyError(f"no events seen for patient {patient!r}")
        return self._slots[patient]

    def _prefill(self, patient: Hashable, columns: dict[str, np.ndarray]) -> None:
        if len(columns["input_ids"]) == 0:
            raise ValueError("a new patient needs at least one event")
        if columns["input_ids"][: len(self.prompt)].tolist() != self.prompt:
            raise ValueError(f"a new patient's events must start with the task prompt {self.prompt}")
        batch = {c: self._tensor(c, v[None]) for c, v in columns.items()}
        cache = self.model.backbone(**batch, use_cache=True).cache
        if self._conv is None:
            self._allocate(cache)
        slot = self._take_slot()
        for layer, state in enumerate(cache.layers):
            self._conv[layer, slot] = state.conv_state[0]
            self._ssm[layer, slot] = state.ssm_state[0]
        self._last_time[slot] = columns["times"][-1]
        for name in _PROMPT_CONTEXT:
            self._context[name][slot] = columns[name][-1]
        self._slots[patient] = slot
        self.seen_tokens[patient] = len(columns["input_ids"])

    def _tensor(self, name: str, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32 if name in _FLOAT_COLUMNS else torch.long, device=self.device)

    def _allocate(self, cache: EHRMambaCache) -> None:
        conv, ssm = cache.layers[0].conv_state, cache.layers[0].ssm_state
        layers = len(cache.layers)
        self._conv = torch.zeros((layers, _FIRST_CAPACITY, *conv.shape[1:]), dtype=conv.dtype, device=self.device)
        self._ssm = torch.zeros((layers, _FIRST_CAPACITY, *ssm.shape[1:]), dtype=torch.float32, device=self.device)
        self._last_time = np.full(_FIRST_CAPACITY, np.nan, dtype=np.float32)
        self._context = {"ages": np.zeros(_FIRST_CAPACITY, dtype=np.float32),
                         "times": np.zeros(_FIRST_CAPACITY, dtype=np.float32),
                         "visit_orders": np.zeros(_FIRST_CAPACITY, dtype=np.int64)}
        self._free = list(range(_FIRST_CAPACITY - 1, -1, -1))

    def _take_slot(self) -> int:
        if not self._free:
            self._grow()
        return self._free.pop()

    def _grow(self) -> None:
        """Double the pool's rows (amortised O(1) per new patient); captured graphs point at the old pool."""
        capacity = self._conv.shape[1]
        self._conv = torch.cat([self._conv, torch.zeros_like(self._conv)], dim=1)
        self._ssm = torch.cat([self._ssm, torch.zeros_like(self._ssm)], dim=1)
        self._last_time = np.concatenate([self._last_time, np.full(capacity, np.nan, dtype=np.float32)])
        self._context = {c: np.concatenate([v, np.zeros_like(v)]) for c, v in self._context.items()}
        self._free = list(range(2 * capacity - 1, capacity - 1, -1))
        self._graphs.clear()


class _Layout:
    """Where each field of one update sits in its byte buffer (see `_INT_FIELDS`)."""

    def __init__(self, rows: int, tokens: int):
        self.rows, self.tokens = rows, tokens
        self.int_count = (len(_INT_FIELDS) * tokens + 1) * rows
        self.float_count = len(_FLOAT_FIELDS) * tokens * rows
        self.nbytes = 8 * self.int_count + 4 * self.float_count

    def views(self, buffer):
        """(int fields (F, rows, tokens), slots (rows,), float fields (F, rows, tokens)).

        `buffer` is a uint8 numpy array or torch tensor; the views share its memory.
        """
        as_int64, as_float32 = ((np.int64, np.float32) if isinstance(buffer, np.ndarray)
                                else (torch.int64, torch.float32))
        ints = buffer[: 8 * self.int_count].view(as_int64)
        floats = buffer[8 * self.int_count:].view(as_float32)
        int_fields = len(_INT_FIELDS) * self.rows * self.tokens
        return (ints[:int_fields].reshape(len(_INT_FIELDS), self.rows, self.tokens), ints[int_fields:],
                floats.reshape(len(_FLOAT_FIELDS), self.rows, self.tokens))


class _GraphedForward:
    """One shape of the scorer's pass captured in a CUDA graph, with static input and output buffers.

    The caller writes the packed update into `host_input` (pinned memory) and calls the object: one
    host-to-device copy, one replay, one device-to-host copy of the risks.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], layout: _Layout, device: torch.device):
        self._host_input = torch.zeros(layout.nbytes, dtype=torch.uint8, pin_memory=True)
        self.host_input = self._host_input.numpy()
        self.input = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
        # Warm up (Triton compiles, cuBLAS picks its kernels) on a side stream, as capture requires. The
        # all-zero input has every token inactive, so nothing is written to the pool.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward(self.input)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = forward(self.input)

    def __call__(self) -> np.ndarray:
        self.input.copy_(self._host_input, non_blocking=True)
        self.graph.replay()
        return self.output.cpu().numpy()  # waits for the replay; the pinned input is free again after it


def _field(ints: np.ndarray, floats: np.ndarray, column: str) -> np.ndarray:
    """The (rows, tokens) slot of a token column in the packed views."""
    if column in _FIELD_OF_COLUMN:
        return floats[_FLOAT_FIELDS.index(_FIELD_OF_COLUMN[column])]
    return ints[_INT_FIELDS.index(column)]


def _time_deltas(times: np.ndarray, active: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """`odyssey.models.embeddings.time_deltas` with a mask and previous times, in the same float32 steps."""
    before = np.empty_like(times)
    before[:, 0] = np.where(np.isnan(previous), times[:, 0], previous)
    before[:, 1:] = times[:, :-1]
    mask = active.astype(np.float32)
    before_mask = np.ones_like(mask)
    before_mask[:, 1:] = mask[:, :-1]
    return (times - before) * before_mask * mask


def _step_backend(scan_backend: str, device: torch.device) -> str:
    """The chunk kernels' backend: Triton where the model's scans would run on a GPU kernel, else torch."""
    if device.type == "cuda" and resolve_backend(scan_backend, device) in ("triton", "mamba_ssm") \
            and triton_chunk_available():
        return "triton"
    return "torch"


def _bucket(count: int) -> int:
    """Round up to a power of two (0 stays 0), so a few captured shapes serve every batch."""
    return 0 if count == 0 else 1 << (count - 1).bit_length()


def _columns(events: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    columns = {c: np.asarray(events[c]) for c in TOKEN_COLUMNS}
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"event columns differ in length: {sorted(lengths)}")
    return columns


__all__ = ["EHRMambaScorer"]
