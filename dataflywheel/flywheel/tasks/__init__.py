"""Small tasks with checkable answers: prompt rows plus a reward (``synth/verifiers.RewardFn``)."""
