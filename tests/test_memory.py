"""rconv.linalg.memory: a clear refusal before an allocation that would not fit, under memory_limit and under
`ulimit -v`, and which errors are failed allocations."""
import pytest

import rconv.linalg.memory as memory
import rconv_core as rc

MB = 2 ** 20


def test_an_allocation_beyond_the_limit_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(memory, "_address_space_left", lambda: None)
    memory.check(10 * MB, "the frame", 10 * MB)
    memory.check(10 ** 12, "the frame", None)
    with pytest.raises(rc.RConvError, match=r"^the frame would need 11 MB, more than the 10 MB .* \(memory_limit\)"):
        memory.check(11 * MB, "the frame", 10 * MB)


@pytest.mark.parametrize("limit", [None, 10 ** 12])
def test_under_an_address_space_limit_what_is_left_now_counts(monkeypatch, limit):
    """Earlier allocations use up the address space: a limit fixed when the attack started may no longer fit."""
    monkeypatch.setattr(memory, "_address_space_left", lambda: 100 * MB)
    memory.check(75 * MB, "the symbol", limit)
    with pytest.raises(rc.RConvError, match=r"^the symbol would need 76 MB, more than the 75 MB"):
        memory.check(76 * MB, "the symbol", limit)


@pytest.mark.parametrize("error, failed", [
    (MemoryError("Unable to allocate 11.7 GiB"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4194304 bytes"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("can't allocate memory"), False),
])
def test_ran_out_knows_a_failed_allocation(error, failed):
    assert memory.ran_out(error) is failed
