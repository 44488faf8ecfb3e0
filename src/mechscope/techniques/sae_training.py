"""Training and evaluating SAEs with sae-lens's runners: one recipe for a language model's activations and for
synthetic data with known features.

Training (`train_on_model`) is `LanguageModelSAETrainingRunner` with the model passed as `override_model`
(a transformer-lens HookedTransformer: sae-lens's activation store drives its hooks, so other engines are
refused) and token rows as `override_dataset`. The saved SAE's metadata describes the model as it was
run: its name, hook, context size, prepend_bos, and `model_from_pretrained_kwargs` = the weight
processing measured from the model (`sae.weight_processing`), not sae-lens's default
`{"center_writing_weights": False}`, which misdescribes a model loaded with processing. Special tokens
(BOS) are excluded from training (`exclude_special_tokens=True`). Curves (L0, MSE, explained variance,
dead-feature fraction) are read from each training step's output every `log_every` steps and at the last.

Ground truth (`synthetic_recovery`): `sae_lens.synthetic` draws activations from a known dictionary of
features in superposition; the same recipe trains on them with `SyntheticSAERunner`, and the result is
scored by the mean, over true features, of the best cosine similarity with a decoder row (and sae-lens's
MCC, L0, explained variance, dead latents).

Evaluation (`evaluate`) runs on the engine API (any engine), on held-out rows, special-token positions
excluded: L0, explained variance (sae-lens's `ExplainedVarianceCalculator`), MSE, next-token CE loss
clean / with the reconstruction spliced in / with the activation zeroed (BOS kept in both), the CE loss
recovered (zero - spliced) / (zero - clean) with a Fieller interval over rows, feature densities,
dead (never active) and dense (active on > 10% of tokens) features.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mechscope.errors import BadInput
from mechscope.runs import share
from mechscope.techniques import sae as saes

ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu")
RECIPE = dict(lr=1e-2, lr_warm_up_steps=0, lr_scheduler_name="cosineannealing", lr_decay_steps=0, adam_beta1=0.9,
              adam_beta2=0.999, dead_feature_window=100)   # the optimiser settings, shared by language-model and synthetic training
DENSE_THRESHOLD = 0.1


def sae_config(architecture: str, d_in: int, d_sae: int, sparsity: float):
    """sae-lens training config. sparsity: k (topk, batchtopk), the L1 coefficient (standard), or the target
    L0 of JumpReLU's quadratic sparsity loss (jumprelu)."""
    from sae_lens import (BatchTopKTrainingSAEConfig, JumpReLUTrainingSAEConfig, StandardTrainingSAEConfig,
                          TopKTrainingSAEConfig)

    if architecture == "topk":
        return TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=int(sparsity))
    if architecture == "batchtopk":
        return BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=float(sparsity))
    if architecture == "standard":
        return StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=float(sparsity))
    if architecture == "jumprelu":
        return JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, jumprelu_sparsity_loss_mode="quadratic",
                                         target_l0=float(sparsity))
    raise BadInput(f"unknown architecture {architecture!r}; use one of {', '.join(ARCHITECTURES)}")


def _record_curves(sae, curves: list[dict], log_every: int, batch_tokens: int, last_step: int, print_fn=None):
    """Wrap sae.training_forward_pass to append a curve point at step 1, every log_every steps and at
    `last_step` (so the last point is the final step); BadInput when the loss is not finite (training diverged)."""
    forward = sae.training_forward_pass

    def recorded(step_input):
        out = forward(step_input=step_input)
        step = step_input.n_training_steps + 1
        if step % log_every == 0 or step in (1, last_step):
            with torch.no_grad():
                x, x_hat = out.sae_in.float(), out.sae_out.float()
                per_token = (x_hat - x).pow(2).sum(-1)
                variance = (x - x.mean(0)).pow(2).sum(-1).mean()
                dead = step_input.dead_neuron_mask
                point = {"step": step, "tokens": step * batch_tokens, "loss": float(out.loss),
                         "l0": float((out.feature_acts != 0).float().sum(-1).mean()),
                         "mse": float(per_token.mean()), "explained_variance": float(1 - per_token.mean() / variance),
                         "dead_fraction_training_window": float(dead.float().mean()) if dead is not None else 0.0}
            if not math.isfinite(point["loss"]):
                raise BadInput(f"training diverged: the loss is {point['loss']} at step {step}; lower --lr "
                               f"(the recipe's is {RECIPE['lr']})")
            curves.append(point)
            if print_fn:
                print_fn(point)
        return out
    sae.training_forward_pass = recorded


