"""The in-round progress line: phones done / sampled, elapsed, ETA; nothing counted under
user-level DP."""

from __future__ import annotations

from fedmilm.metrics.progress import RoundProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _progress(clock: Clock, secret: bool = False) -> tuple[RoundProgress, list[str]]:
    lines: list[str] = []
    progress = RoundProgress(server_round=2, rounds=5, phase="training", sampled=1000,
                             every_s=10, emit=lines.append, counts_secret=secret, clock=clock)
    return progress, lines


def test_a_line_every_interval_with_done_sampled_and_eta():
    clock = Clock()
    progress, lines = _progress(clock)
    for _ in range(250):
        clock.now += 0.02  # 250 replies in 5 s: no line yet
        progress.reply()
    assert lines == []
    clock.now = 112.0
    progress.tick()  # 12 s in, 250 of 1000 done: 36 s to go at that pace
    assert lines == ["round   2/5 | training | 250/1000 phones | 12 s elapsed, ETA 36 s"]
    progress.tick()
    assert len(lines) == 1  # not again before another 10 s


def test_under_user_level_dp_the_line_counts_nothing():
    clock = Clock()
    progress, lines = _progress(clock, secret=True)
    for _ in range(7):
        progress.reply()
    clock.now += 11
    progress.tick()
    assert len(lines) == 1 and "11 s elapsed" in lines[0]
    assert "7" not in lines[0] and "1000" not in lines[0]
