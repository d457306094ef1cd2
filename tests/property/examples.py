"""How many examples the slowest property tests draw.

The coverage lane of .ci/run runs with `--hypothesis-profile=coverage`, and there they draw a quarter
of their examples: under coverage's tracer Hypothesis's own drawing runs about twice as slow (the
batch decoder fuzz: 7.5 s plain, 13 s traced even with nothing of streamdqn measured), and the whole
suite, run right after it, draws them all again without the tracer.
"""

from __future__ import annotations

from hypothesis import settings

COVERAGE_PROFILE = "coverage"
settings.register_profile(COVERAGE_PROFILE, max_examples=25)  # a quarter of Hypothesis's default 100


def examples(n: int) -> int:
    """`n`, scaled as the loaded profile's max_examples is to Hypothesis's default of 100."""
    return max(1, n * settings.default.max_examples // 100)
