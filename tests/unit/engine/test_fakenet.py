from tests.fixtures.fakenet import FakeNetwork, Impairment

A, B = ("192.0.2.11", 500), ("192.0.2.12", 500)


def _run(net: FakeNetwork, n: int) -> list[bytes]:
    got: list[bytes] = []
    net.attach(B, lambda data, src, dst, now: got.append(data))
    for i in range(n):
        net.send(i.to_bytes(2, "big"), A, B)
    net.deliver_until(10.0)
    return got


def test_clean_network_delivers_in_order_after_the_delay():
    net = FakeNetwork()
    got = _run(net, 5)
    assert got == [i.to_bytes(2, "big") for i in range(5)]
    assert net.now == 10.0


def test_impairments_lose_duplicate_and_reorder_deterministically():
    imp = Impairment(loss=0.2, duplicate=0.2, reorder=0.5)
    first = _run(FakeNetwork(seed=7, impairment=imp), 200)
    again = _run(FakeNetwork(seed=7, impairment=imp), 200)
    assert first == again
    values = [int.from_bytes(d, "big") for d in first]
    assert len(set(values)) < 200  # some lost
    assert len(values) > len(set(values))  # some duplicated
    assert values != sorted(values)  # some reordered


def test_targeted_drop():
    imp = Impairment(drop_if=lambda data, src, dst: data == b"\x00\x03")
    assert b"\x00\x03" not in _run(FakeNetwork(impairment=imp), 5)
