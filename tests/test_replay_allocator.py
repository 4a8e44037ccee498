"""The replay allocator on host memory: a traced request sequence replayed at planned offsets, never two live
tensors on the same bytes, and every request the plan cannot serve counted (the allocator's code, driven
through ctypes with libc's malloc as its device)."""

import ctypes
import shutil

import numpy as np
import pytest

from orchestrator.memory import replay_allocator
from orchestrator.memory.replayed_steps import ReplayedSteps
from orchestrator.memory.traced_layout import FREE, MALLOC, plan_layout

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="the replay allocator is built with the system's C++ compiler; none here")

MIB = 1 << 20
MAIN, SIDE = 7, 9
"""Two stream handles (the allocator only compares them)."""


@pytest.fixture(scope="module")
def build_cache(tmp_path_factory):
    """One build of the allocator for the module (its subprocesses too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LONGTRAIN_BUILD_CACHE", str(tmp_path_factory.mktemp("build")))
        yield


@pytest.fixture(scope="module")
def allocator(build_cache):
    lib = replay_allocator.load_library()
    libc = ctypes.CDLL(None)
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t)
    def host_malloc(out, size):
        out[0] = libc.malloc(size)
        return 0 if out[0] else 2

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
    def host_free(ptr):
        libc.free(ptr)
        return 0

    @ctypes.CFUNCTYPE(ctypes.c_int)
    def host_sync():
        return 0

    as_pointer = lambda fn: ctypes.cast(fn, ctypes.c_void_p)  # noqa: E731
    assert lib.replay_set_backend(as_pointer(host_malloc), as_pointer(host_free), as_pointer(host_sync), 0) == 0
    replay = replay_allocator.ReplayAllocator(lib)
    replay.callbacks = (host_malloc, host_free, host_sync)  # alive as long as the library may call them
    yield replay
    if replay.layout is not None:
        replay.drop()


def run(replay, program, stream=MAIN):
    """Play a step: ('a', name, size) allocates, ('f', name) frees; returns {name: (address, size)} at allocation
    and checks, at every allocation, that no live tensor shares a byte with the new one (the independent check)."""
    live, seen = {}, {}
    for op in program:
        if op[0] == "a":
            _, name, size = op
            address = replay.lib.replay_malloc(size, 0, stream)
            assert address, f"{name}: no memory"
            for other, (start, length) in live.items():
                assert address + size <= start or start + length <= address, f"{name} overlaps live {other}"
            live[name] = seen[name] = (address, size)
        else:
            address, size = live.pop(op[1])
            replay.lib.replay_free(address, size, 0, stream)
    return seen, live


STEP = [("a", "x", 8 * MIB), ("a", "h", 6 * MIB), ("f", "x"), ("a", "g", 4 * MIB), ("a", "small", 4096),
        ("f", "small"), ("a", "y", 3 * MIB), ("f", "h"), ("f", "g"), ("a", "z", 10 * MIB), ("f", "y"), ("f", "z"),
        ("a", "kept", 2 * MIB)]
"""A step's requests in host order; `kept` outlives the step (the next step frees it)."""


def test_a_traced_step_replays_at_its_planned_offsets_within_the_lower_bound(allocator):
    traced_live = {}
    events = allocator.traced(lambda: traced_live.update(run(allocator, STEP)[1]))
    _free_all(allocator, traced_live)  # the next step frees `kept`
    assert [tuple(row[:3]) for row in events[:3].tolist()] == [(MALLOC, 0, 8 * MIB), (MALLOC, 1, 6 * MIB),
                                                              (FREE, 0, 8 * MIB)]
    layout = plan_layout(events)
    # planned: the requests of at least 1 MiB freed within the step; `small` and `kept` go to the cache
    assert layout.planned == 5 and layout.offsets[3] == -1 and layout.offsets[6] == -1
    assert layout.lower_bound_bytes == 14 * MIB  # x + h, then h + g + y = 13, then z = 10
    assert layout.arena_bytes == layout.lower_bound_bytes
    allocator.release_cache()
    allocator.use(layout)
    before = allocator.counters()
    with allocator.window():
        seen, live = run(allocator, STEP)
    after = allocator.counters()
    assert after.planned - before.planned == 5 and after.fallbacks == before.fallbacks
    arena_start = seen["z"][0] - layout.offsets[5]
    for request, name in enumerate(["x", "h", "g", "small", "y", "z", "kept"]):
        if layout.offsets[request] >= 0:
            assert seen[name][0] == arena_start + layout.offsets[request], name
    assert after.arena == 14 * MIB
    _free_all(allocator, live)


