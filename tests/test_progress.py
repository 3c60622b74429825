"""The progress bar: it moves with every decoding step and settles on whole rows per batch."""

from __future__ import annotations

from batchgen.progress import Progress


def test_steps_move_the_bar_by_their_share_of_a_row(capsys):
    bar = Progress(total_rows=10, enabled=True, row_tokens=8)
    for _ in range(4):
        bar.step(2)  # two rows decoding, one token each, four steps
    assert bar.bar.n == 1.0 and bar.tokens == 8 and bar.tokens_per_second() > 0
    bar.update(2, 7)  # the batch of two rows is done: 7 tokens after stop-string trimming
    assert bar.bar.n == 2 and bar.tokens == 7
    bar.update(3, 0)  # rows skipped, or another worker's shard
    assert bar.bar.n == 5 and bar.tokens == 7
    bar.close()
    assert "5/10" in capsys.readouterr().err  # whole rows on the bar, never 4.999...
