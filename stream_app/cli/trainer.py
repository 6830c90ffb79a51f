"""``nextaction trainer``: the online trainer (:mod:`stream_app.training`), until Ctrl-C / SIGTERM.

>>> [p.name for p in typer.main.get_command(app).params][:1]
['loglevel']
"""

from __future__ import annotations

import asyncio
import logging
import signal

import typer

from stream_app.cli.common import console, current_settings, errors

app = typer.Typer()


@app.command()
def trainer(loglevel: str | None = typer.Option(None, "--loglevel", "-l",
                                                 help="Log level (default: settings.log_level).")) -> None:
    """Learn from `outcomes` and publish deltas and full versions on `model-updates` (one active trainer
    per app; others wait as standbys). Metrics: http://WEB_BIND:TRAINER_PORT/metrics."""
    from prometheus_client import start_http_server

    from stream_app import monitoring
    from stream_app.training import TrainingService

    with errors():
        settings = current_settings()
        logging.basicConfig(level=(loglevel or settings.log_level).upper(),
                            format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
        start_http_server(settings.trainer_port, addr=settings.web_bind, registry=monitoring.REGISTRY)
        console.print(f"trainer for app {settings.app_id!r} on {settings.bootstrap_servers}; metrics on "
                      f"http://{settings.web_bind}:{settings.trainer_port}/metrics")
        asyncio.run(_run(TrainingService(settings)))


async def _run(service) -> None:
    task = asyncio.ensure_future(service.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        logging.getLogger(__name__).info("trainer stopped")
