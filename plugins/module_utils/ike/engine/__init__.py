"""The sans-IO IKEv2 engine: datagrams and time in; datagrams, deadlines and events out.

Nothing here opens a socket, reads a clock or sleeps: callers pass `now` (seconds, any
monotonic origin) and act on what comes back (DESIGN.md, in the spirit of h11/aioquic).
"""
