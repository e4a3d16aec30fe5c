"""The kernel data plane (Linux XFRM): `messages` (the netlink layouts), `codec`
(specs to and from messages), `plane` (KernelPlane: sockets, requests, events) and
`routes` (tunnels' routes in Keyway's table)."""
