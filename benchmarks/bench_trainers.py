"""One GRPO step of ours (`rlhf grpo`) against TRL's `GRPOTrainer`, on the same model, prompts, group size,
lengths, batch and optimizer: wall time per step split into generation / log-probs / update, and peak memory.

    python benchmarks/bench_trainers.py [--out FILE] [--steps 3] [--completion 128] [--providers ours,trl]

Default shape (the CPU target): a Llama-style model built here (vocabulary 32000, hidden 256, 4 layers, 4 heads),
8 prompts of 16 tokens x G = 8 samples, completions of up to ``--completion`` tokens (a random model samples EOS
with probability ~1/V per token, so nearly all reach the limit), one iteration per batch, micro-batches of 8
samples, one AdamW step per batch (lr 1e-6), beta 0 (no reference model), temperature 1, activation checkpointing
on for both (``--checkpointing on``, TRL's default; ``off`` turns it off for both). Each provider runs in its own
process: the timing run times steps 2..N (step 1 warms up), a second run profiles the tensor memory of two steps
(the CPU profiler's raw allocation and free records, so the C allocator's page reuse does not blur it; the
gradients and optimizer states are allocated in step 1 for both, so both peaks include them). TRL is optional:
installed only for this benchmark (``pip install trl``); without it its row says so. ``--memory-only`` skips
the timing runs.

Phases. Ours: generation = ``sample_step`` (all G samples of a prompt in one ``generate`` call, with the sampler's
log-probs recorded, and the reward), log-probs = the no-grad "old" log-prob pass, update = ``grpo_update``. TRL:
generation = its ``_generate``, log-probs = its no-grad ``_get_per_token_logps_and_entropies`` calls, update = the
rest of the step (its loss forward/backward and the optimizer step, plus reward scoring).

On a GPU: ``--device cuda --vocab 128256 --hidden 2048 --layers 16 --completion 512 --prompts 16`` (a
Llama-3.2-1B-sized head and body); add ``--dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = 32000  # vocabulary: word tokens w0 .. w31999 (ids 4 ..), plus pad, bos, eos, unk


def build_assets(root: Path, args) -> dict:
    """A WordLevel tokenizer, a random Llama of the chosen shape (saved), and the prompts file."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(args.vocab - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    prompts = [
        {"prompt": " ".join(f"w{rng.randrange(args.vocab - 4)}" for _ in range(16))} for _ in range(args.prompts)
    ]
    with open(root / "prompts.jsonl", "w") as f:
        for row in prompts * 4:  # enough rows for every step
            f.write(json.dumps(row) + "\n")
    return {"model": str(root / "model"), "prompts": str(root / "prompts.jsonl")}


def reward(prompts, completions, **_):
    """Cheap and deterministic: the share of distinct words of the completion."""
    return [len(set(c.split())) / max(len(c.split()), 1) for c in completions]


# ---------------------------------------------------------------------------------------------------- ours


def run_ours(assets: dict, args, steps: int, profile: bool) -> dict:
    from contextlib import nullcontext

    import torch

    from benchmarks.common import cpu_peak_extra_bytes
    from rlhf import grpo
    from rlhf.grpo_core import GRPOConfig, resolve_recipe
    from rlhf.models import LMHead, load_tokenizer
    from rlhf.rewards import RewardFunction
    from rlhf.train import StepContext, build_optimizer

    cfg = resolve_recipe(GRPOConfig(
        model=assets["model"], dataset=assets["prompts"], prompts_per_step=args.prompts, num_generations=8,
        max_completion_length=args.completion, max_prompt_length=64, batch_size=8, num_iterations=1, beta=0.0,
        lr=1e-6, device=args.device, dtype=args.dtype, eval_fraction=0.0, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=args.checkpointing == "on",
    ))  # fmt: skip
    device = torch.device(args.device)
    tokenizer = load_tokenizer(assets["model"])
    rows = grpo.load_prompts(cfg, tokenizer, log=lambda *_: None)[0]
    policy, _ = grpo.build_models(cfg, tokenizer, device)
    optimizer = build_optimizer(policy, cfg)
    head = LMHead.from_config(cfg, temperature=cfg.temperature)
    functions = [RewardFunction("distinct", 1.0, lambda p, c, cols, b: reward(p, c))]
    phases = []

    def one_step(step):
        t = [time.perf_counter()]
        ctx = StepContext(step, rows[: args.prompts], {"policy": policy}, {"policy": optimizer}, nullcontext, device,
                          False)  # fmt: skip
        local, _ = grpo.sample_step(policy, tokenizer, ctx.rows, cfg, functions, rows, step=step, first=0)
        local["group"] = torch.arange(args.prompts).repeat_interleave(8).to(device)
        sync(device)
        t.append(time.perf_counter())
        local = grpo.add_logprobs(policy, False, local, cfg, head)
        sync(device)
        t.append(time.perf_counter())
        local["advantages"] = grpo.advantages(
            local["rewards"].float(), local["group"], cfg.advantage, cfg.scale_rewards
        )
        grpo.grpo_update(ctx.models, ctx.optimizers, local, cfg, head, seed=step)
        sync(device)
        t.append(time.perf_counter())
        phases.append([b - a for a, b in zip(t, t[1:])])

    if profile:
        return {"peak_bytes": cpu_peak_extra_bytes(lambda: [one_step(s) for s in range(2)])}
    for step in range(steps):
        one_step(step)
    return summarize(phases[1:])


