"""The netns lab: lab hosts as network namespaces on one shared L2 segment.

`plan` computes the lab (names, addresses, folders) from its size and is pure;
`netns` builds and removes it with iproute2. The demo, the inventory plugin
and the tests' fixtures all go through these two, so they agree on every name.
"""
