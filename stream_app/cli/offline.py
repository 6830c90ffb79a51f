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
    batch_size: Annotated[int, typer.Option()] = 256,
    lr: Annotated[float, typer.Option()] = 5e-3,
    weight_decay: Annotated[float, typer.Option()] = 0.01,
    warmup_steps: Annotated[int, typer.Option()] = 100,
    patience: Annotated[int, typer.Option(help="Validations without NDCG@10 gain before stopping.")] = 5,
    seed: Annotated[int, typer.Option()] = 42,
    threads: Annotated[int, typer.Option(help="CPU intra-op threads (0 = torch default). On a busy shared "
                                              "CPU, 1 is often fastest.")] = 0,
    d_model: Annotated[int, typer.Option()] = 64,
    layers: Annotated[int, typer.Option()] = 2,
    heads: Annotated[int, typer.Option()] = 2,
    max_len: Annotated[int, typer.Option(help="Events per window.")] = 50,
    dropout: Annotated[float, typer.Option()] = 0.3,
    backbone: Annotated[str, typer.Option(help="llama | gpt2 | bert")] = "llama",
    objective: Annotated[str, typer.Option(help="causal | masked_then_causal")] = "causal",
    features: Annotated[Optional[str], typer.Option(
        help="Comma-separated token features (default: all the dataset supports): "
             "item,action,gap,hour,dow,device,location")] = None,
    repeat_head: Annotated[bool, typer.Option("--repeat-head/--no-repeat-head")] = True,
    transitions: Annotated[int, typer.Option(help="Item-transition table: successors kept per item, weight "
                                                  "fitted on validation after training (0 = no table).")] = 100,
    negatives: Annotated[int, typer.Option(help="0 = full softmax; >0 = sampled softmax with this many "
                                                "shared negatives (2048 is the CPU recipe).")] = 0,
    eval_protocol: Annotated[str, typer.Option(help="Validation ranking: 'masked' (history items removed) "
                                                    "or 'allowed'.")] = "masked",
    max_eval_users: Annotated[int, typer.Option(help="Validation users sampled per evaluation (0 = all).")] = 3000,
    window_stride: Annotated[int, typer.Option(help="Long histories: a training window every this many events "
                                                    "(0 = every max_len events).")] = 0,
    config: Annotated[Optional[Path], typer.Option(help="A ModelConfig JSON file (overrides the model "
                                                        "options above).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train the next-action Transformer on a dataset; checkpoint the best validation epoch."""
    from rich.console import Console

    with errors():
        from models.checkpoint import load_checkpoint
        from models.config import FEATURES, ModelConfig, TrainConfig
        from models.datasets import load_split
        from models.train import train as run_train

        console = Console(stderr=True)
        if config is not None:
            mcfg = ModelConfig.from_json(config.read_text())
        else:
            feats = tuple(f.strip() for f in features.split(",") if f.strip()) if features else FEATURES
            mcfg = ModelConfig(d_model=d_model, n_layers=layers, n_heads=heads, max_len=max_len, dropout=dropout,
                               backbone=backbone, objective=objective, features=feats, repeat_head=repeat_head,
                               n_negatives=negatives, transition_top=transitions)
        tcfg = TrainConfig(lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, epochs=epochs,
                           batch_size=batch_size, patience=patience, seed=seed, device=device, budget_min=budget_min,
                           num_threads=threads, eval_protocol=eval_protocol, max_eval_users=max_eval_users,
                           window_stride=window_stride, progress=progress)
        ds, split = load_split(dataset)  # yoochoose: the session-rec split, else leave-one-out
        console.print(f"[bold]{ds.name}[/]: {ds.summary()}")
        path, _ = run_train(ds, mcfg, tcfg, out, split=split)
        ck = load_checkpoint(path)
    meta = ck.metadata
    console.print(f"[green]checkpoint[/] {path} version {ck.version} (best epoch {meta.get('best_epoch')}, "
                  f"{meta.get('train_seconds')} s)")
    if "test" in meta:
        t = meta["test"]
        console.print(f"test ({meta.get('test_protocol')}): NDCG@10 {t.get('NDCG@10', float('nan')):.4f} "
                      f"HR@10 {t.get('HR@10', float('nan')):.4f}")


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
    """Count a trained checkpoint's item-transition table on the dataset and fit its weight on the
    validation cases its training used (models/transitions.py), then save it in place."""
    with errors():
        from models.datasets import load_split
        from models.devices import resolve_device
        from models.train import refit_transitions

        ds, split = load_split(dataset)
        res = refit_transitions(ds, checkpoint, split=split, device=resolve_device(device))
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "tried"}))
