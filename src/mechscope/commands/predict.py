"""Top next tokens of a model on prompts (default: the bundled model's example prompts), or on a prompt set.

    mechscope predict
    mechscope predict --prompt "The capital of France is" --prompt "When Mary and John went to the store, John gave a drink to"
    mechscope predict --task ioi --n 200          # accuracy, answer probability and rank with 95% intervals
    mechscope predict --prompts my.jsonl          # strings or {"prompt", "answer"?, "wrong"?} per line

With answers (a task, or a file whose prompts carry them): top-1 accuracy, the answer's probability and
rank, and with wrong answers the logit difference, as means with 95% bootstrap intervals. Every prompt's
top tokens go to predictions.csv and result.json; the summary keeps the first 20.
"""
HELP = "a model's top next tokens on prompts (the bundled model's examples by default)"

EXAMPLES = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "The Eiffel Tower is in the city of",
    "The Colosseum is in the city of",
    "I love this! It's absolutely wonderful and",
    "I hate this! It's absolutely terrible and",
    "The quick brown fox jumps over the lazy",
]
SUMMARY_ROWS = 20


def add_arguments(parser):
    from mechscope.commands import prompt_sets

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", help="a prompt (repeatable); default: the example prompts")
    prompt_sets.add_arguments(parser, source, ("ioi", "facts", "sentiment"), what="answers")
    parser.add_argument("--top-k", type=int, default=5, help="tokens to show per prompt (default: %(default)s)")


def run(ctx):
    import torch

    from mechscope import runs, stats, tasks
    from mechscope.commands import prompt_sets
    from mechscope.errors import BadInput

    args, engine = ctx.args, ctx.engine
    if not 1 <= args.top_k <= engine.cfg.d_vocab:
        raise BadInput(f"--top-k must be in 1..{engine.cfg.d_vocab} (the vocabulary size), got {args.top_k}")
    ps = prompt_sets.load(ctx) or tasks.PromptSet("prompts", [tasks.Prompt(p) for p in args.prompt or EXAMPLES])
    rows, where = ps.tokens(engine)
    answers, wrongs = ps.answer_ids(engine)
    logits = []
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            tokens, lengths = tasks.padded(engine, rows[start:start + 64])
            logits.append(engine.run(tokens, positions=lengths - 1)[0].float().cpu())
    logits = torch.cat(logits)                                              # [n, d_vocab]
    probs = logits.softmax(-1)
    top = probs.topk(args.top_k)
    to_str = engine.to_single_str_token
    predictions = [{"prompt": p.text, "top": [(to_str(int(i)), round(float(v), 4)) for v, i in zip(vs, ids)]}
                   for p, vs, ids in zip(ps.prompts, top.values, top.indices)]
    summary = {"n_prompts": len(ps), "prompt_set": ps.name,
               "predictions": [{"prompt": r["prompt"], "top1": r["top"][0][0], "top1_prob": round(float(r["top"][0][1]), 4)}
                               for r in predictions[:SUMMARY_ROWS]],
               "files": ["predictions.csv"]}
    text = [f"{r['prompt']!r} -> " + ", ".join(f"{t} ({p:.2f})" for t, p in r["top"]) for r in predictions[:SUMMARY_ROWS]]
    if len(ps) > SUMMARY_ROWS:
        text.append(f"... {len(ps) - SUMMARY_ROWS} more in predictions.csv")
    if answers is not None:
        rows_index = torch.arange(len(ps))
        rank = (logits > logits[rows_index, answers][:, None]).sum(-1)
        per_prompt = {"correct": (rank == 0).float(), "answer_prob": probs[rows_index, answers],
                      "answer_rank": rank.float()}
        if wrongs is not None:
            per_prompt["logit_diff"] = logits[rows_index, answers] - logits[rows_index, wrongs]
        keep = ("mean", "ci_low", "ci_high")
        summary["answers"] = {name: {k: stats.summary(v, groups=ps.groups)[k] for k in keep}   # groups: templates
                              for name, v in per_prompt.items()}
        summary["answers"]["answer_rank"]["median"] = int(rank.median())
        for p, r, a, c in zip(predictions, rank.tolist(), answers.tolist(), per_prompt["correct"].tolist()):
            p.update(answer=to_str(a), answer_rank=r, correct=bool(c))
        acc = summary["answers"]["correct"]
        text.append(f"top-1 accuracy {acc['mean']:.3f} (95% CI {stats.ci_text(acc['ci_low'], acc['ci_high'])}) on {len(ps)} "
                    f"prompts; median answer rank {summary['answers']['answer_rank']['median']}")
    runs.write_csv(ctx.run_dir / "predictions.csv",
                   ([i, p["prompt"], p.get("answer", ""), p.get("answer_rank", ""), k, token, prob]
                    for i, p in enumerate(predictions) for k, (token, prob) in enumerate(p["top"])),
                   header=["prompt_index", "prompt", "answer", "answer_rank", "rank", "token", "prob"])
    return {"summary": summary, "predictions": predictions, "text": "\n".join(text)}


def headline(summary: dict) -> str:
    """The finding in one sentence: top-1 accuracy on answers, else the first prediction."""
    from mechscope.findings import ci, count, num

    n = count(summary["n_prompts"], "prompt") + (f", {summary['prompt_set']}" if summary["prompt_set"] != "prompts" else "")
    if "answers" in summary:
        acc = summary["answers"]["correct"]
        return (f"top-1 accuracy {num(acc['mean'], 3)}{ci(acc, digits=3)}, median answer rank "
                f"{summary['answers']['answer_rank']['median']} ({n})")
    first = summary["predictions"][0]
    return f"{first['prompt']!r} -> {first['top1']!r} (probability {num(first['top1_prob'])}; {n}; no answers to score)"
