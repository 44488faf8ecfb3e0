"""Train a sparse autoencoder on one hook of a model with sae-lens's training runner.

    mechscope sae-train                                   # TopK (k 16), 1024 features, blocks.1.hook_resid_pre, 1M tokens
    mechscope sae-train --architecture standard --l1-coefficient 2 --training-tokens 200000
    mechscope sae-train --data corpus.txt --hook blocks.2.hook_resid_pre --checkpoints 4
    mechscope sae-train --resume runs/sae-train-.../sae/checkpoints/<id>/<tokens>   # continue from a checkpoint

Architectures: topk (--k active features per token), batchtopk (--k on average over a batch; saved as
JumpReLU), standard (ReLU with an L1 penalty, --l1-coefficient), jumprelu (--target-l0 through the
quadratic L0 loss). Data: --data (a .txt / .jsonl / token-id file or a datasets directory) or --n-tokens of
the bundled corpus, cut into rows of --context tokens that start with BOS; BOS positions are not trained
on. L0, MSE, explained variance and the dead-feature fraction are printed every --log-every steps
(stderr) and saved as curves (curves.csv, training_*.png); at the end the SAE is evaluated on --eval-tokens
held-out tokens (as `mechscope sae-eval`). The SAE is saved in sae-lens's format in RUN_DIR/sae (load it
with `--sae RUN_DIR/sae` or `SAE.load_from_disk`) with metadata that describes the model as it was run:
name, hook, context size, prepend_bos, and the weight processing measured from the model. --save-to
also copies cfg.json and sae_weights.safetensors into a directory (how the shipped SAE is made:
`make sae`). Needs --backend tl: sae-lens's runner drives a transformer-lens HookedTransformer.
"""
HELP = "train a sparse autoencoder with sae-lens (curves, checkpoints, correct metadata)"
ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu")  # = techniques.sae_training.ARCHITECTURES, without torch


