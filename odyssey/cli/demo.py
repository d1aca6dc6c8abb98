"""`odyssey synth` (filled in by the synth module)."""


def register(app) -> None:  # pragma: no cover - placeholder until synth lands
    pass
