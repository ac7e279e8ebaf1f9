"""The intervention engine: layer plans, composable hooks and the prefix-sharing executor."""
