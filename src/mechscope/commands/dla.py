"""Direct logit attribution at the last position: what embed, pos_embed, every attention layer and head,
every MLP layer and its top neurons write directly to the answer's logit (or to answer - wrong).

    mechscope dla                      # IOI: "When Mary and John went to the store, John gave a drink to", mary - john
    mechscope dla --prompt "The Eiffel Tower is in the city of" --answer paris --wrong rome
    mechscope dla --prompt "..."       # answer = the model's top prediction

The final LayerNorm's scale (and, on models whose LayerNorm is not folded, its weight; its bias is
its own row) is applied to every part, so the parts sum to the model's logit (difference): the
summary reports both and their difference. dla.csv holds the full table; dla_top.png the largest
rows; dla_heads.png the layer x head grid.
"""
HELP = "direct logit attribution to embeddings, heads, MLPs and neurons"

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
DEFAULT_ANSWER, DEFAULT_WRONG = "mary", "john"


def add_arguments(parser):
    parser.add_argument("--prompt", help=f"the prompt (default: {DEFAULT_PROMPT!r}, answer mary, wrong john)")
    parser.add_argument("--answer", help="the answer token (default: the model's top prediction for --prompt)")
    parser.add_argument("--wrong", help="a wrong token: attribute logit[answer] - logit[wrong]")
    parser.add_argument("--neurons", type=int, default=10, help="top MLP neurons in the table (default: %(default)s)")
    parser.add_argument("--top", type=int, default=20, help="rows in the summary and bar plot (default: %(default)s)")


def run(ctx):
    import csv

    import torch

    from mechscope import inputs, plotting
    from mechscope.errors import BadInput
    from mechscope.techniques.dla import dla

    args, model = ctx.args, ctx.model
    if args.neurons < 0 or args.top < 1:
        raise BadInput("--neurons must be >= 0 and --top >= 1")
    if args.prompt is None and args.answer is None and args.wrong is None:
        prompt, answer_word, wrong_word = DEFAULT_PROMPT, DEFAULT_ANSWER, DEFAULT_WRONG
    else:
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        answer_word, wrong_word = args.answer, args.wrong
    toks = inputs.tokens(model, prompt)
    if answer_word is None:
        with torch.no_grad():
            answer = int(model(toks)[0, -1].argmax())
        answer_word = model.to_single_str_token(answer)
    else:
        answer = inputs.single_token(model, answer_word)
    wrong = inputs.single_token(model, wrong_word) if wrong_word is not None else None
    if wrong == answer:
        raise BadInput("--answer and --wrong are the same token; pick two different tokens")

    result = dla(model, toks, answer, wrong)
    table = result.table(n_neurons=args.neurons)
    with open(ctx.run_dir / "dla.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "kind", "layer", "index", "value"])
        writer.writeheader()
        writer.writerows(table)
    metric_name = f"logit({answer_word}) - logit({wrong_word})" if wrong is not None else f"logit({answer_word})"
    top = table[:args.top]
    plotting.bars([r["value"] for r in top], [r["name"] for r in top], ctx.run_dir / "dla_top.png",
                  title=f"direct logit attribution to {metric_name}", xlabel="contribution")
    heads = result.heads[0]
    plotting.heatmap(heads, ctx.run_dir / "dla_heads.png",
                     row_labels=[f"L{l}" for l in range(heads.shape[0])],
                     col_labels=[f"H{h}" for h in range(heads.shape[1])],
                     title=f"per-head direct contribution to {metric_name}", xlabel="head", ylabel="layer",
                     colorbar_label="contribution")
    metric, total = float(result.metric[0]), float(result.total()[0])
    head_rows = sorted((r for r in table if r["kind"] == "head"), key=lambda r: -r["value"])
    summary = {"prompt": prompt, "answer": answer_word, "wrong": wrong_word, "metric": metric_name,
               "model_value": round(metric, 5), "sum_of_parts": round(total, 5),
               "sum_error": abs(metric - total),
               "top": [(r["name"], round(r["value"], 4)) for r in top],
               "top_heads": [(r["name"], round(r["value"], 4)) for r in head_rows[:5]],
               "files": ["dla.csv", "dla_top.png", "dla_heads.png"]}
    text = [f"DLA to {metric_name} at the last token of {prompt!r}: model {metric:.4f}, "
            f"sum of parts {total:.4f}"]
    text += [f"  {name:>16} {value:+.4f}" for name, value in summary["top"]]
    return {"summary": summary, "text": "\n".join(text), "table": table}
