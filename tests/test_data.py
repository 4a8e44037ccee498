"""Token sources and the resumable per-rank sampler."""

import numpy as np
import pytest

from spec.config import DataConfig
from orchestrator.data import RankSampler, TokenWindows, build_windows, corpus_bytes
from spec.errors import ConfigError


def test_bundled_corpus_is_a_few_hundred_kb_of_text():
    data = corpus_bytes()
    assert 200_000 < len(data) < 400_000
    assert bytes(data[:30]).decode() == "In the beginning God created t"


def test_windows_are_shifted_inputs_and_targets():
    sampler = RankSampler(TokenWindows(np.arange(10_000) % 256, 64, 0.0), 2, 0, 1, seed=0)
    inputs, targets = sampler.next_batch()
    assert inputs.shape == (2, 64)
    assert (targets[:, :-1] == inputs[:, 1:]).all()


def test_ranks_read_disjoint_windows_in_one_step():
    windows = TokenWindows(np.arange(64 * 100 + 1), 64, 0.0)
    firsts = [RankSampler(windows, 4, rank, 2, seed=3).next_batch()[0][:, 0].tolist() for rank in range(2)]
    assert not set(firsts[0]) & set(firsts[1])


def test_an_epoch_visits_every_training_window_once():
    windows = TokenWindows(np.arange(64 * 20 + 1), 64, 0.0)
    sampler = RankSampler(windows, 5, 0, 1, seed=1)
    starts = [int(x) for _ in range(4) for x in sampler.next_batch()[0][:, 0]]
    assert sorted(starts) == [64 * i for i in range(20)]


def test_resumed_sampler_continues_the_same_sequence():
    windows = TokenWindows(np.arange(64 * 50 + 1), 64, 0.0)
    straight = RankSampler(windows, 2, 1, 2, seed=7)
    expected = [straight.next_batch()[0] for _ in range(6)][3:]
    first = RankSampler(windows, 2, 1, 2, seed=7)
    for _ in range(3):
        first.next_batch()
    resumed = RankSampler(windows, 2, 1, 2, seed=7)
    resumed.load_state(first.state())
    for batch in expected:
        assert (resumed.next_batch()[0] == batch).all()


def test_world_size_change_keeps_the_global_position():
    windows = TokenWindows(np.arange(64 * 50 + 1), 64, 0.0)
    two_ranks = RankSampler(windows, 2, 0, 2, seed=7)
    for _ in range(3):
        two_ranks.next_batch()
    one_rank = RankSampler(windows, 4, 0, 1, seed=7)
    one_rank.load_state(two_ranks.state())
    assert one_rank.consumed_micro_batches == 3


def test_a_smaller_world_resumes_at_the_same_global_sequence():
    """2 ranks x 2 sequences for 3 steps = 12 sequences; one rank taking 2 per step continues at its 7th step with
    the windows rank 0 of the 2-rank run would have read next (a resume that ignored the world size would
    restart at its own 4th step, sequence 6)."""
    windows = TokenWindows(np.arange(64 * 50 + 1), 64, 0.0)
    rank0, rank1 = (RankSampler(windows, 2, rank, 2, seed=7) for rank in (0, 1))
    for _ in range(3):
        rank0.next_batch(), rank1.next_batch()
    one_rank = RankSampler(windows, 2, 0, 1, seed=7)
    one_rank.load_state(rank0.state())
    assert one_rank.consumed_micro_batches == 6
    assert (one_rank.next_batch()[0] == rank0.next_batch()[0]).all()


def test_token_file_is_memory_mapped(tmp_path):
    path = tmp_path / "tokens.bin"
    (np.arange(5000) % 1000).astype(np.uint16).tofile(path)
    windows = build_windows(DataConfig(source="tokens", path=str(path), seq_len=64, holdout_fraction=0.1),
                            vocab_size=1000, seed=0)
    assert isinstance(windows.stream, np.memmap)
    assert windows.num_train + windows.num_holdout == 4999 // 64
    assert windows.window(0, holdout=True)[0] == (windows.num_train * 64) % 1000


def test_token_ids_beyond_vocab_are_refused(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.array([1, 2, 70000], dtype=np.uint32))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_windows(DataConfig(source="tokens", path=str(path), seq_len=64), vocab_size=32000, seed=0)


def test_synthetic_windows_are_deterministic():
    config = DataConfig(source="synthetic", seq_len=128)
    a, b = build_windows(config, 1000, seed=5), build_windows(config, 1000, seed=5)
    assert (a.window(123) == b.window(123)).all() and not (a.window(123) == a.window(124)).all()
