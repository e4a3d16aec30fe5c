"""keywayd: the keying agent (config, asyncio shell, control socket)."""
