"""Linear probes per layer: is a label linearly decodable from the residual stream, and where?

    mechscope probe --task sentiment                 # built-in dataset for the bundled model
    mechscope probe --task ioi-io --random-model     # which name is the IO? + a random-init-model control
    mechscope probe --prompts labels.jsonl --position last --ci bootstrap

--prompts (alias --data): JSONL / JSON list {"prompt", "label", "position"?, "group"?, "control"?} or a CSV
with a header prompt,label[,position,group,control]. A position is "last", a token index (0 is BOS; negative
counts from the end) or a word (its last occurrence in the prompt, one token); a row's own "position" beats
--position. "group" keeps prompts together on one side of the split (a template; default: each prompt),
"control" is the control-task key (default: the word at the probed position).

Examples are deduplicated, then split train / validation / test by group (stratified by label, seeded); the
rule is printed. Each site (resid_pre of every layer, then the final resid_post) gets a logistic-regression
probe; validation picks the L2 strength; test accuracy comes with a 95% interval (resampling the held-out
groups when test examples share one: few test groups give a wide interval). Controls: the control
task (Hewitt & Liang 2019: labels fixed at random per control key; selectivity = accuracy - control-task
accuracy, with a paired bootstrap interval), shuffled labels (a sanity check: chance), and optionally a
random-init model of the same config (tl engine). Writes probe.csv and accuracy_by_layer.png.
"""
HELP = "linear probes per layer with a control task, leak-free splits and confidence intervals"

MAX_EXAMPLES = 20_000


