"""A reward function for the multi-process GRPO runs (tests/test_distributed.py), imported by name as
``reward_fns:completion_length`` (the worker's directory is on sys.path): rewards that differ within a group even
for an untrained model, so every step has non-zero advantages."""


def completion_length(prompts, completions, **columns):
    return [len(c) / 10.0 for c in completions]


def user_gold(prompts, completions, *, word, **columns):
    """A user's gold reward for tests/test_rlhf_user_task.py: the length of the completion (tenths of a character)
    plus 3 per time it says the prompt row's ``word`` column (a required column: a run that does not pass the
    columns fails)."""
    return [len(c) / 10.0 + 3.0 * c.lower().split().count(w) for c, w in zip(completions, word, strict=True)]


def gold_returning_none(prompts, completions, **columns):
    return [None for _ in completions]
