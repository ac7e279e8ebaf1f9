"""The intervention engine: layer plans, composable hooks and the prefix-sharing executor."""

__all__: list[str] = []  # the engine's names live in its modules (plan, forward, executor, hooks, ...)
