"""Data planes: where Child SAs and policies live (kernel XFRM, userspace ESP, a fake)."""