def test_a_tensor_held_past_its_traced_life_sends_the_request_on_its_bytes_to_the_cache(allocator):
    allocator.drop()
    layout = plan_layout(allocator.traced(lambda: _free_all(allocator, run(allocator, STEP)[1])))
    allocator.use(layout)
    before = allocator.counters()
    held_step = [op for op in STEP if op != ("f", "x")]  # x is still held when g, y and z come
    with allocator.window():
        seen, live = run(allocator, held_step)
    after = allocator.counters()
    assert after.overlaps - before.overlaps >= 1
    assert after.fallbacks - before.fallbacks == after.overlaps - before.overlaps
    _free_all(allocator, live)
    other_size = [("a", "x", 8 * MIB), ("a", "h", 5 * MIB), ("f", "x"), ("f", "h")]
    with allocator.window():
        _, live = run(allocator, other_size)
    assert allocator.counters().mismatches - after.mismatches == 1
    with allocator.window():
        _, live_side = run(allocator, [("a", "x", 8 * MIB)], stream=SIDE)
    assert allocator.counters().mismatches - after.mismatches == 2
    _free_all(allocator, live_side, SIDE)


def test_the_arena_is_not_returned_while_a_tensor_placed_in_it_lives(allocator):
    allocator.drop()
    layout = plan_layout(allocator.traced(lambda: _free_all(allocator, run(allocator, STEP)[1])))
    allocator.use(layout)
    with allocator.window():
        _, live = run(allocator, STEP[:1])
    with pytest.raises(RuntimeError, match="alive"):
        allocator.drop()
    _free_all(allocator, live)
    allocator.drop()
    assert allocator.counters().arena == 0


def test_peaks_count_live_bytes_and_what_the_cache_holds(allocator):
    allocator.release_cache()
    allocator.reset_peaks()
    start = allocator.counters()
    _, live = run(allocator, [("a", "a", 3 * MIB), ("a", "b", 5 * MIB)])
    _free_all(allocator, live)
    after = allocator.counters()
    assert after.peak_allocated - start.allocated == 8 * MIB
    assert after.allocated == start.allocated
    assert after.reserved - start.reserved == 10 * MIB  # both blocks cached, in 2 MiB multiples: 4 + 6
    allocator.release_cache()
    assert allocator.counters().reserved == start.reserved


def test_a_run_warms_up_traces_its_second_step_and_serves_the_rest_at_its_offsets(allocator):
    """train.allocator=planned's loop (`ReplayedSteps`): step 1 of a run (here resumed after step 6) from the cache,
    step 7 traced and laid out, later steps at the same addresses; a step that asks for other sizes is counted."""
    allocator.drop()

    def step(program):
        seen, live = run(allocator, program)
        _free_all(allocator, live)
        return {name: address for name, (address, _) in seen.items()}

    steps = ReplayedSteps(allocator, first_step=6)
    steps.run(6, lambda: step(STEP))
    assert steps.layout_bytes == 0 and allocator.layout is None
    steps.run(7, lambda: step(STEP))
    assert steps.layout_bytes == 0 and allocator.layout.arena_bytes == 14 * MIB  # laid out, not yet replayed
    assert steps.step_fallbacks() == (0, 0)
    replayed = [steps.run(n, lambda: step(STEP)) for n in (8, 9)]
    assert replayed[0] == replayed[1] and steps.layout_bytes == 14 * MIB
    assert steps.step_fallbacks() == (0, 0)
    other = [("a", "x", 8 * MIB), ("a", "h", 5 * MIB), ("f", "x"), ("f", "h")]
    steps.run(10, lambda: step(other))
    assert steps.step_fallbacks() == (1, 5 * MIB)
    allocator.drop()


def _free_all(allocator, live, stream=MAIN):
    for address, size in live.values():
        allocator.lib.replay_free(address, size, 0, stream)


def test_plan_layout_places_no_two_requests_alive_together_on_the_same_bytes():
    rng = np.random.default_rng(0)
    events, live, request = [], [], 0
    for _ in range(400):
        if live and rng.random() < 0.5:
            freed = live.pop(int(rng.integers(len(live))))
            events.append((FREE, freed[0], freed[1], MAIN))
        else:
            size = int(rng.integers(1, 64)) * MIB
            events.append((MALLOC, request, size, MAIN))
            live.append((request, size))
            request += 1
    layout = plan_layout(np.array(events, dtype=np.int64))
    starts, ends = {}, {}
    for time, (kind, r, _, _) in enumerate(events):
        (starts if kind == MALLOC else ends)[r] = time
    placed = [r for r in range(request) if layout.offsets[r] >= 0]
    assert set(placed) == set(ends)  # exactly the requests freed within the step
    for i in placed:
        for j in placed:
            if i < j and starts[i] < ends[j] and starts[j] < ends[i]:
                a, b = layout.offsets[i], layout.offsets[j]
                assert a + layout.sizes[i] <= b or b + layout.sizes[j] <= a, (i, j)
    assert layout.lower_bound_bytes <= layout.arena_bytes <= 1.15 * layout.lower_bound_bytes


