"""nanorl: a small, readable, from-scratch codebase for reinforcement learning of language models.

The library modules (model, tokenizer, sampler, algos, tasks, dist, checkpoint) are imported
explicitly by their users; this file only holds the one exception type they share.
"""


class UserError(ValueError):
    """An error the user caused and can fix (bad path, bad flag, bad data line).

    The message is one line that names the problem and the fix. The command-line scripts print it
    as `error: <message>` and exit with code 2 instead of showing a traceback.
    """


class TrainingStopped(RuntimeError):
    """The run cannot go on (it diverged, or no group has a learning signal); the last checkpoint is intact."""
