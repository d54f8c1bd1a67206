"""The CPU decode step's batch invariance, claim by claim: matrix products row-exact from
``MIN_ROWS`` rows, bucket-grouped attention independent of the rows sharing a call, and the
slot rearrangement (rows ordered by bucket) never changing a draw."""

import pytest
import torch

from prefdata.models import Sampling, load_model
from prefdata.models import continuous as C
from prefdata.testing import make_eos_prone

F = torch.nn.functional


@pytest.mark.parametrize("threads", [1, 2])
def test_matrix_products_are_row_exact_from_min_rows(threads):
    """The BLAS fact the CPU step rests on: a row of ``x @ W.T`` is bit-identical for any
    batch of ``MIN_ROWS`` to ``MAX_ROWS`` rows, wherever the row sits; longer decode steps
    with several threads run in pieces (``_row_pieces``), with the same rows again. Shapes
    of SmolLM2's layers (576 -> 1536 -> 576, the 1536-wide one is where MKL with threads
    changes kernels from 57 rows) and of a vocabulary slice."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        for out_features, in_features in [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 576)]:
            layer = torch.nn.Linear(in_features, out_features, bias=False)
            x = torch.randn(130, in_features)
            ref = F.linear(x[:C.MIN_ROWS], layer.weight)
            for rows in (C.MIN_ROWS + 1, 33, C.MAX_ROWS):
                assert torch.equal(F.linear(x[:rows], layer.weight)[:C.MIN_ROWS], ref)
            moved = F.linear(torch.cat([x[20:40], x[:C.MIN_ROWS]]), layer.weight)[20:]
            assert torch.equal(moved, ref)
            for rows in (C.MAX_ROWS + 1, 64, 130):
                with torch.no_grad(), C._row_pieces([layer], rows):
                    assert torch.equal(layer(x[:rows, None])[:C.MIN_ROWS, 0], ref)
    finally:
        torch.set_num_threads(previous)


def _attend(query, keys, values, columns):
    """``grouped_attention`` over rows laid out as given (one call per bucket run)."""
    token = C._GROUPS.set(C.attention_groups(columns, query.device))
    try:
        return C.grouped_attention(None, query, keys, values, None, scaling=0.125)[0]
    finally:
        C._GROUPS.reset(token)


def test_grouped_attention_depends_on_the_row_alone():
    """A row's attention output is bit-identical alone, among other rows of its bucket, at
    another slot and in a buffer of another capacity; rows past the groups get zeros."""
    torch.manual_seed(1)
    rows, heads, kv_heads, dim = 40, 9, 3, 64
    columns = sorted(torch.randint(1, 200, (rows,)).tolist(), key=C.bucket)
    query = torch.randn(rows + 5, heads, 1, dim)  # 5 idle rows after the busy ones
    keys, values = torch.randn(rows + 5, kv_heads, 256, dim), torch.randn(rows + 5, kv_heads, 256, dim)
    together = _attend(query, keys, values, columns)
    assert len({C.bucket(c) for c in columns}) >= 5  # several groups of several rows
    assert together[rows:].abs().sum() == 0 and together[:rows].abs().sum() > 0
    for row in range(rows):
        wide_k, wide_v = torch.randn(C.MIN_ROWS, kv_heads, 512, dim), torch.randn(C.MIN_ROWS, kv_heads, 512, dim)
        wide_k[3, :, :256], wide_v[3, :, :256] = keys[row], values[row]  # slot 3, capacity 512
        alone = _attend(query[row:row + 1], wide_k[3:4], wide_v[3:4], [columns[row]])
        assert torch.equal(alone[0], together[row])
    # the same rows in another order (still grouped by bucket) give the same rows
    order = sorted(range(rows), key=lambda r: (C.bucket(columns[r]), -r))
    shuffled = _attend(query[order], keys[order], values[order], [columns[r] for r in order])
    assert torch.equal(shuffled[:rows], together[order])
    # and the masked columns are really unread: changing them changes nothing
    keys[:, :, 200:] = 1e4
    assert torch.equal(_attend(query, keys, values, columns), together)


@pytest.fixture(scope="module")
def eos_prone(tiny_llama_factory, tmp_path_factory):
    """A tiny random Llama whose eos is likely (~12% a step): replies end at varied lengths."""
    return make_eos_prone(tiny_llama_factory(3), tmp_path_factory.mktemp("eos-prone-invariance"))


QUESTIONS = [[{"role": "user", "content": f"Question {i}: " + "word " * (5 * i)}] for i in range(6)]


def test_rows_move_between_buckets_without_changing_a_draw(eos_prone, monkeypatch):
    """With 4-column buckets rows cross into the next bucket every few steps and admissions
    land between runs, so rows are moved all the time: the draws stay those of one slot,
    and every step runs one attention call per bucket."""
    monkeypatch.setattr(C, "BUCKET", 4)
    calls, arranged = [], []
    groups = C.attention_groups

    def spy_groups(columns, device):
        found = groups(columns, device)
        calls.append(len(found))
        arranged.append(len({C.bucket(c) for c in columns}))
        return found

    monkeypatch.setattr(C, "attention_groups", spy_groups)
    moves = []
    move = C.SlotCache.move

    def spy_move(self, sources, targets, length):
        moves.append(len(sources))
        return move(self, sources, targets, length)

    monkeypatch.setattr(C.SlotCache, "move", spy_move)
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=24, seed=11)
    keys = [f"q{i}" for i in range(len(QUESTIONS))]

    def run(slots):
        lm = load_model(eos_prone, backend="transformers", device="cpu", dtype="float32", batch_size=slots)
        return lm.generate_replies(QUESTIONS, 3, sampling, keys=keys)

    many = run(12)
    assert calls == arranged and max(calls) >= 4  # one call per bucket, several buckets
    assert sum(moves) >= 10
    lengths = {len(g.text) for row in many for g in row}
    assert len(lengths) >= 6
    assert run(1) == many and run(5) == many
