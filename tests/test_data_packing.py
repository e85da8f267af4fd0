import numpy as np
import pytest

from megatron_uni.data.batch import MODALITY_SPECIAL
from megatron_uni.data.packing import PackingSettings, PackingStats, materialize_row, plan_rows
from megatron_uni.data.sequence import TokenizedSample

PAD = 99


def documents(lengths):
    return ((i, n) for i, n in enumerate(lengths))


def fake_sample(ref, start, end):
    """Document ``ref`` holds tokens 1000*ref + position; its second half is maskable."""
    positions = np.arange(start, end)
    return TokenizedSample(tokens=1000 * ref + positions, maskable=positions % 2 == 1,
                           modality=np.zeros(end - start, np.int8))


def plan(lengths, **kw):
    settings = PackingSettings(**{"seq_length": 64, "block_size": 8, **kw})
    stats = PackingStats()
    return list(plan_rows(documents(lengths), settings, stats)), stats, settings


def test_documents_start_on_block_boundaries_and_never_cross_rows():
    lengths = [5, 17, 30, 64, 1, 9, 40, 23, 8]
    rows, stats, settings = plan(lengths)
    seen = []
    for row in rows:
        assert sum(settings.padded(s.end - s.start) for s in row) <= 64
        assert all(s.start == 0 and s.end == lengths[s.ref] for s in row)  # never split
        seen += [s.ref for s in row]
    assert seen == list(range(len(lengths)))
    assert stats.real_tokens == sum(lengths)
    assert stats.efficiency == pytest.approx(sum(lengths) / (64 * len(rows)))


def test_materialised_row_doc_ids_positions_and_padding():
    rows, _, settings = plan([5, 17, 30])
    out = materialize_row(rows[0], fake_sample, settings, PAD)
    # documents padded to 8, 24, 32 positions -> exactly one 64-token row
    assert out["doc_ids"].tolist() == [0] * 8 + [1] * 24 + [2] * 32
    assert out["position_ids"].tolist() == list(range(8)) + list(range(24)) + list(range(32))
    assert out["tokens"][:5].tolist() == [0, 1, 2, 3, 4] and (out["tokens"][5:8] == PAD).all()
    assert out["tokens"][8:25].tolist() == list(range(1000, 1017))
    assert (out["modality"][5:8] == MODALITY_SPECIAL).all()
    # block padding follows the last token's maskable flag (odd positions are maskable here):
    # docs 0 and 1 end on even positions 4 and 16, doc 2 on odd position 29
    assert not out["maskable"][5:8].any() and not out["maskable"][25:32].any()
    assert out["maskable"][62:64].all()


def test_row_padding_has_doc_id_minus_one():
    rows, stats, settings = plan([40, 40])
    assert len(rows) == 2
    out = materialize_row(rows[0], fake_sample, settings, PAD)
    assert (out["doc_ids"][40:] == -1).all() and (out["tokens"][40:] == PAD).all()
    assert not out["maskable"][40:].any()
    assert stats.row_pad_tokens == 2 * 24 and stats.document_pad_tokens == 0
    assert "efficiency 62.5%" in stats.summary()


def test_split_mode_cuts_at_block_boundary_and_fills_rows():
    rows, stats, settings = plan([40, 40, 40], split_samples=True)
    assert [[(s.ref, s.start, s.end) for s in r] for r in rows] == [
        [(0, 0, 40), (1, 0, 24)], [(1, 24, 40), (2, 0, 40)]]
    assert stats.split == 1 and stats.row_pad_tokens == 8
    out = materialize_row(rows[1], fake_sample, settings, PAD)
    assert out["tokens"][:16].tolist() == list(range(1024, 1040))
    assert out["position_ids"][:16].tolist() == list(range(16))  # restart for the continued piece


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_documents_counted_never_wrapped(policy):
    rows, stats, settings = plan([10, 100, 10], overlong=policy)
    segments = [s for r in rows for s in r]
    if policy == "drop":
        assert stats.dropped == 1 and stats.truncated == 0 and [s.ref for s in segments] == [0, 2]
    else:
        assert stats.truncated == 1 and stats.dropped == 0
        assert (1, 0, 64) in [(s.ref, s.start, s.end) for s in segments]
    assert all(s.end - s.start <= 64 for s in segments)


def test_settings_validated():
    with pytest.raises(ValueError, match="multiple of block_size"):
        PackingSettings(seq_length=60, block_size=8)
    with pytest.raises(ValueError, match="overlong policy"):
        PackingSettings(seq_length=64, block_size=8, overlong="wrap")


def test_lookahead_fills_rows_and_places_every_document_once():
    lengths = [40, 40, 24, 24, 16, 8, 40]
    in_order, strict, _ = plan(lengths)
    rows, stats, settings = plan(lengths, lookahead=4)
    assert [[s.ref for s in r] for r in rows] == [[0, 2], [1, 3], [4, 5, 6]]  # all full
    assert sorted(s.ref for r in rows for s in r) == list(range(len(lengths)))
    assert all(sum(settings.padded(s.end - s.start) for s in r) <= 64 for r in rows)
    assert len(rows) == 3 < len(in_order) == 4 and stats.efficiency == 1.0 > strict.efficiency
