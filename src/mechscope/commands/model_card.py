"""Measure the bundled model's behaviour and circuits: the numbers in MODEL_CARD.md.

IOI (held-out template x name-pair combinations), facts, induction (copy losses, top previous-token
and induction heads, ablation of the induction head and of the circuit's other parts), sentiment continuations.

    mechscope model-card --json
    mechscope model-card --backend nnsight      # the same measurements on another engine (the HF export)
"""
HELP = "measure the bundled model's behaviour and circuits (MODEL_CARD.md)"


def add_arguments(parser):
    pass


def run(ctx):
    from mechscope.toy.card import measure

    card = measure(ctx.engine)
    ind = card["induction"]
    text = "\n".join([
        f"IOI: accuracy {card['ioi']['accuracy']:.3f}, mean logit diff {card['ioi']['mean_logit_diff']:.2f} "
        f"(n={card['ioi']['n']}, held out)",
        f"facts: accuracy {card['facts']['accuracy']:.3f} (n={card['facts']['n']})",
        f"induction: first-copy loss {ind['first_copy_loss']:.2f}, second-copy loss {ind['second_copy_loss']:.2f}",
        f"previous-token head L{ind['previous_token_head'][0]}H{ind['previous_token_head'][1]} "
        f"score {ind['previous_token_score']:.2f}; induction head L{ind['induction_head'][0]}H{ind['induction_head'][1]} "
        f"score {ind['induction_score']:.2f}",
        f"ablating the induction head raises second-copy loss by {ind['ablation_loss_increase']['zero']:.2f} (zero), "
        f"{ind['ablation_loss_increase']['mean']:.2f} (mean) nats; the circuit's other parts (zero / mean): " +
        ", ".join(f"{k} {v['zero']:.2f} / {v['mean']:.2f}" for k, v in ind["circuit_ablation_loss_increase"].items()),
        f"sentiment: positive prompts -> positive word {card['sentiment']['positive']:.2f}, "
        f"negative -> negative {card['sentiment']['negative']:.2f}",
    ])
    return {"summary": card, **card, "text": text}


def headline(summary: dict) -> str:
    """The finding in one sentence: the induction circuit's head and ablation effect, IOI and facts accuracy."""
    from mechscope.findings import num

    ind, ioi, facts = summary["induction"], summary["ioi"], summary["facts"]
    layer, head = ind["induction_head"]
    return (f"induction head L{layer}H{head} (score {num(ind['induction_score'])}): zero-ablating it raises the "
            f"second-copy loss by {num(ind['ablation_loss_increase']['zero'])} nats; IOI accuracy {num(ioi['accuracy'], 3)} "
            f"on {ioi['n']} held-out prompts, facts {num(facts['accuracy'], 3)} on {facts['n']}")
