"""``nextaction kafka start|stop|status|logs|install``: the embedded single-node broker
(:mod:`stream_app.broker`) on 127.0.0.1, and whether ``broker_url`` points at it;
``nextaction kafka create-topics``: the app's topics on any cluster (``broker_url``).

>>> from stream_app.settings import Settings
>>> points_at_embedded(Settings(kafka_port=9092)), points_at_embedded(Settings(broker_url="kafka://kafka:9092"))
(True, False)
"""

from __future__ import annotations

import time

import typer
from rich.markup import escape
from rich.table import Table

from stream_app.cli.common import console, current_settings, err_console, errors, positive
from stream_app.settings import SettingsType

app = typer.Typer(no_args_is_help=True, help="The embedded Apache Kafka broker (single KRaft node on 127.0.0.1), "
                                             "and the app's topics on any cluster (create-topics).")


@app.command("start")
def kafka_start(
    timeout: float = typer.Option(90.0, help="Seconds to wait for the broker to answer.", callback=positive("--timeout")),
    topics: bool = typer.Option(True, "--topics/--no-topics", help="Create the app's topics if missing."),
) -> None:
    """Install (once), format (once) and start the broker; wait until it answers. Idempotent."""
    from stream_app import broker, kafka_admin

    with errors():
        settings = current_settings()
        t0 = time.monotonic()
        with console.status(f"starting Kafka {settings.kafka_version} on 127.0.0.1:{settings.kafka_port} "
                            "(first run downloads the jars with Maven)..."):
            st = broker.start(settings, timeout=timeout)
        if st.started:
            console.print(f"[green]started[/] Kafka {st.version} (pid {st.pid}) on [bold]{st.bootstrap}[/] "
                          f"in {time.monotonic() - t0:.1f} s; log: {st.log}")
        else:
            console.print(f"[green]already running[/] Kafka {st.version} (pid {st.pid}) on [bold]{st.bootstrap}[/]; "
                          f"log: {st.log}")
        if settings.kafka_sasl_ssl_port:
            console.print(f"SASL_SSL listener on [bold]127.0.0.1:{settings.kafka_sasl_ssl_port}[/] (user "
                          f"{escape(settings.kafka_sasl_username or '')}; PLAIN, SCRAM-SHA-256, SCRAM-SHA-512); its CA: "
                          f"{broker.BrokerPaths.of(settings).ca_pem} (NEXTACTION_KAFKA_SSL_CAFILE)")
        warn_if_broker_url_elsewhere(settings)
        if topics:
            counts = kafka_admin.ensure_topics(local_settings(settings))
            console.print("topics: " + ", ".join(f"{t} ({n} partitions)" for t, n in counts.items()))


@app.command("stop")
def kafka_stop(timeout: float = typer.Option(30.0, help="Seconds before SIGTERM becomes SIGKILL.",
                                             callback=positive("--timeout"))) -> None:
    """Stop the broker (SIGTERM, then SIGKILL after --timeout). Idempotent."""
    from stream_app import broker

    with errors():
        settings = current_settings()
        with console.status("stopping Kafka..."):
            was_running = broker.stop(settings, timeout=timeout)
        console.print("[green]stopped[/] Kafka" if was_running else
                      f"Kafka was not running (data dir {broker.BrokerPaths.of(settings).root})")


@app.command("status")
def kafka_status() -> None:
    """Show whether the broker runs and answers; exit status 1 if it does not answer."""
    from stream_app import broker

    with errors():
        settings = current_settings()
        st = broker.status(settings)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("process", f"[green]running[/] (pid {st.pid})" if st.running else "[red]not running[/]")
    table.add_row("answering", f"[green]yes[/] ({st.brokers} broker)" if st.answering else "[red]no[/]")
    if st.answering and not st.running:
        table.add_row("", "[yellow]a broker answers on this port but was not started from this data dir[/]")
    table.add_row("bootstrap", st.bootstrap)
    table.add_row("controller", f"127.0.0.1:{st.controller_port}")
    table.add_row("version", f"{st.version} ({'installed' if st.installed else 'not installed yet'})")
    table.add_row("data dir", str(st.data_dir))
    table.add_row("log", str(st.log))
    table.add_row("broker_url", settings.broker_url)
    console.print(table)
    warn_if_broker_url_elsewhere(settings)
    if not st.answering:
        raise typer.Exit(1)


@app.command("create-topics")
def kafka_create_topics(
    partitions: int | None = typer.Option(None, help="Partitions of each new topic (default: PARTITIONS). The most "
                                          "workers that can share the work; it cannot shrink later.",
                                          callback=positive("--partitions")),
    replication: int | None = typer.Option(None, help="Replication factor of each new topic (default: 3, or the "
                                           "number of brokers if fewer).", callback=positive("--replication")),
) -> None:
    """Create the app's topics that are missing on BROKER_URL (any cluster), with the product's configs
    (retention of the per-user topics: TOPIC_RETENTION_S). Existing topics are left as they are."""
    from stream_app import kafka_admin

    with errors():
        settings = current_settings()
        brokers = kafka_admin.require_broker(settings)
        factor = replication or min(3, brokers)
        counts = kafka_admin.ensure_topics(settings, partitions=partitions, replication=factor)
    table = Table(title=f"topics on {escape(settings.bootstrap_servers)} ({brokers} broker{'s' * (brokers != 1)})",
                  title_justify="left")
    table.add_column("topic")
    table.add_column("partitions", justify="right")
    for topic, n in counts.items():
        table.add_row(escape(topic), str(n))
    console.print(table)
    console.print(f"[dim]new topics: replication factor {factor}; existing ones kept their settings[/]")


@app.command("logs")
def kafka_logs(lines: int = typer.Option(40, "--lines", "-n", callback=positive("--lines"))) -> None:
    """Print the tail of the broker log."""
    from stream_app import broker

    with errors():
        console.print(escape(broker.log_tail(current_settings(), lines)), highlight=False, soft_wrap=True)


@app.command("install")
def kafka_install() -> None:
    """Download the broker jars from Maven Central (start does this on first use)."""
    from stream_app import broker

    with errors():
        t0 = time.monotonic()
        with console.status("fetching Kafka jars with Maven..."):
            jars = broker.install(current_settings())
        console.print(f"[green]installed[/] {jars} ({time.monotonic() - t0:.1f} s)")


def local_settings(settings: SettingsType) -> SettingsType:
    """``settings`` aimed at the embedded broker (which may differ from ``broker_url``)."""
    return settings.model_copy(update={"broker_url": f"kafka://127.0.0.1:{settings.kafka_port}",
                                       "kafka_security_protocol": "PLAINTEXT"})  # its loopback listener


def points_at_embedded(settings: SettingsType) -> bool:
    """Whether ``broker_url`` names the embedded broker's port on this host."""
    hosts = settings.bootstrap_servers.split(",")
    ports = [settings.kafka_port] + ([settings.kafka_sasl_ssl_port] if settings.kafka_sasl_ssl_port else [])
    return any(h.strip() in (f"127.0.0.1:{p}", f"localhost:{p}") for h in hosts for p in ports)


def warn_if_broker_url_elsewhere(settings: SettingsType) -> None:
    if not points_at_embedded(settings):
        err_console.print(f"[yellow]note:[/] broker_url={settings.broker_url} does not point at this broker "
                          f"(127.0.0.1:{settings.kafka_port}); the app and the replay use broker_url.")
