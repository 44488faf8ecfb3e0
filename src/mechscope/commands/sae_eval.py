"""Evaluate an SAE on held-out text: L0, explained variance, MSE, CE loss recovered, dead and dense features.

    mechscope sae-eval                                  # the shipped SAE on 50k held-out tokens of the bundled corpus
    mechscope sae-eval --sae runs/sae-train-.../sae --n-tokens 200000
    mechscope sae-eval --sae gpt2-small-res-jb:blocks.8.hook_resid_pre --model gpt2-small --data text.txt

Positions holding BOS / EOS / PAD are left out of every number. CE loss recovered is
(L_zero - L_spliced) / (L_zero - L_clean) of the next-token loss, with the hook's activation replaced
by the SAE's reconstruction (spliced) or by zeros (zero) at every non-special position, and a 95%
Fieller interval over rows (stats.ratio_interval). Dead: never active on the evaluation tokens; dense: active on more than
10% of them. An SAE trained on another model, hook, width or weight processing is refused. Writes
density.csv and density_histogram.png.

--sae: mechscope-toy (the SAE shipped for the bundled model), a directory written by sae.save_model /
`mechscope sae-train`, or RELEASE:SAE_ID from sae-lens's pretrained directory (needs the hub).
--data: a .txt file, a .jsonl file of {"text": ...} lines, a .pt / .npy tensor of token ids ([rows, seq],
each row starting with BOS, or 1-D), or a directory saved by `datasets` (tokens / input_ids / text column).
Without it: held-out sentences of the bundled corpus (a seed other than training's), disjoint from the
SAE's training text by sentence: the corpus is template language, so about 44% of another seed's sentences
occur verbatim in 1M training tokens; those are dropped (`held_out` in the summary says what was dropped).
The training text is read from the SAE's dataset_path ("mechscope-toy corpus (seed S, N tokens)", written by
`mechscope sae-train`; N defaults to 1,000,000 where it is missing, as for the shipped SAE).
"""
HELP = "evaluate an SAE: L0, explained variance, CE loss recovered, dead / dense features"

HELD_OUT_SEED = 1000  # the bundled corpus seed for evaluation text (training uses --seed, default 0)
TRAINING_TOKENS = 1_000_000  # sae-train's default --n-tokens, the shipped SAE's training text


def training_text(sae) -> tuple[int, int] | None:
    """(tokens, seed) of the bundled corpus the SAE was trained on, from its dataset_path; None for other data."""
    import re

    m = re.fullmatch(r"mechscope-toy corpus \(seed (\d+)(?:, (\d+) tokens)?\)", str(sae.cfg.metadata.dataset_path or ""))
    return (int(m.group(2) or TRAINING_TOKENS), int(m.group(1))) if m else None


def add_sae_argument(parser):
    parser.add_argument("--sae", default="mechscope-toy",
                        help="mechscope-toy (shipped), an SAE directory, or RELEASE:SAE_ID (default: %(default)s)")


def add_data_arguments(parser, n_tokens: int):
    parser.add_argument("--data", help="text / jsonl / token-id file or datasets directory (default: the bundled corpus)")
    parser.add_argument("--n-tokens", type=int, default=n_tokens,
                        help="tokens of the bundled corpus, or at most this many of --data (default: %(default)s)")
    parser.add_argument("--context", type=int, help="tokens per row, BOS included (default: the SAE's context size, or 64)")


def load_checked_sae(ctx):
    """The SAE of --sae, refused (BadInput) unless it fits the engine's model."""
    from mechscope.techniques import sae as saes

    sae = saes.load_sae(ctx.args.sae, device=str(ctx.engine.cfg.device))
    saes.check_fits(sae, ctx.engine)
    return sae


