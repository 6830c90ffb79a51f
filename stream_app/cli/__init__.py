"""The ``nextaction`` command line: one module per command group, registered here.

=====================================================  =====================================================
``nextaction kafka start|stop|status|logs|install``    the embedded broker; ``create-topics`` on any cluster
                                                       (:mod:`stream_app.cli.kafka`)
``nextaction worker``, ``replay taobao|csv|synthetic``, the stream (:mod:`stream_app.cli.stream`)
``tail TOPIC``, ``deploy CHECKPOINT``, ``forget USER_ID...``
``nextaction train|evaluate|fit-transitions``          offline model commands (:mod:`stream_app.cli.offline`)
``nextaction settings``                                the settings; docs/settings.md (:mod:`stream_app.cli.settings`)
``nextaction status``                                  broker, lag, workers, versions (:mod:`stream_app.cli.status`)
``nextaction trainer``                                 the online trainer (:mod:`stream_app.cli.trainer`)
``nextaction demo``                                    broker, model, worker, replay, predictions
                                                       (:mod:`stream_app.cli.demo`)
=====================================================  =====================================================

Settings come from ``NEXTACTION_*`` environment variables (:mod:`stream_app.settings`). Heavy
imports (Faust, torch, Kafka clients, the replay sources) happen inside the commands that need them.

>>> sorted(c.name for c in typer.main.get_command(app).commands.values())[:6]
['demo', 'deploy', 'evaluate', 'fit-transitions', 'forget', 'kafka']
"""

from __future__ import annotations

import typer

from stream_app.cli import demo, kafka, offline, settings, status, stream, trainer

__all__ = ["app", "main"]

app = typer.Typer(name="nextaction", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
                  pretty_exceptions_show_locals=False,
                  help="Streaming next-action prediction on Kafka (Faust + RocksDB + a Transformer).")
app.add_typer(kafka.app, name="kafka")
app.add_typer(stream.app)
app.add_typer(offline.app)
app.add_typer(settings.app)
app.add_typer(status.app)
app.add_typer(trainer.app)
app.add_typer(demo.app)


def main() -> None:
    """Console-script entry point (``nextaction``)."""
    app()


if __name__ == "__main__":
    main()
