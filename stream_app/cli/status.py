"""``nextaction status``: the fleet at a glance, from the broker and the workers' ``/metrics``
(:mod:`stream_app.status` gathers and renders; the ``--json`` keys are documented there).

>>> [p.name for p in typer.main.get_command(app).params][:4]
['workers', 'interval', 'timeout', 'as_json']
"""

from __future__ import annotations

import asyncio
import json

import typer

from stream_app.cli.common import console, current_settings, errors, positive

app = typer.Typer()


@app.command("status")
def status_cmd(
    workers: list[str] = typer.Option([], "--worker", "-w", help="A worker's web address (host:port or URL; "
                                      "repeat for each worker). Default: the local worker, WEB_BIND:WEB_PORT."),
    interval: float = typer.Option(2.0, help="Seconds between the two scrapes of each worker (events/s).",
                                   callback=positive("--interval")),
    timeout: float = typer.Option(10.0, help="Seconds to wait for the broker.", callback=positive("--timeout")),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (stable keys: stream_app/status.py)."),
) -> None:
    """Topics, consumer lag per partition, the group's members and their partitions, each worker's model
    version, events/s, latency and dead letters, and the last model update. Exit status 1 when the broker
    does not answer."""
    from stream_app import status

    with errors():
        settings = current_settings()
        urls = [status.worker_url(w) for w in workers] or [status.default_worker(settings)]
        report = asyncio.run(status.gather(settings, urls, interval, timeout))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for part in status.render(report):
        console.print(part)
