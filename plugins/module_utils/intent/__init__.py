"""Intent: topologies in, per-host keywayd connections out (pure functions)."""