FULL_DEVICE = """
import ctypes, sys
from orchestrator.memory import replay_allocator
lib = replay_allocator.load_library()
refuse = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t)(lambda out, size: 2)
nothing = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(lambda ptr: 0)
sync = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 0)
pointer = lambda fn: ctypes.cast(fn, ctypes.c_void_p)
lib.replay_set_backend(pointer(refuse), pointer(nothing), pointer(sync), int(sys.argv[1]))
print("returned", lib.replay_malloc(3 << 30, 0, 7), flush=True)
"""


def test_a_full_device_throws_a_named_out_of_memory_error_under_pytorch_and_returns_null_otherwise(build_cache):
    """Under PyTorch the allocator throws (PyTorch raises it in Python); a null pointer handed back would be
    written to by the next kernel. Here the exception cannot cross ctypes, so the process ends on it, saying what."""
    import os
    import subprocess
    import sys

    replay_allocator.library_path()  # built here once, not in each process
    env = dict(os.environ)
    quiet = subprocess.run([sys.executable, "-c", FULL_DEVICE, "0"], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and "returned None" in quiet.stdout, quiet.stderr
    loud = subprocess.run([sys.executable, "-c", FULL_DEVICE, "1"], capture_output=True, text=True, env=env)
    assert loud.returncode != 0 and "returned" not in loud.stdout
    assert "CUDA out of memory (replay allocator): tried to allocate 3.00 GiB" in loud.stderr


def test_torch_cuda_memory_statistics_read_the_allocators_counters_once_installed(allocator, monkeypatch):
    """`install` gives `torch.cuda`'s statistics these functions: `memory_allocated` and its family, which DeepSpeed
    and the bench call, read them through `memory_stats`; the peaks reset and the cache empties here."""
    import torch

    for name, function in replay_allocator.statistics_functions(allocator).items():
        monkeypatch.setattr(torch.cuda.memory, name, function)
        monkeypatch.setattr(torch.cuda, name, function)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, live = run(allocator, [("a", "a", 3 * MIB), ("a", "b", 5 * MIB)])
    assert torch.cuda.memory_allocated() - base == 8 * MIB
    _free_all(allocator, live)
    assert torch.cuda.max_memory_allocated() - base == 8 * MIB and torch.cuda.memory_allocated() == base
    assert torch.cuda.memory_reserved() == torch.cuda.max_memory_reserved() == allocator.counters().reserved
    assert torch.cuda.memory_stats()["num_alloc_retries"] == 0
    cached = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    assert cached - torch.cuda.memory_reserved() == 10 * MIB  # the two freed blocks, in 2 MiB multiples
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.max_memory_allocated() == base


@pytest.mark.parametrize("seed", range(40))
def test_the_libraries_best_fit_places_every_buffer_where_the_python_reference_does(allocator, seed):
    from spec.placement import GREEDY_ORDERS, greedy_order, place_in_order
    from tests.test_placement import _buffers

    buffers = _buffers(seed)
    for key in GREEDY_ORDERS.values():
        order = greedy_order(buffers, key)
        assert allocator.place_in_order(buffers, order) == place_in_order(buffers, order)


def test_the_libraries_best_fit_lays_out_a_layered_step_as_the_python_reference(allocator):
    """A step's shape: per layer forward transients, a share saved until that layer's backward, backward
    transients; the traced layout of both placers is the same."""
    events = layered_step_events(layers=6, seed=1)
    reference = plan_layout(events)
    native = plan_layout(events, place=allocator.place_in_order)
    assert reference.planned > 1000
    assert np.array_equal(native.offsets, reference.offsets) and native.arena_bytes == reference.arena_bytes


def layered_step_events(layers: int, seed: int) -> np.ndarray:
    """Trace rows of a synthetic training step: per layer 60 forward requests (35% saved for the backward, the
    rest freed within a few requests) and 120 backward requests, sizes 1-64 MiB."""
    rng = np.random.default_rng(seed)
    events, live, saved, request = [], [], [[] for _ in range(layers)], 0

    def malloc():
        nonlocal request
        size = int(rng.integers(1, 65)) * MIB
        events.append((MALLOC, request, size, MAIN))
        request += 1
        return request - 1, size

    def free_some(keep: int):
        while len(live) > keep:
            r, size = live.pop(int(rng.integers(len(live))))
            events.append((FREE, r, size, MAIN))

    for layer in range(layers):
        for _ in range(60):
            (saved[layer] if rng.random() < 0.35 else live).append(malloc())
            free_some(4)
    for layer in reversed(range(layers)):
        for _ in range(120):
            live.append(malloc())
            free_some(6)
        live.extend(saved[layer])
        free_some(0)
    return np.array(events, dtype=np.int64)
