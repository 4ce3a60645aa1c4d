"""Peak CPU memory of one reward-backprop step against K, the number of denoising steps with gradient:
flat in K when each step is checkpointed, linear without (fusedrl.bench.reward_backprop_memory; every
(K, policy) pair is the peak-RSS growth of a fresh child process).

    python benchmarks/bench_reward_backprop_memory.py --size small --jobs 2 --csv results.csv

The pytest case runs the tiny size (K = 1 and 4) and checks the shape of the curve."""

from __future__ import annotations

import sys

import pytest

from fusedrl.bench.reward_backprop_memory import format_table, main, measure


@pytest.mark.slow
def test_peak_memory_flat_in_k_when_checkpointed():
    rows = measure((1, 4), ("full", "none"), "tiny", jobs=2)
    print("\n" + format_table(rows))
    mb = {(r["checkpointing"], r["k"]): r["peak_growth_mb"] for r in rows}
    per_step_plain = (mb["none", 4] - mb["none", 1]) / 3
    assert per_step_plain > 5, f"without checkpointing each step with gradient should add activations: {mb}"
    # checkpointed: only the K input latents (4 x 4 x 32 x 32 fp32 = 64 KB each) are added per step
    assert abs(mb["full", 4] - mb["full", 1]) < 0.25 * (mb["none", 4] - mb["none", 1]), mb
    assert mb["full", 4] < mb["none", 4]


if __name__ == "__main__":
    sys.exit(main())
