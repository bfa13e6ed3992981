"""Reward functions for the trainer tests (passed as --reward-fn tests/reward_fns.py:NAME)."""


def varied(completion, example):
    # deterministic and different across samples, so every group has a learning signal
    return float(sum(map(ord, completion)) % 97) / 96