def add_arguments(parser):
    from mechscope.commands.sae_eval import add_data_arguments

    parser.add_argument("--hook", default="blocks.1.hook_resid_pre", help="site to train on (default: %(default)s)")
    parser.add_argument("--architecture", default="topk", choices=ARCHITECTURES, help="(default: %(default)s)")
    parser.add_argument("--d-sae", type=int, default=1024, help="number of features (default: %(default)s)")
    parser.add_argument("--k", type=float, default=16, help="topk / batchtopk: active features (default: %(default)s)")
    parser.add_argument("--l1-coefficient", type=float, default=2.0, help="standard: L1 penalty (default: %(default)s)")
    parser.add_argument("--target-l0", type=float, default=16, help="jumprelu: target L0 (default: %(default)s)")
    parser.add_argument("--training-tokens", type=int, default=1_000_000, help="(default: %(default)s)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per training step (default: %(default)s)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the recipe's, 1e-2, cosine to 1e-3)")
    add_data_arguments(parser, n_tokens=1_000_000)
    parser.add_argument("--eval-tokens", type=int, default=50_000, help="held-out tokens evaluated at the end; 0 "
                        "skips (default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=25, help="steps between curve points (default: %(default)s)")
    parser.add_argument("--checkpoints", type=int, default=0, help="checkpoints saved during training (default: none)")
    parser.add_argument("--resume", help="a checkpoint directory of an earlier run to continue from")
    parser.add_argument("--save-to", help="also copy the SAE's cfg.json and weights into this directory")


def _check(args):
    from mechscope.errors import BadInput

    if not 1 <= args.d_sae <= 1_000_000:
        raise BadInput("--d-sae must be in 1..1,000,000")
    if args.architecture in ("topk", "batchtopk") and not 1 <= args.k <= args.d_sae:
        raise BadInput(f"--k must be in 1..{args.d_sae} (--d-sae)")
    for name in ("l1_coefficient", "target_l0", "lr"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and value < float("inf")):
            raise BadInput(f"--{name.replace('_', '-')} must be a positive finite number")
    if not 1 <= args.batch_tokens <= 1_000_000:
        raise BadInput("--batch-tokens must be in 1..1,000,000")
    if not args.batch_tokens <= args.training_tokens <= 10_000_000_000:
        raise BadInput("--training-tokens must be at least --batch-tokens (one step)")
    if not 0 <= args.eval_tokens <= 10_000_000 or args.log_every < 1 or not 0 <= args.checkpoints <= 100:
        raise BadInput("--eval-tokens must be in 0..10,000,000, --log-every >= 1, --checkpoints in 0..100")
    if args.resume:
        _check_resume(args)
    if args.save_to:
        _check_save_to(args.save_to)


CHECKPOINT_FILES = ("cfg.json", "sae_weights.safetensors", "trainer_state.pt", "activations_store_state.safetensors")


def _check_resume(args) -> None:
    """BadInput unless --resume is a whole checkpoint of an SAE like the one asked for (before any training)."""
    from mechscope import inputs
    from mechscope.errors import BadInput
    from mechscope.paths import user_path

    path = user_path(args.resume, "--resume")
    if not (path / "cfg.json").is_file():
        raise BadInput(f"--resume {args.resume} is not a checkpoint directory (no cfg.json); pass one under "
                       f"RUN_DIR/sae/checkpoints/")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise BadInput(f"--resume {args.resume} is not a whole checkpoint (no {', '.join(missing)}); pass another "
                       f"one under RUN_DIR/sae/checkpoints/")
    cfg = inputs.read_json(path / "cfg.json", "--resume's")
    meta = cfg.get("metadata") if isinstance(cfg, dict) else None
    if not isinstance(meta, dict):
        raise BadInput(f"--resume {args.resume}: cfg.json is not an SAE configuration written by sae-lens")
    saved = {"--hook": meta.get("hook_name"), "--d-sae": cfg.get("d_sae"), "--architecture": meta.get(
        "training_architecture", cfg.get("architecture"))}
    asked = {"--hook": args.hook, "--d-sae": args.d_sae, "--architecture": args.architecture}
    differ = [f"{k} {asked[k]} (the checkpoint has {saved[k]})" for k in asked if saved[k] != asked[k]]
    if differ:
        raise BadInput(f"--resume {args.resume} is a checkpoint of another SAE: {'; '.join(differ)}; pass the "
                       f"checkpoint's settings")


def _check_save_to(target: str) -> None:
    """BadInput unless --save-to is a new or empty directory that can be made (an SAE there is never overwritten)."""
    import os

    from mechscope.errors import BadInput
    from mechscope.paths import user_path

    path = user_path(target, "--save-to")
    if path.exists() and not path.is_dir():
        raise BadInput(f"--save-to {target} is a file; pass a new directory")
    if path.is_dir() and any(path.iterdir()):
        raise BadInput(f"--save-to {target} already exists and is not empty (it would overwrite the SAE there); "
                       f"pass a new directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"--save-to {target}: {probe} is not a writable directory; pass another directory")


def _check_resume_fits(args, engine) -> None:
    """BadInput unless the --resume checkpoint was trained on this model's activations (width and name)."""
    import json
    from pathlib import Path

    from mechscope.errors import BadInput
    from mechscope.techniques import sae as saes

    cfg = json.loads((Path(args.resume).expanduser() / "cfg.json").read_text())
    width, name = saes.site_width(engine, args.hook), cfg["metadata"].get("model_name")
    if cfg.get("d_in") != width or name not in (None, engine.cfg.model_name):
        raise BadInput(f"--resume {args.resume} is a checkpoint for {name} (d_in {cfg.get('d_in')}), not "
                       f"{engine.cfg.model_name} at {args.hook} (width {width}); pass --model {name}")


def run(ctx):
    import shutil
    import sys
    import time
    from pathlib import Path

    from mechscope import plotting
    from mechscope.commands.sae_eval import eval_outputs, rows_from_args
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_training

    args = ctx.args
    _check(args)  # before the model loads and long before training ends
    engine = ctx.engine
    sae_training.require_trainable(engine, args.hook)
    if args.resume:
        _check_resume_fits(args, engine)
    args.context = 64 if args.context is None else args.context
    rows = rows_from_args(ctx, seed=args.seed)
    held_out = None
    from mechscope.errors import BadInput

    if args.eval_tokens and args.data:  # held out from the user's data before training
        n_eval = max(1, args.eval_tokens // rows.shape[1])
        if n_eval >= len(rows):
            raise BadInput(f"--data has {len(rows)} rows of {rows.shape[1]} tokens: too few to hold out --eval-tokens "
                           f"{args.eval_tokens} and train; pass a lower --eval-tokens (or 0) or more data")
        rows, held_out = rows[:-n_eval], rows[-n_eval:]
    sparsity = {"topk": args.k, "batchtopk": args.k, "standard": args.l1_coefficient, "jumprelu": args.target_l0}

    def show(p):
        print(f"step {p['step']}  tokens {p['tokens']}  L0 {p['l0']:.2f}  MSE {p['mse']:.4g}  explained variance "
              f"{p['explained_variance']:.3f}  dead in the training window {p['dead_fraction_training_window']:.1%}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    out = ctx.run_dir / "sae"
    sae, curves = sae_training.train_on_model(
        engine, args.hook, rows, out, args.architecture, args.d_sae, sparsity[args.architecture], args.training_tokens,
        args.batch_tokens, args.lr, args.seed, dataset_name=args.data or f"mechscope-toy corpus (seed {args.seed}, {args.n_tokens} tokens)",
        n_checkpoints=args.checkpoints, resume_from=args.resume, log_every=args.log_every, print_fn=show)
    seconds = time.perf_counter() - started
    with open(ctx.run_dir / "curves.csv", "w") as f:
        f.write(",".join(curves[0]) + "\n")
        f.writelines(",".join(f"{v:.6g}" for v in p.values()) + "\n" for p in curves)
    tokens = [p["tokens"] for p in curves]
    plots = [plotting.lines({label: [p[key] for p in curves]}, ctx.run_dir / f"training_{key}.png", x=tokens,
                            title=f"{args.architecture} SAE at {args.hook}", xlabel="training tokens", ylabel=label)
             for key, label in (("l0", "L0 (active features per token)"), ("explained_variance", "explained variance"),
                                ("dead_fraction_training_window", "dead-feature fraction (training window)"))]
    result = {"summary": {}, "text": ""}
    if args.eval_tokens:
        if held_out is None:
            held_out = saes.corpus_rows(engine, args.eval_tokens, rows.shape[1], seed=args.seed + 1000,   # disjoint
                                        exclude=saes.training_sentences(args.n_tokens, rows.shape[1], args.seed))
        result = eval_outputs(ctx.run_dir, sae, sae_training.evaluate(engine, sae, held_out))
    notes = []
    if args.save_to:  # checked before training; a failure now keeps the run (and its SAE) and says so
        try:
            _check_save_to(args.save_to)
            target = Path(args.save_to).expanduser()
            target.mkdir(parents=True, exist_ok=True)
            for name in ("cfg.json", "sae_weights.safetensors"):
                shutil.copy(out / name, target / name)
        except (BadInput, OSError) as e:
            notes.append(f"the SAE was not copied to --save-to ({getattr(e, 'strerror', None) or e}); it is in {out}")
    checkpoints = sorted(str(p.relative_to(ctx.run_dir)) for p in (out / "checkpoints").glob("*/*") if p.is_dir())
    throughput = args.training_tokens / seconds
    summary = {"sae_dir": str(out), "hook": args.hook, "architecture": args.architecture, "d_sae": args.d_sae,
               "training_tokens": args.training_tokens, "corpus_tokens": int(rows.numel()),
               "epochs": round(args.training_tokens / rows.numel(), 2), "seconds": round(seconds, 1),
               "tokens_per_second": round(throughput), "final": curves[-1], "checkpoints": checkpoints,
               "evaluation": result["summary"], "saved_to": args.save_to,
               "files": ["curves.csv", *[p.name for p in plots], *result["summary"].get("files", [])]}
    text = (f"trained {args.architecture} SAE ({args.d_sae} features) at {args.hook} on {args.training_tokens} tokens "
            f"in {seconds:.0f} s ({throughput:.0f} tokens/s): final L0 {curves[-1]['l0']:.2f}, explained variance "
            f"{curves[-1]['explained_variance']:.3f}\n" + result["text"] + f"\nSAE: {out}")
    return {"summary": summary, "text": text, "curves": curves, "evaluation": result.get("summary"),
            "notes": notes}


def headline(summary: dict) -> str:
    """The finding in one sentence: the trained SAE's final training numbers and its held-out evaluation."""
    from mechscope.findings import ci, num

    final, e = summary["final"], summary["evaluation"]
    text = (f"trained a {summary['architecture']} SAE ({summary['d_sae']} features) at {summary['hook']} on "
            f"{summary['training_tokens']} tokens: final L0 {num(final['l0'])}, explained variance "
            f"{num(final['explained_variance'], 3)}")
    if e:
        text += (f"; held out: CE loss recovered {num(e['ce_recovered'], 3)}{ci(e['ce_recovered_ci'], digits=3)} "
                 f"({e['n_tokens']} tokens)")
    return text
