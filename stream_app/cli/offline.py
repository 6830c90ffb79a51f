"""The offline model commands: ``train``, ``evaluate`` and ``fit-transitions``. torch and the
dataset loaders are imported inside them, so ``nextaction --help`` (and ``train --help``) stay fast.

Examples::

    nextaction train --dataset beauty --out runs/beauty --budget-min 10
    nextaction train --dataset csv:events.csv --out runs/mine --device cuda --epochs 50
    nextaction train --dataset synthetic:n_items=500,seed=3 --out runs/syn --budget-min 1
    nextaction evaluate --checkpoint runs/beauty --dataset beauty --mask-history
    nextaction fit-transitions --dataset beauty --checkpoint runs/beauty

>>> sorted(c.name or c.callback.__name__ for c in app.registered_commands)
['evaluate', 'fit_transitions', 'train']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from models.progress import interactive
from stream_app.cli.common import errors

app = typer.Typer()


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="beauty | games | ml-100k | taobao | taobao-slice | yoochoose | "
                                              "synthetic[:n_items=N,seed=S,...] | csv:PATH | seq:PATH")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory (written atomically).")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping usually ends sooner).")] = 200,
    budget_min: Annotated[float, typer.Option(help="Wall-clock budget in minutes (0 = none).")] = 10.0,
    batch_size: Annotated[Optional[int], typer.Option(help="[default: auto]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate. [default: auto]")] = None,
    weight_decay: Annotated[float, typer.Option()] = 0.01,
    warmup_steps: Annotated[int, typer.Option()] = 100,
    patience: Annotated[int, typer.Option(help="Validations without NDCG@10 gain before stopping.")] = 5,
    seed: Annotated[int, typer.Option()] = 42,
    ema_epochs: Annotated[Optional[float], typer.Option(
        help="Validate and save a moving average of the weights with this half-life in epochs (0 = off). "
             "[default: TrainConfig.ema_epochs]")] = None,
    threads: Annotated[int, typer.Option(help="CPU intra-op threads (0 = torch default). On a busy shared "
                                              "CPU, 1 is often fastest.")] = 0,
    d_model: Annotated[int, typer.Option()] = 64,
    layers: Annotated[int, typer.Option()] = 2,
    heads: Annotated[int, typer.Option()] = 2,
    max_len: Annotated[Optional[int], typer.Option(help="Events per window. [default: auto]")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="[default: auto]")] = None,
    backbone: Annotated[str, typer.Option(help="llama | gpt2 | bert")] = "llama",
    objective: Annotated[str, typer.Option(help="causal | masked_then_causal")] = "causal",
    features: Annotated[Optional[str], typer.Option(
        help="Comma-separated token features (default: all the dataset supports): "
             "item,action,gap,hour,dow,device,location")] = None,
    repeat_head: Annotated[bool, typer.Option("--repeat-head/--no-repeat-head")] = True,
    transitions: Annotated[int, typer.Option(help="Item-transition table: successors kept per item, weight "
                                                  "fitted on validation after training (0 = no table).")] = 100,
    neighbours: Annotated[int, typer.Option(help="Item-neighbour (co-occurrence) table: neighbours kept per item, "
                                                 "window and weight fitted on validation after training "
                                                 "(0 = no table).")] = 50,
    negatives: Annotated[Optional[int], typer.Option(help="0 = full softmax; >0 = sampled softmax with this "
                                                          "many shared negatives. [default: auto]")] = None,
    eval_protocol: Annotated[Optional[str], typer.Option(help="Validation ranking: 'allowed' (as served) or "
                                                              "'masked' (history items removed). [default: auto]")]
    = None,
    item_categories: Annotated[Optional[bool], typer.Option("--item-categories/--no-item-categories",
                                                            help="[default: auto]")] = None,
    action_prior: Annotated[Optional[bool], typer.Option("--action-prior/--no-action-prior",
                                                         help="[default: auto]")] = None,
    auto: Annotated[bool, typer.Option("--auto/--no-auto", help="Choose the settings marked [default: auto] "
                                       "from the log (models/auto.py; printed with the reasons); "
                                       "--no-auto: the library defaults.")] = True,
    max_eval_users: Annotated[int, typer.Option(help="Validation users sampled per evaluation (0 = all).")] = 3000,
    window_stride: Annotated[Optional[int], typer.Option(help="Long histories: a training window every this "
                                                              "many events (0 = every max_len events). "
                                                              "[default: auto]")] = None,
    config: Annotated[Optional[Path], typer.Option(help="A ModelConfig JSON file (overrides the model "
                                                        "options above).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    item_text: Annotated[Optional[Path], typer.Option(
        help="Item texts (.jsonl {item_id, item_text} lines, or CSV/TSV): after training, fit the text "
             "projection for cold-start items into the checkpoint (docs/cold-start.md).")] = None,
) -> None:
    """Train the next-action Transformer on a dataset; checkpoint the best validation epoch."""
    from rich.console import Console

    with errors():
        from models.checkpoint import load_checkpoint
        from models.auto import auto_configs
        from models.config import FEATURES, ModelConfig, TrainConfig
        from models.datasets import load_split
        from models.train import train as run_train

        console = Console(stderr=True, soft_wrap=True)  # a log file keeps whole lines
        texts = _item_texts(item_text)  # before training: a bad file or a missing package fails fast
        ds, split = load_split(dataset)  # yoochoose: the session-rec split, else leave-one-out
        console.print(f"[bold]{ds.name}[/]: {ds.summary()}")
        chosen_model = {"max_len": max_len, "dropout": dropout, "n_negatives": negatives,
                        "item_categories": item_categories, "action_prior": action_prior}
        chosen_train = {"batch_size": batch_size, "lr": lr, "eval_protocol": eval_protocol,
                        "window_stride": window_stride}
        if config is not None:  # the file's model fields count as set explicitly
            given_model = ModelConfig.from_json(config.read_text()).to_dict()
        else:
            feats = tuple(f.strip() for f in features.split(",") if f.strip()) if features else FEATURES
            given_model = {"d_model": d_model, "n_layers": layers, "n_heads": heads, "backbone": backbone,
                           "objective": objective, "features": feats, "repeat_head": repeat_head,
                           "transition_top": transitions, "neighbour_top": neighbours,
                           **{k: v for k, v in chosen_model.items() if v is not None}}
        given_train = {k: v for k, v in chosen_train.items() if v is not None}
        base_train = {"warmup_steps": warmup_steps, "weight_decay": weight_decay, "epochs": epochs,
                      "patience": patience, "seed": seed, "device": device, "budget_min": budget_min,
                      "num_threads": threads, "max_eval_users": max_eval_users, "progress": progress,
                      **({"ema_epochs": ema_epochs} if ema_epochs is not None else {})}
        if auto:
            mcfg, tcfg, profile, why = auto_configs(ds, split, given_model, given_train, base_train=base_train)
            console.print(f"[bold]auto[/] ({profile.summary()}):")
            for line in why:
                console.print(f"  {line}")
        else:
            mcfg = ModelConfig.from_dict(given_model)
            tcfg = TrainConfig.from_dict({**base_train, **given_train})
        path, _ = run_train(ds, mcfg, tcfg, out, split=split)
        text_rows = _fit_text_rows(path, ds, split, texts, tcfg, console) if texts is not None else None
        ck = load_checkpoint(path)
    meta = ck.metadata
    console.print(f"[green]checkpoint[/] {path} version {ck.version} (best epoch {meta.get('best_epoch')}, "
                  f"{meta.get('train_seconds')} s)")
    for line in fitted_after_training(meta):
        console.print(f"  {line}")
    if text_rows is not None:
        console.print(f"  {text_rows_line(text_rows)}")
    if "test" in meta:
        t = meta["test"]
        console.print(f"test ({meta.get('test_protocol')}): NDCG@10 {t.get('NDCG@10', float('nan')):.4f} "
                      f"HR@10 {t.get('HR@10', float('nan')):.4f}")


def _item_texts(path: Path | None) -> dict[str, str] | None:
    """``--item-text``: the catalogue's texts (None without the option); checks that the encoder's
    package is installed (:class:`~models.errors.MissingDependencyError`)."""
    if path is None:
        return None
    from models.text import model_dir, read_catalogue

    texts = read_catalogue(path)
    model_dir()
    return texts


def _fit_text_rows(path: Path, ds, split, texts: dict[str, str], tcfg, console) -> dict:
    """After training with ``--item-text``: :func:`models.train.fit_text_rows` (saves the projection in the
    checkpoint)."""
    from models.train import fit_text_rows

    console.print(f"text projection: fitting on {len(texts)} item texts ...")
    return fit_text_rows(path, ds, texts, split=split, seed=tcfg.seed, device=tcfg.device)


def text_rows_line(r: dict) -> str:
    """The ``--item-text`` report, one line.

    >>> text_rows_line({"items_with_text": 90, "n_fit": 60, "min_count": 5, "ridge": 10.0, "fit_r2": 0.24,
    ...                 "cold": 3, "few": 20, "seconds": 1.5})
    'text projection: 90 items with text, fitted on 60 (>= 5 training events), ridge 10, fit R² 0.24; text rows for 3 items without and 20 with 1-4 training events (1.5 s)'
    """
    return (f"text projection: {r['items_with_text']} items with text, fitted on {r['n_fit']} (>= {r['min_count']} "
            f"training events), ridge {r['ridge']:g}, fit R² {r['fit_r2']}; text rows for {r['cold']} items without "
            f"and {r['few']} with 1-{r['min_count'] - 1} training events ({r['seconds']} s)")


def fitted_after_training(meta: dict) -> list[str]:
    """What training fitted on the validation cases after the last epoch, one line each (from the
    checkpoint's metadata).

    >>> fitted_after_training({"transitions": {"feature": "log", "weight": 2.0, "valid_ndcg10_before": 0.1,
    ...                        "valid_ndcg10_after": 0.12}, "copy": {"weight": 0.0, "valid_ndcg10_before": 0.12,
    ...                        "valid_ndcg10_after": 0.12}, "neighbours": {"window": 2, "weight": 4.0,
    ...                        "valid_ndcg10_before": 0.12, "valid_ndcg10_after": 0.13},
    ...                        "item_calibration": {"skipped": "10 cases"}})[1:]
    ['item neighbours: last 2 events x4 (validation NDCG@10 0.12 -> 0.13)', 'copy strength: 0 (validation NDCG@10 0.12 -> 0.12)', 'item temperature: skipped (10 cases)']
    """
    out = []
    for key, label in (("transitions", "item transitions"), ("neighbours", "item neighbours"),
                       ("categories", "category recency"),
                       ("categories_unseen", "category recency, history excluded (exclude_seen)"),
                       ("copy", "copy strength"),
                       ("action_calibration", "action calibration"), ("item_calibration", "item temperature")):
        r = meta.get(key)
        if not r:
            continue
        if "skipped" in r:
            out.append(f"{label}: skipped ({r['skipped']})")
        elif key == "transitions":
            out.append(f"{label}: {r['feature']} x{r['weight']:g} (validation NDCG@10 {r['valid_ndcg10_before']} -> "
                       f"{r['valid_ndcg10_after']})" if r["weight"] else f"{label}: off (no validation gain)")
        elif key in ("neighbours", "categories", "categories_unseen"):
            events = f"{r['window']} event{'s' if r['window'] > 1 else ''}"
            out.append(f"{label}: last {events} x{r['weight']:g} (validation NDCG@10 {r['valid_ndcg10_before']} -> "
                       f"{r['valid_ndcg10_after']})" if r["weight"] else f"{label}: off (no validation gain)")
        elif key == "copy":
            out.append(f"{label}: {r['weight']:g} (validation NDCG@10 {r['valid_ndcg10_before']} -> "
                       f"{r['valid_ndcg10_after']})")
        else:
            out.append(f"{label}: T = {r['temperature']} (validation log loss {r['valid_log_loss_before']} -> "
                       f"{r['valid_log_loss_after']})")
    return out


@app.command()
def evaluate(
    dataset: Annotated[str, typer.Option(help="Dataset name (as for train).")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint directory to evaluate.")] = None,
    baselines: Annotated[str, typer.Option(help="Comma-separated baselines to evaluate alongside.")] =
    "popularity,markov",
    protocol: Annotated[str, typer.Option(help="full | sampled100")] = "full",
    mask_history: Annotated[bool, typer.Option("--mask-history/--allow-history")] = False,
    split: Annotated[str, typer.Option(help="test | valid")] = "test",
    max_cases: Annotated[Optional[int], typer.Option(help="Evaluate a seeded sample of this many cases.")] = None,
    json_out: Annotated[Optional[Path], typer.Option(help="Also write the results as JSON here.")] = None,
) -> None:
    """Evaluate a checkpoint and baselines with the leave-one-out full-ranking protocol."""
    with errors():
        from models.evaluate import format_table, run_evaluate

        names = [b.strip() for b in baselines.split(",") if b.strip()]
        res = run_evaluate(dataset, checkpoint, names, protocol, mask_history, split=split, max_cases=max_cases,
                           progress=interactive())  # its tqdm bar only on a terminal (models.progress)
    typer.echo(format_table(res))
    if json_out is not None:
        json_out.write_text(json.dumps(res, indent=2, default=str))


@app.command()
def fit_transitions(
    dataset: Annotated[str, typer.Option(help="Dataset name (as for train).")],
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint directory (updated in place, atomically).")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "cpu",
) -> None:
    """Count a trained checkpoint's item-transition and item-neighbour tables on the dataset and fit
    their weights on the validation cases its training used (models/transitions.py,
    models/neighbours.py), then save it in place."""
    with errors():
        from models.datasets import load_split
        from models.devices import resolve_device
        from models.train import refit_transitions

        ds, split = load_split(dataset)
        res = refit_transitions(ds, checkpoint, split=split, device=resolve_device(device))
    typer.echo(json.dumps({name: {k: v for k, v in fit.items() if k != "tried"} for name, fit in res.items()}))
