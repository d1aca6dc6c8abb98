"""The ingest report: what was read, written, rejected and skipped, and how fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def reason_category(reason: str) -> str:
    """The reason without its last detail (the value or id after the final ': '), for counting."""
    return reason.rsplit(": ", 1)[0] if ": " in reason else reason


@dataclass
class TypeCounts:
    """Per resource type. Invariant: read == written + rejected + skipped."""

    read: int = 0
    written: int = 0
    rejected: int = 0
    skipped: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    skipped_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def reconciles(self) -> bool:
        return self.read == self.written + self.rejected + self.skipped


@dataclass
class IngestReport:
    out: str
    inputs: list[str]
    resource_types: dict[str, TypeCounts]
    subjects: int
    events: int
    shards: int
    codes: int
    splits: dict[str, int]
    validation: str
    validated_resources: int
    dangling_encounter_references: int
    seconds: float
    peak_memory_mb: float
    workers: int
    warnings: list[str] = field(default_factory=list)

    @property
    def resources_read(self) -> int:
        return sum(c.read for c in self.resource_types.values())

    @property
    def resources_rejected(self) -> int:
        return sum(c.rejected for c in self.resource_types.values())

    @property
    def resources_per_second(self) -> float:
        return self.resources_read / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["totals"] = {
            "read": self.resources_read,
            "written": sum(c.written for c in self.resource_types.values()),
            "rejected": self.resources_rejected,
            "skipped": sum(c.skipped for c in self.resource_types.values()),
            "resources_per_second": round(self.resources_per_second, 1),
        }
        return data

    def summary(self) -> str:
        """A one-screen text summary for the terminal."""
        lines = [
            f"MEDS dataset: {self.out}",
            f"  {self.subjects:,} subjects, {self.events:,} events, {self.codes:,} codes, {self.shards} shard(s)",
            "  splits: " + ", ".join(f"{k} {v:,}" for k, v in self.splits.items()),
            f"  {self.resources_read:,} resources in {self.seconds:.1f} s "
            f"({self.resources_per_second:,.0f}/s, {self.workers} workers, peak {self.peak_memory_mb:,.0f} MB, "
            f"validation {self.validation}: {self.validated_resources:,} checked with R4B)",
            f"  {'type':<26}{'read':>11}{'written':>11}{'rejected':>10}{'skipped':>10}",
        ]
        for name, c in sorted(self.resource_types.items()):
            lines.append(f"  {name:<26}{c.read:>11,}{c.written:>11,}{c.rejected:>10,}{c.skipped:>10,}")
        reasons: dict[str, int] = {}
        for c in self.resource_types.values():
            for reason, n in c.rejected_reasons.items():
                reasons[reason] = reasons.get(reason, 0) + n
        if reasons:
            lines.append(f"  rejected (see {self.out}/rejects/rejects.ndjson), top reasons:")
            for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:5]:
                lines.append(f"    {n:>8,}  {reason[:100]}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)
