"""IKEv2: wire format (codec), cryptography, and the sans-IO engine.

Nothing in this package touches sockets, clocks or the kernel (DESIGN.md).
"""
