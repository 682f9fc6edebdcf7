"""Judges for AI-feedback labelling (``rlhf label``): each scores the K responses of a prompt.

- ``gold``: the built-in tasks' programmatic reward (:func:`rlhf.rewards.build_reward_functions`' ``gold``);
- ``module:function``: ``fn(prompts, completions, **columns) -> list[float]``, as a GRPO reward function;
- a reward-model directory: the model's score of prompt + response;
- ``llm:<model>`` (a hub name or local path of any causal LM): a pairwise judge. The prompt, two responses and a
  rubric (a constitution: what makes an answer better) go into a template that asks which answer is better; the
  verdict is read from the next-token log-probabilities of the two answer letters (no generation):
  P(first better) = softmax over the logits of " A" and " B". Each pair is judged in both orders and the two
  probabilities averaged, which cancels a judge's bias towards a position; how often the two orders agree is
  reported. With K responses, a response's score is its mean probability of beating each of the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import torch

from .errors import UserError

DEFAULT_RUBRIC = (
    "Judge which answer is better: it answers the question asked, is correct, and is helpful, honest and harmless."
)
TEMPLATE = (
    "{rubric}\n\nQuestion: {prompt}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\nWhich answer is better, A or B?\nBetter:"
)
VERDICTS = (" A", " B")


def _text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


class ScoreJudge:
    """A judge that scores each response on its own (gold, a function, a reward model)."""

    def __init__(self, name: str, score_fn):
        self.name, self._score = name, score_fn
        self.agreement: list[bool] = []  # pairwise judges only

    def scores(self, prompt, responses: Sequence[str], columns: dict) -> list[float]:
        n = len(responses)
        try:
            return self._score([prompt] * n, list(responses), {k: [v] * n for k, v in columns.items()})
        except UserError:
            raise
        except Exception as err:  # a user's function: name it and the prompt
            raise UserError(f"judge {self.name!r} raised {type(err).__name__}: {err} (prompt {prompt!r})") from err


class LLMJudge:
    """A causal LM asked which of two answers is better (module docstring), in both orders."""

    def __init__(self, model, tokenizer, rubric: str = DEFAULT_RUBRIC, *, name: str = "llm"):
        self.model, self.tokenizer, self.rubric, self.name = model, tokenizer, rubric, name
        ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in VERDICTS]
        if any(len(i) == 0 for i in ids) or ids[0][0] == ids[1][0]:
            raise UserError(f"judge {name}: its tokenizer cannot tell the verdicts {VERDICTS} apart")
        self.verdict_ids = [i[0] for i in ids]  # the first token of each verdict
        self.agreement: list[bool] = []

    def render(self, prompt, a: str, b: str) -> str:
        return TEMPLATE.format(rubric=self.rubric, prompt=_text(prompt), a=a, b=b)

    @torch.no_grad()
    def first_better(self, texts: list[str]) -> torch.Tensor:
        """P(answer A better) ``(n,)`` for rendered judge prompts: softmax over the two verdict logits."""
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=True)
        device = next(self.model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        if self.tokenizer.padding_side == "left":
            last = torch.full((len(texts),), ids.shape[1] - 1, device=device)
        else:
            last = mask.sum(-1) - 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        pair = logits[torch.arange(len(texts), device=device), last][:, self.verdict_ids].float()  # (n, 2)
        return torch.softmax(pair, -1)[:, 0].cpu()

    def scores(self, prompt, responses: Sequence[str], columns: dict) -> list[float]:
        """Each response's mean probability of beating each other response, every pair judged in both orders."""
        pairs = list(combinations(range(len(responses)), 2))
        texts = [self.render(prompt, responses[i], responses[j]) for i, j in pairs]
        texts += [self.render(prompt, responses[j], responses[i]) for i, j in pairs]
        p = self.first_better(texts) if texts else torch.zeros(0)
        wins = [0.0] * len(responses)
        for n, (i, j) in enumerate(pairs):
            forward, swapped = float(p[n]), 1.0 - float(p[len(pairs) + n])  # both: P(i better than j)
            self.agreement.append((forward > 0.5) == (swapped > 0.5))
            wins[i] += (forward + swapped) / 2
            wins[j] += 1.0 - (forward + swapped) / 2
        return [w / max(len(responses) - 1, 1) for w in wins]


def build_judge(spec: str, *, rubric: str, device: torch.device, dtype: str = "float32", trust_remote_code=False):
    """The judge of ``spec`` (module docstring)."""
    from .rewards import RewardFunction, _checked, _gold, _import

    def checked(fn, name):
        def score(prompts, completions, columns):
            return _checked(RewardFunction(name, 1.0, fn), fn(prompts, completions, columns, None), len(prompts))

        return score

    if spec == "gold":
        return ScoreJudge("gold", checked(_gold, "gold"))
    if spec.startswith("llm:"):
        from .models import load_causal_lm, load_tokenizer

        path = spec.removeprefix("llm:")
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = load_causal_lm(path, tokenizer, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return LLMJudge(model.eval(), tokenizer, rubric, name=spec)
    if Path(spec).is_dir():
        return ScoreJudge(spec, reward_model_scores(spec, device, dtype, trust_remote_code))
    if ":" in spec:
        try:
            return ScoreJudge(spec, checked(_import(spec), spec))
        except UserError as err:  # the message of a reward-function spec, for a judge
            raise UserError(str(err).replace("reward function", "judge", 1)) from None
    raise UserError(f"judge {spec!r} is neither 'gold', llm:<model>, a reward model directory, nor module:function")


def reward_model_scores(path: str, device, dtype: str, trust_remote_code: bool):
    """A scoring function of a saved reward model: its reward of each prompt + response."""
    from .collators import SFTCollator
    from .data import prepare
    from .models import load_reward_model, load_tokenizer

    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_reward_model(path, tokenizer, dtype=dtype, device=device, trust_remote_code=trust_remote_code).eval()
    collate = SFTCollator(tokenizer.pad_token_id)

    @torch.no_grad()
    def score(prompts, completions, columns):
        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
        batch = collate(prepare(rows, tokenizer, "sft", max_length=100_000, log=lambda m: None))
        return model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu().tolist()

    return score