def rows_from_args(ctx, sae=None, seed: int = HELD_OUT_SEED, exclude: set[str] | None = None):
    """[rows, context] token ids from --data or the bundled corpus (--n-tokens, --context; without the
    sentences in exclude)."""
    from mechscope.errors import BadInput
    from mechscope.techniques import sae as saes

    args, engine = ctx.args, ctx.engine
    context = args.context if args.context is not None else (  # --context 0 is refused, not the default
        (sae.cfg.metadata.context_size if sae is not None else None) or 64)
    if not 2 <= context <= engine.cfg.n_ctx:
        raise BadInput(f"--context must be in 2..{engine.cfg.n_ctx} (the model's context)")
    if not 1 <= args.n_tokens <= 50_000_000:
        raise BadInput("--n-tokens must be in 1..50,000,000")
    if args.data:
        return saes.rows_from_file(engine, args.data, context)[: -(-args.n_tokens // context)]
    return saes.corpus_rows(engine, args.n_tokens, context, seed=seed, exclude=exclude)


def held_out_rows(ctx, sae):
    """(rows, note) for evaluating sae: --data as given, or bundled-corpus sentences (HELD_OUT_SEED) that do not
    occur in the SAE's training text."""
    from mechscope.techniques import sae as saes

    trained_on = training_text(sae)
    if ctx.args.data:
        return rows_from_args(ctx, sae), f"{ctx.args.data} as given (overlap with the SAE's training data not checked)"
    if trained_on is None:
        return rows_from_args(ctx, sae), (f"bundled corpus seed {HELD_OUT_SEED}; the SAE was not trained on the bundled "
                                          f"corpus, so no sentence was dropped")
    tokens, seed = trained_on
    context = ctx.args.context or sae.cfg.metadata.context_size or 64
    return rows_from_args(ctx, sae, exclude=saes.training_sentences(tokens, context, seed)), (
        f"bundled corpus seed {HELD_OUT_SEED}, every sentence that occurs in the SAE's training text (corpus seed "
        f"{seed}, {tokens:,} tokens) dropped: disjoint from training by sentence")


def add_arguments(parser):
    add_sae_argument(parser)
    add_data_arguments(parser, n_tokens=50_000)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward (default: %(default)s)")


def run(ctx):
    from mechscope.errors import BadInput
    from mechscope.techniques import sae_training

    if ctx.args.batch_size < 1:
        raise BadInput("--batch-size must be at least 1")
    sae = load_checked_sae(ctx)
    rows, note = held_out_rows(ctx, sae)
    result = sae_training.evaluate(ctx.engine, sae, rows, ctx.args.batch_size)
    out = eval_outputs(ctx.run_dir, sae, result)
    out["summary"]["held_out"] = note
    out["text"] += f"\n  evaluation text: {note}"
    return out


def eval_outputs(run_dir, sae, result) -> dict:
    """The result dict, text, density.csv and density_histogram.png of an evaluation (shared with sae-train)."""
    import math

    from mechscope import plotting
    from mechscope.techniques import sae as saes

    density = result.density
    with open(run_dir / "density.csv", "w") as f:
        f.write("feature,density\n")
        f.writelines(f"{i},{d:.6g}\n" for i, d in enumerate(density))
    log_density = [math.log10(d) for d in density if d > 0]
    plot = plotting.histogram(log_density, run_dir / "density_histogram.png",
                              title=f"feature density ({sum(d == 0 for d in density)} dead of {len(density)})",
                              xlabel="log10 fraction of tokens active", ylabel="features")
    numbers = {k: v for k, v in vars(result).items() if k != "density"}
    summary = {"sae": saes.describe(sae), **{k: round(v, 5) if isinstance(v, float) else v for k, v in numbers.items()},
               "files": ["density.csv", plot.name]}
    text = (f"{sae.cfg.architecture()} SAE at {sae.cfg.metadata.hook_name} ({sae.cfg.d_sae} features), "
            f"{result.n_tokens} tokens (BOS excluded):\n"
            f"  L0 {result.l0:.2f} [{result.l0_ci[0]:.2f}, {result.l0_ci[1]:.2f}]  explained variance "
            f"{result.explained_variance:.3f}  MSE {result.mse:.4g}\n"
            f"  CE loss {result.ce_clean:.4f} clean, {result.ce_spliced:.4f} spliced, {result.ce_zero:.4f} zero-ablated: "
            f"+{result.ce_loss_increase:.4f} nats [{result.ce_loss_increase_ci[0]:.4f}, {result.ce_loss_increase_ci[1]:.4f}] "
            f"with the SAE, {result.ce_recovered:.1%} recovered [{result.ce_recovered_ci[0]:.1%}, "
            f"{result.ce_recovered_ci[1]:.1%}]\n"
            f"  dead (never active on these tokens) {result.dead_fraction:.1%}  dense (> 10% of tokens) "
            f"{result.dense_fraction:.1%}")
    return {"summary": summary, "text": text, "density": density}


def headline(summary: dict) -> str:
    """The finding in one sentence: CE loss recovered, L0 and explained variance on held-out tokens."""
    from mechscope.findings import ci, num

    return (f"the SAE at {summary['sae']['hook_name']} recovers {num(summary['ce_recovered'], 3)}"
            f"{ci(summary['ce_recovered_ci'], digits=3)} of the CE loss, L0 {num(summary['l0'])}{ci(summary['l0_ci'])}, "
            f"explained variance {num(summary['explained_variance'], 3)} ({summary['n_tokens']} held-out tokens)")