def add_arguments(parser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", "--data", dest="data", metavar="FILE",
                        help="JSONL / JSON / CSV file of prompts and labels (optional position, group, control)")
    source.add_argument("--task", choices=("sentiment", "ioi-io", "ioi-order"),
                        help="built-in dataset for the bundled model (default: sentiment when --data is absent)")
    parser.add_argument("--n", type=int, default=400, help="examples drawn for --task (default: %(default)s)")
    parser.add_argument("--position", default="last", help="last, a token index, or a word (default: %(default)s)")
    parser.add_argument("--split", default="0.6,0.2,0.2", help="train,validation,test fractions (default: %(default)s)")
    parser.add_argument("--l2", default="1e-4,1e-3,1e-2,1e-1,1",
                        help="L2 strengths tried; validation picks one (default: %(default)s)")
    parser.add_argument("--ci", choices=("wilson", "bootstrap"), default="wilson",
                        help="95%% interval on test accuracy when each test example is its own group; test "
                             "examples that share a group are resampled by group whatever this says "
                             "(default: %(default)s)")
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
    elif text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path} is not JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(rows, list):
            raise BadInput(f"{path} must hold a JSON list of examples")
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
    if len(fractions) != 3 or not all(0 < f < 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise BadInput(f"--split {args.split!r} must be three positive fractions summing to 1, e.g. 0.6,0.2,0.2")
    l2_grid = _floats(args.l2, "--l2")
    if not l2_grid or min(l2_grid) < 0 or not all(x < float("inf") for x in l2_grid):
        raise BadInput("--l2 needs one or more finite non-negative strengths, e.g. 1e-3,1e-2,1e-1")
    if args.batch_size < 1:
        raise BadInput("--batch-size must be at least 1")
    rules = {}
    if args.data:
        examples = read_examples(args.data)
        for key, rule in (("group", "by the file's \"group\""), ("control", "a random class per the file's \"control\"")):
            given = [e.get(key) not in (None, "") for e in examples]
            if any(given) and not all(given):
                raise BadInput(f"{args.data}: give \"{key}\" for every example or for none")
            rules[key] = rule if all(given) else None
    else:
        if not 10 <= args.n <= MAX_EXAMPLES:
            raise BadInput(f"--n must be in 10..{MAX_EXAMPLES}")
        data = probing.task_dataset(args.task or "sentiment", args.n, args.seed)
        examples = [{"prompt": p, "label": y, "group": g, "control": c}
                    for p, y, g, c in zip(data.prompts, data.labels, data.groups, data.controls)]
        rules = {"group": data.group_rule, "control": data.control_rule}

    engine = ctx.engine
    rows = [inputs.tokens(engine, str(e["prompt"]))[0].cpu() for e in examples]
    own = [e.get("position") not in (None, "") for e in examples]  # a row's own position beats --position
    positions = [probing.resolve_position(engine, r, e["position"] if mine else args.position)
                 for r, e, mine in zip(rows, examples, own)]
    result = probing.probe_layers(
        engine, rows, positions, [str(e["label"]) for e in examples], seed=args.seed, fractions=fractions,
        l2_grid=l2_grid, ci=args.ci, random_model=args.random_model, batch_size=args.batch_size,
        groups=[str(e["group"]) for e in examples] if rules["group"] else None,
        controls=[str(e["control"]) for e in examples] if rules["control"] else None,
        group_rule=rules["group"] and f"{rules['group']} (deduplicated first)", control_rule=rules["control"])

    table = result.rows()
    labels = probing.site_labels(engine)
    with open(ctx.run_dir / "probe.csv", "w") as f:
        f.write(",".join(table[0]) + "\n")
        f.writelines(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()) + "\n"
                     for row in table)
    curves = {"probe": (result.accuracy, *zip(*result.ci))}
    if result.control_accuracy is not None:
        curves["control task"] = (result.control_accuracy, *zip(*result.control_ci))
    curves["shuffled labels"] = (result.shuffled_accuracy, *zip(*result.shuffled_ci))
    if result.random_model_accuracy is not None:
        curves["random-init model"] = (result.random_model_accuracy, *zip(*result.random_model_ci))
    plot = plotting.lines(
        curves, ctx.run_dir / "accuracy_by_layer.png", x_labels=labels,
        reference=result.chance, reference_label="chance (majority class)", ylabel=f"test accuracy ({args.ci} 95% CI)",
        xlabel="residual stream site", title=f"linear probe: {args.task or args.data or 'sentiment'}")
    best = max(range(len(labels)), key=lambda i: result.accuracy[i])
    columns = ["site", "accuracy", "ci_low", "ci_high"] + (
        ["control_accuracy", "selectivity", "selectivity_ci_low", "selectivity_ci_high"]
        if result.control_accuracy is not None else []) + ["shuffled_accuracy"] + (
        ["random_model_accuracy"] if result.random_model_accuracy is not None else [])
    summary = {
        "task": args.task or ("sentiment" if not args.data else None), "data": args.data,
        "classes": result.classes[:20], "n_train": result.n_train, "n_val": result.n_val, "n_test": result.n_test,
        "duplicates_dropped": result.n_duplicates, "split": result.split_rule,
        "test_groups": result.test_groups[:10], "n_test_groups": len(result.test_groups),
        "control_task": result.control_rule, "chance": round(result.chance, 4),
        "control_chance": None if result.control_chance is None else round(result.control_chance, 4),
        "best_site": labels[best], "best_accuracy": round(result.accuracy[best], 4),
        "selectivity": "accuracy - control-task accuracy (paired 95% CI over test examples, resampling their "
                       "groups when they share one)",
        "columns": columns,  # one compact row per site (bounded output on 80-layer models); probe.csv has all
        "layers": [[label] + [round(row[c], 3) for c in columns[1:]] for label, row in zip(labels, table)],
        "files": ["probe.csv", plot.name],
    }
    lines = [f"probe test accuracy (n_train={result.n_train}, n_test={result.n_test} in {len(result.test_groups)} "
             f"held-out groups, chance {result.chance:.2f}, {args.ci} 95% CI)",
             f"split: {result.split_rule}; {result.n_duplicates} duplicate examples dropped",
             f"control task: {result.control_rule}" + (f" (chance {result.control_chance:.2f})"
                                                       if result.control_chance is not None else "")]
    for label, r in zip(labels, table):
        line = f"  {label:>8}: {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        if "control_accuracy" in r:
            line += (f"  control {r['control_accuracy']:.3f}  selectivity {r['selectivity']:+.3f} "
                     f"[{r['selectivity_ci_low']:+.3f}, {r['selectivity_ci_high']:+.3f}]")
        line += f"  shuffled {r['shuffled_accuracy']:.3f}"
        if "random_model_accuracy" in r:
            line += f"  random-model {r['random_model_accuracy']:.3f}"
        lines.append(line)
    return {"summary": summary, "text": "\n".join(lines), "rows": table, "sites": result.sites, "site_labels": labels,
            "ci": result.ci, "control_ci": result.control_ci, "selectivity_ci": result.selectivity_ci,
            "shuffled_ci": result.shuffled_ci, "random_model_ci": result.random_model_ci, "positions": positions}


def headline(summary: dict) -> str:
    """The finding in one sentence: the best site's test accuracy, against chance and the control task."""
    from mechscope.findings import ci, num

    row = dict(zip(summary["columns"], next((r for r in summary["layers"] if r[0] == summary["best_site"]), [])))
    what = summary["task"] or summary["data"]
    text = (f"a linear probe for {what} reads {num(summary['best_accuracy'])}{ci(row.get('ci_low'), row.get('ci_high'))} "
            f"test accuracy at {summary['best_site']} (chance {num(summary['chance'])}")
    if row.get("selectivity") is not None:
        text += (f"; selectivity over the control task {num(row['selectivity'], signed=True)}"
                 f"{ci(row.get('selectivity_ci_low'), row.get('selectivity_ci_high'), signed=True)}")
    return text + f"; n_test {summary['n_test']} in {summary['n_test_groups']} held-out groups)"
