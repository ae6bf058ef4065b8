"""What a data preparation reports of itself: one bar on a terminal, a few lines otherwise."""

from __future__ import annotations

import io

from metanet_jax.data._common import PreparationProgress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_one_line_per_stage():
    out = io.StringIO()
    progress = PreparationProgress("MNIST", stages=2, stream=out)
    progress.stage("preparing")
    progress.stage("grouping")
    progress.finish("cached in x.npz")
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["metanet_jax.data: MNIST: preparing", "metanet_jax.data: MNIST: grouping"]
    assert lines[2].startswith("metanet_jax.data: MNIST: cached in x.npz (") and len(lines) == 3
    assert "\r" not in out.getvalue()


def test_on_a_terminal_one_bar_rewritten_in_place():
    out = _Terminal()
    progress = PreparationProgress("Omniglot 'small1'", stages=2, stream=out)
    progress.stage("preparing")
    progress.stage("reading")
    progress.finish("done")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line on the screen
    frames = text.split("\r")[1:]
    assert [f.split("]")[0] for f in frames] == ["[" + "-" * 24, "[" + "#" * 12 + "-" * 12,
                                                 "[" + "#" * 24]  # fmt: skip
    assert "Omniglot 'small1': done (" in frames[-1]
