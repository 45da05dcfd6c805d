"""backend.lru.SizedLRU: the bounded store behind the embedding cache, /setup's configs, refinement and image
identities."""

from backend.lru import SizedLRU


def test_total_size_bound_drops_the_least_recent() -> None:
    lru: SizedLRU[str, bytes] = SizedLRU(10, size=len)
    lru.put("a", b"1234")
    lru.put("b", b"1234")
    assert lru.get("a") == b"1234"  # now the most recent: "b" goes first
    lru.put("c", b"1234")
    assert "b" not in lru and "a" in lru and "c" in lru
    assert lru.total == 8 and len(lru) == 2


def test_a_value_over_the_budget_is_refused_and_leaves_the_old_one() -> None:
    lru: SizedLRU[str, bytes] = SizedLRU(4, size=len)
    assert lru.put("a", b"12")
    assert not lru.put("a", b"12345")
    assert lru.get("a") == b"12" and lru.total == 2


def test_entry_cap_and_replacing_a_key() -> None:
    lru: SizedLRU[int, str] = SizedLRU(100, size=len, max_entries=2)
    for key in range(3):
        lru.put(key, "x" * (key + 1))
    assert 0 not in lru and len(lru) == 2 and lru.total == 5
    lru.put(1, "y")
    assert lru.get(1) == "y" and lru.total == 4


def test_newest_pop_and_pop_where() -> None:
    lru: SizedLRU[str, str] = SizedLRU(100, size=len)
    lru.put("7.a", "old")
    lru.put("7.b", "new")
    lru.put("8.a", "other")
    assert lru.newest(lambda key: key.startswith("7.")) == "new"
    assert lru.newest(lambda key: key.startswith("9.")) is None
    assert lru.pop("8.a") == "other" and lru.pop("8.a") is None
    assert lru.pop_where(lambda key, value: key.startswith("7.")) == 2
    assert len(lru) == 0 and lru.total == 0