@contextlib.contextmanager
def _atomic_checkpoints():
    """sae-lens writes a checkpoint file by file into its final folder (an interruption leaves half of one):
    while this is active, each is written into a hidden folder beside it and renamed into place when whole."""
    from sae_lens.training.sae_trainer import SAETrainer

    save = SAETrainer.save_checkpoint

    def atomic(self, checkpoint_name, base_path=None, wandb_aliases=None):
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        if base is None:
            return save(self, checkpoint_name, base_path=base_path, wandb_aliases=wandb_aliases)
        base = Path(base)
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{checkpoint_name}."))
        try:
            save(self, checkpoint_name, base_path=tmp, wandb_aliases=wandb_aliases)
            share(tmp / checkpoint_name)
            os.replace(tmp / checkpoint_name, base / checkpoint_name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    SAETrainer.save_checkpoint = atomic
    try:
        yield
    finally:
        SAETrainer.save_checkpoint = save


def require_trainable(engine, hook: str) -> None:
    """BadInput unless sae-lens's runner can train on this engine's model at hook."""
    saes.require_sae_lens()
    if engine.name != "tl":
        raise BadInput(f"sae-train needs --backend tl: sae-lens's training runner drives a transformer-lens "
                       f"HookedTransformer, not the {engine.name} engine")
    engine.require([hook], "sae-train")


def train_on_model(engine, hook: str, rows: torch.Tensor, out_dir: Path, architecture: str = "topk",
                   d_sae: int = 1024, sparsity: float = 16, training_tokens: int = 1_000_000,
                   batch_tokens: int = 4096, lr: float | None = None, seed: int = 0, dataset_name: str = "",
                   n_checkpoints: int = 0, resume_from: str | None = None, log_every: int = 50, print_fn=None):
    """Train an SAE on `hook` of the engine's HookedTransformer over rows [n, context] (each starting with BOS).
    Writes sae-lens's files to out_dir (cfg.json, sae_weights.safetensors, ...; checkpoints/ when
    n_checkpoints > 0) -> (the inference SAE, curves: list of {step, tokens, loss, l0, mse, explained_variance,
    dead_fraction_training_window: features sae-lens counts dead, i.e. inactive over its last
    dead_feature_window training steps})."""
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    require_trainable(engine, hook)
    context = rows.shape[1]
    d_in = saes.site_width(engine, hook)
    recipe = dict(RECIPE, lr=lr or RECIPE["lr"])
    torch.manual_seed(seed)
    config = LanguageModelSAERunnerConfig(
        sae=sae_config(architecture, d_in, d_sae, sparsity), model_name=engine.cfg.model_name, hook_name=hook,
        dataset_path=dataset_name or "token rows", is_dataset_tokenized=True, streaming=False,
        context_size=context, prepend_bos=True, exclude_special_tokens=True, sequence_separator_token=None,
        model_from_pretrained_kwargs=saes.weight_processing(engine),
        training_tokens=training_tokens, train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=max(1, batch_tokens // context),
        n_batches_in_buffer=max(2, -(-4 * batch_tokens // context)),  # buffer = 4 batches of tokens
        device=str(engine.cfg.device), seed=seed, dtype="float32", logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=n_checkpoints, checkpoint_path=str(out_dir / "checkpoints") if n_checkpoints else None,
        resume_from_checkpoint=resume_from, output_path=str(out_dir), n_batches_for_norm_estimate=10,
        verbose=False, **recipe)
    curves: list[dict] = []
    with saes.quiet_sae_lens(), _atomic_checkpoints():
        runner = LanguageModelSAETrainingRunner(
            config, override_model=engine.model,
            override_dataset=datasets.Dataset.from_dict({"tokens": rows.tolist()}))
        _record_curves(runner.sae, curves, log_every, batch_tokens, -(-training_tokens // batch_tokens), print_fn)
        # sae-lens's own handling replaces the SIGINT / SIGTERM handlers for good and turns both into an ordinary
        # exception (a crash to the caller); without it they stay KeyboardInterrupt (mechscope.cli: "interrupted")
        runner.run_trainer_with_interruption_handling = lambda trainer: trainer.fit()
        runner.run()
    share(out_dir)
    return saes.load_sae(str(out_dir), device=str(engine.cfg.device)), curves


# ------------------------------------------------------------------------------------------- synthetic
def synthetic_recovery(architecture: str = "topk", num_features: int = 64, hidden_dim: int = 32,
                       d_sae: int = 128, sparsity: float = 3, firing_probability: float | None = 0.05,
                       training_samples: int = 200_000, seed: int = 0, out_dir: Path | None = None,
                       lr: float | None = None) -> dict:
    """Train the recipe on sae-lens synthetic data with known features and score the recovery.

    firing_probability: every feature fires with this probability (None: sae-lens's default Zipfian
    probabilities, harder). With out_dir the SAE is saved there and reloaded through `sae.load_sae`
    before scoring, so a broken save / load fails the score too.
    -> {mean_max_cosine, mcc, sae_l0, true_l0, explained_variance, dead_latents, sae}"""
    from sae_lens import LoggingConfig
    from sae_lens.synthetic import (ConstantFiringProbabilityConfig, SyntheticModelConfig, SyntheticSAERunner,
                                    SyntheticSAERunnerConfig, eval_sae_on_synthetic_data)
    from sae_lens.util import cosine_similarities

    model_cfg = dict(num_features=num_features, hidden_dim=hidden_dim, seed=seed)
    if firing_probability is not None:
        model_cfg["firing_probability"] = ConstantFiringProbabilityConfig(probability=firing_probability)
    torch.manual_seed(seed)
    recipe = dict(RECIPE, lr=lr or RECIPE["lr"])
    with saes.quiet_sae_lens():
        result = SyntheticSAERunner(SyntheticSAERunnerConfig(
            synthetic_model=SyntheticModelConfig(**model_cfg), sae=sae_config(architecture, hidden_dim, d_sae, sparsity),
            training_samples=training_samples, batch_size=1024, device="cpu", output_path=None, checkpoint_path=None,
            run_final_eval=False, n_batches_for_norm_estimate=10, logger=LoggingConfig(log_to_wandb=False),
            **recipe)).run()
        sae = result.sae
        if out_dir is not None:
            sae.save_inference_model(str(out_dir))
            sae = saes.load_sae(str(out_dir))
        truth = result.synthetic_model
        scores = eval_sae_on_synthetic_data(sae, truth.feature_dict, truth.activation_generator,
                                            num_samples=50_000, batch_size=5_000)
    with torch.no_grad():
        best = cosine_similarities(truth.feature_dict.feature_vectors, sae.W_dec).max(dim=1).values
    return {"architecture": architecture, "mean_max_cosine": float(best.mean()), "mcc": scores.mcc,
            "sae_l0": scores.sae_l0, "true_l0": scores.true_l0, "explained_variance": scores.explained_variance,
            "dead_latents": scores.dead_latents, "sae": sae}


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class EvalResult:
    """SAE quality on held-out rows (special-token positions excluded). CE losses in nats per token;
    ce_loss_increase = ce_spliced - ce_clean (the loss the SAE costs); dead_fraction: features never active on
    these rows (not sae-lens's training-window count)."""
    n_tokens: int
    l0: float
    l0_ci: tuple[float, float]
    explained_variance: float
    mse: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    ce_recovered_ci: tuple[float, float]
    ce_loss_increase: float
    ce_loss_increase_ci: tuple[float, float]
    dead_fraction: float
    dense_fraction: float
    density: list[float] = field(repr=False)     # [d_sae] fraction of tokens each feature is active on


def _ratio_ci(num: torch.Tensor, den: torch.Tensor) -> tuple[float, float]:
    """95% interval of sum(num) / sum(den) over rows (a ratio of means: stats.ratio_interval's Fieller interval,
    rows the resampling unit). num, den: [rows]."""
    from mechscope import stats

    _, low, high = stats.ratio_interval(num, den)
    return float(low), float(high)


def _token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq - 1] next-token cross-entropy."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")


@torch.no_grad()
def evaluate(engine, sae, rows: torch.Tensor, batch_size: int = 32) -> EvalResult:
    """SAE quality on rows [n, seq] through the engine API (see the module docstring)."""
    from sae_lens.evals import ExplainedVarianceCalculator

    from mechscope.progress import progress

    hook = sae.cfg.metadata.hook_name
    variance = ExplainedVarianceCalculator()
    active = torch.zeros(sae.cfg.d_sae)
    per_row = {k: [] for k in ("clean", "spliced", "zero", "n_loss", "l0", "n_tok", "se")}
    for batch in progress(rows.split(batch_size), desc="sae-eval"):
        batch = batch.to(engine.cfg.device)
        special = saes.special_mask(engine, batch)
        keep = ~special
        mask = keep[:, :-1].float()    # loss terms predicting from a non-special position
        logits, acts = engine.run(batch, read=[hook])
        per_row["clean"].append((_token_losses(logits, batch) * mask).sum(1).cpu())
        del logits                     # one full-vocabulary logits tensor alive at a time
        x = saes.sae_input(sae, acts[hook]).float()
        f = sae.encode(x.to(sae.dtype))
        x, x_hat = saes.flat_heads(x), saes.flat_heads(sae.decode(f).float())
        zero = lambda a: a.masked_fill(keep.view(*keep.shape, *[1] * (a.ndim - 2)), 0.0)  # noqa: E731
        for key, edit in (("spliced", saes.splice(sae, batch, engine, error_term=False)), ("zero", zero)):
            losses = _token_losses(engine.run(batch, edits=[(hook, edit)])[0], batch)
            per_row[key].append((losses * mask).sum(1).cpu())
        per_row["n_loss"].append(mask.sum(1).cpu())
        fired = (f != 0) & keep[..., None]
        per_row["l0"].append(fired.sum((1, 2)).float().cpu())
        per_row["n_tok"].append(keep.sum(1).float().cpu())
        per_row["se"].append(((x_hat - x).pow(2).sum(-1) * keep).sum(1).cpu())
        active += fired.sum((0, 1)).float().cpu()
        variance.add_batch(x_hat[keep], x[keep])
    r = {k: torch.cat(v) for k, v in per_row.items()}
    n_loss, n_tok = r["n_loss"].sum(), r["n_tok"].sum()
    if n_tok == 0:
        raise BadInput("the evaluation rows hold only special tokens; give some text")
    clean, spliced, zero = (float(r[k].sum() / n_loss) for k in ("clean", "spliced", "zero"))
    density = active / n_tok
    return EvalResult(
        n_tokens=int(n_tok), l0=float(r["l0"].sum() / n_tok), l0_ci=_ratio_ci(r["l0"], r["n_tok"]),
        explained_variance=variance.compute(), mse=float(r["se"].sum() / n_tok), ce_clean=clean, ce_spliced=spliced,
        ce_zero=zero, ce_recovered=(zero - spliced) / (zero - clean) if zero != clean else float("nan"),
        ce_recovered_ci=_ratio_ci(r["zero"] - r["spliced"], r["zero"] - r["clean"]),
        ce_loss_increase=spliced - clean, ce_loss_increase_ci=_ratio_ci(r["spliced"] - r["clean"], r["n_loss"]),
        dead_fraction=float((active == 0).float().mean()), dense_fraction=float((density > DENSE_THRESHOLD).float().mean()),
        density=density.tolist())
