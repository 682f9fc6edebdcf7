"""A reward function for the multi-process GRPO runs (tests/test_distributed.py), imported by name as
``reward_fns:completion_length`` (the worker's directory is on sys.path): rewards that differ within a group even
for an untrained model, so every step has non-zero advantages."""


def completion_length(prompts, completions, **columns):
    return [len(c) / 10.0 for c in completions]
