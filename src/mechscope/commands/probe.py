"""Linear probes per layer: is a label linearly decodable from the residual stream, and where?

    mechscope probe --task sentiment                 # built-in dataset for the bundled model
    mechscope probe --task ioi-io --random-model     # which name is the IO? + a random-init-model control
    mechscope probe --data labels.jsonl --position last --ci bootstrap

--data: JSONL lines {"prompt": ..., "label": ..., "position": optional} or a CSV with a header
prompt,label[,position]. A position is "last", a token index (0 is BOS; negative counts from the end)
or a word (its last occurrence in the prompt, one token); a row's own "position" beats --position.

Each site (resid_pre of every layer, then the final resid_post) gets a logistic-regression probe:
train / validation / test split (stratified, seeded), validation picks the L2 strength, test accuracy
is reported with a 95% interval. Controls: shuffled labels (chance), optionally a random-init model of
the same config (what the tokens alone give away). Writes probe.csv and accuracy_by_layer.png.
"""
HELP = "linear probes per layer with controls and confidence intervals"

MAX_EXAMPLES = 20_000


def add_arguments(parser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="JSONL or CSV file of prompts and labels")
    source.add_argument("--task", choices=("sentiment", "ioi-io", "ioi-order"),
                        help="built-in dataset for the bundled model (default: sentiment when --data is absent)")
    parser.add_argument("--n", type=int, default=400, help="examples drawn for --task (default: %(default)s)")
    parser.add_argument("--position", default="last", help="last, a token index, or a word (default: %(default)s)")
    parser.add_argument("--split", default="0.6,0.2,0.2", help="train,validation,test fractions (default: %(default)s)")
    parser.add_argument("--l2", default="1e-4,1e-3,1e-2,1e-1,1",
                        help="L2 strengths tried; validation picks one (default: %(default)s)")
    parser.add_argument("--ci", choices=("wilson", "bootstrap"), default="wilson",
                        help="95%% interval on test accuracy (default: %(default)s)")
    parser.add_argument("--random-model", action="store_true",
                        help="also probe a random-init model of the same config (control)")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (default: %(default)s)")


def _floats(text: str, what: str) -> list[float]:
    from mechscope.inputs import float_list

    return float_list(text, what)


def read_examples(path: str) -> list[dict]:
    """Rows {"prompt", "label", "position"?} from a JSONL or CSV file."""
    import csv
    import json
    from pathlib import Path

    from mechscope.errors import BadInput

    from mechscope.inputs import read_text

    file = Path(path)
    text = read_text(file, "data file")
    if file.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadInput(f"{path}:{n} is not JSON ({e.msg}); write one object per line, "
                                   f'e.g. {{"prompt": "...", "label": "..."}}') from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("prompt") or row.get("label") in (None, ""):
            raise BadInput(f"{path}: example {n} needs a non-empty 'prompt' and 'label' (got {str(row)[:80]})")
    if not rows:
        raise BadInput(f"{path} holds no examples")
    if len(rows) > MAX_EXAMPLES:
        raise BadInput(f"{path} holds {len(rows)} examples; at most {MAX_EXAMPLES} (subsample it)")
    return rows


def run(ctx):
    from mechscope import inputs, plotting
    from mechscope.errors import BadInput
    from mechscope.techniques import probing

    args = ctx.args
    fractions = _floats(args.split, "--split")
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise BadInput(f"--split {args.split!r} must be three positive fractions summing to 1, e.g. 0.6,0.2,0.2")
    l2_grid = _floats(args.l2, "--l2")
    if not l2_grid or min(l2_grid) < 0:
        raise BadInput("--l2 needs one or more non-negative strengths, e.g. 1e-3,1e-2,1e-1")
    if args.batch_size < 1:
        raise BadInput("--batch-size must be at least 1")
    if args.data:
        examples = read_examples(args.data)
    else:
        if not 10 <= args.n <= MAX_EXAMPLES:
            raise BadInput(f"--n must be in 10..{MAX_EXAMPLES}")
        prompts, labels = probing.task_dataset(args.task or "sentiment", args.n, args.seed)
        examples = [{"prompt": p, "label": y} for p, y in zip(prompts, labels)]

    model = ctx.model
    rows = [inputs.tokens(model, str(e["prompt"]))[0].cpu() for e in examples]
    own = [e.get("position") not in (None, "") for e in examples]  # a row's own position beats --position
    positions = [probing.resolve_position(model, r, e["position"] if mine else args.position)
                 for r, e, mine in zip(rows, examples, own)]
    result = probing.probe_layers(model, rows, positions, [str(e["label"]) for e in examples], seed=args.seed,
                                  fractions=fractions, l2_grid=l2_grid, ci=args.ci,
                                  random_model=args.random_model, batch_size=args.batch_size)

    table = result.rows()
    labels = probing.site_labels(model)
    with open(ctx.run_dir / "probe.csv", "w") as f:
        f.write(",".join(table[0]) + "\n")
        f.writelines(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()) + "\n"
                     for row in table)
    curves = {"probe": (result.accuracy, *zip(*result.ci)),
              "shuffled labels": (result.shuffled_accuracy, *zip(*result.shuffled_ci))}
    if result.random_model_accuracy is not None:
        curves["random-init model"] = (result.random_model_accuracy, *zip(*result.random_model_ci))
    plot = plotting.lines(
        curves, ctx.run_dir / "accuracy_by_layer.png", x_labels=labels,
        reference=result.chance, reference_label="chance (majority class)", ylabel=f"test accuracy ({args.ci} 95% CI)",
        xlabel="residual stream site", title=f"linear probe: {args.task or args.data or 'sentiment'}")
    best = max(range(len(labels)), key=lambda i: result.accuracy[i])
    columns = ["site", "accuracy", "ci_low", "ci_high", "shuffled_accuracy"] + (
        ["random_model_accuracy"] if result.random_model_accuracy is not None else [])
    summary = {
        "task": args.task or ("sentiment" if not args.data else None), "data": args.data,
        "classes": result.classes[:20], "n_train": result.n_train, "n_val": result.n_val, "n_test": result.n_test,
        "chance": round(result.chance, 4), "best_site": labels[best], "best_accuracy": round(result.accuracy[best], 4),
        "columns": columns,  # one compact row per site (bounded output on 80-layer models); probe.csv has all
        "layers": [[label] + [round(row[c], 3) for c in columns[1:]] for label, row in zip(labels, table)],
        "files": ["probe.csv", plot.name],
    }
    lines = [f"probe test accuracy (n_test={result.n_test}, chance {result.chance:.2f}, {args.ci} 95% CI):"]
    for label, r in zip(labels, table):
        lines.append(f"  {label:>8}: {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                     f"  shuffled {r['shuffled_accuracy']:.3f}"
                     + (f"  random-model {r['random_model_accuracy']:.3f}" if "random_model_accuracy" in r else ""))
    text = "\n".join(lines)
    return {"summary": summary, "text": text, "rows": table, "sites": result.sites, "site_labels": labels,
            "ci": result.ci, "shuffled_ci": result.shuffled_ci, "random_model_ci": result.random_model_ci,
            "positions": positions}