# ---------------------------------------------------------------------------------------------------- TRL


def run_trl(assets: dict, args, steps: int, profile: bool) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.common import cpu_peak_extra_bytes

    with open(assets["prompts"]) as f:
        rows = [json.loads(line) for line in f]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=args.device == "cpu", per_device_train_batch_size=8,
        gradient_accumulation_steps=args.prompts, num_generations=8, max_completion_length=args.completion,
        num_iterations=1, beta=0.0, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, max_steps=2 if profile else steps, logging_steps=1, report_to=[],
        save_strategy="no", bf16=args.dtype == "bfloat16", temperature=1.0, top_p=1.0, disable_tqdm=True,
        shuffle_dataset=False, seed=0, gradient_checkpointing=args.checkpointing == "on",
    )  # fmt: skip
    trainer = GRPOTrainer(model=assets["model"], reward_funcs=reward, args=config,
                          train_dataset=datasets.Dataset.from_list(rows))  # fmt: skip
    timers = {"generate": 0.0, "logps": 0.0}

    def timed(name, fn, only_no_grad=False):
        def wrapper(*a, **k):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*a, **k)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(torch.device(args.device))
            timers[name] += time.perf_counter() - t0
            return out

        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._get_per_token_logps_and_entropies = timed("logps", trainer._get_per_token_logps_and_entropies, True)
    phases = []

    class Steps(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()
            timers.update(generate=0.0, logps=0.0)

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - self.t0
            phases.append([timers["generate"], timers["logps"], total - timers["generate"] - timers["logps"]])

    trainer.add_callback(Steps())
    if profile:
        return {"peak_bytes": cpu_peak_extra_bytes(trainer.train)}
    trainer.train()
    return summarize(phases[1:])


# ---------------------------------------------------------------------------------------------------- driver


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def summarize(phases: list[list[float]]) -> dict:
    med = [statistics.median(p[i] for p in phases) for i in range(3)]
    return {"generation_s": med[0], "logprobs_s": med[1], "update_s": med[2], "step_s": sum(med)}


def child(args) -> None:
    assets = json.loads(args.assets)
    run = {"ours": run_ours, "trl": run_trl}[args.child]
    print("RESULT " + json.dumps(run(assets, args, args.steps, args.profile)))


def measure(provider: str, assets: dict, args, profile: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        provider,
        "--assets",
        json.dumps(assets),
        "--steps",
        str(args.steps),
        "--completion",
        str(args.completion),
        "--prompts",
        str(args.prompts),
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--checkpointing",
        args.checkpointing,
    ]
    if profile:
        cmd.append("--profile")
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1] if (out.stderr or out.stdout) else "?"}
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", default="ours,trl")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--completion", type=int, default=128)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--vocab", type=int, default=WORDS)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--checkpointing", choices=["on", "off"], default="on",
                   help="activation checkpointing, for both trainers (on: TRL's default)")  # fmt: skip
    p.add_argument("--memory-only", action="store_true", help="skip the timing runs")
    p.add_argument("--out")
    p.add_argument("--child")
    p.add_argument("--assets")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    if args.child:
        return child(args)
    from benchmarks.common import environment, fmt_mem, publish

    root = Path(tempfile.mkdtemp())
    assets = build_assets(root, args)
    results = {}
    for provider in args.providers.split(","):
        if provider == "trl":
            try:
                import trl  # noqa: F401
            except ImportError:
                results[provider] = {"error": "TRL is not installed (pip install trl): skipped"}
                continue
        timing = {} if args.memory_only else measure(provider, assets, args, False)
        results[provider] = {**timing, **measure(provider, assets, args, True)}
    heading = (f"One GRPO step: {args.prompts} prompts x G=8, completions of {args.completion} tokens, V={args.vocab}, "
               f"H={args.hidden}, {args.layers} layers, {args.dtype}, {args.device}, activation checkpointing "
               f"{args.checkpointing}")  # fmt: skip
    lines = [f"### {heading}", "", "| trainer | step (s) | generation (s) | log-probs (s) | update (s) | peak memory |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | |")
            continue
        times = [f"{r[k]:.2f}" if k in r else "-" for k in ("step_s", "generation_s", "logprobs_s", "update_s")]
        lines.append(f"| {name} | {' | '.join(times)} | {fmt_mem(r.get('peak_bytes'))} |")
    if all("error" not in r for r in results.values()) and {"ours", "trl"} <= set(results):
        o, t = results["ours"], results["trl"]
        speed = f"{t['step_s'] / o['step_s']:.2f}x faster per step, " if "step_s" in o else ""
        lines += ["", f"ours / TRL: {speed}{o['peak_bytes'] / t['peak_bytes']:.2f}x the peak memory"]
    publish("bench_trainers", "\n".join(lines), args.out)
    print(json.dumps({"environment": environment(), "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
