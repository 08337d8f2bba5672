"""specdec.eval: drafters at inference, the verifier and engine, metrics and the eval hook (#4)."""

__all__: list[str] = []
