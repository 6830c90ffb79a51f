"""The worker's Faust agent, task, web page and shutdown hook, registered on an app by :func:`install`.

``process_events`` (concurrency 1, manual acks) hands every message to the
:class:`~stream_app.pipeline.Pipeline`, and so does ``process_rerouted`` for the repartition topic
(the events that arrived on a partition their key does not belong to, forwarded by the pipeline); ``follow_model_updates`` runs the worker's group-less
reader of ``model-updates`` (:class:`~stream_app.updates.ModelUpdateListener`), so every update
reaches every worker; ``/metrics`` serves the Prometheus metrics (:mod:`stream_app.monitoring`);
``/healthz`` answers 503 when the worker is stalled (:mod:`stream_app.health`). Faust's own views
(``/table``, ``/router``) are off (stream_app/app.py).
``sweep_idle_users`` (a timer, when ``state_idle_ttl_s`` > 0) asks for idle
users to be forgotten (:meth:`~stream_app.pipeline.Pipeline.sweep`, docs/privacy.md).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

from models.predictor import Predictor
from stream_app import dashboard, monitoring
from stream_app.health import HealthWatch, PartitionWatch, consumer_sample, partition_state
from stream_app.pipeline import Pipeline, Publisher
from stream_app.settings import SettingsType
from stream_app.updates import ModelUpdateListener

log = logging.getLogger(__name__)


def install(app: Any, topology: Any, *, predictor_factory: Callable[[SettingsType], Predictor] | None = None,
             publisher: Publisher | None = None) -> Pipeline:
    """Register the agent, the ``/metrics`` page and the shutdown hook on ``app``."""
    pipeline = Pipeline(app, topology, predictor_factory, publisher)
    app.pipeline = pipeline

    @app.on_partitions_revoked.connect
    def forget_revoked_acks(sender: Any, revoked: Any, **kwargs: Any) -> None:  # noqa: ARG001 - signal API
        """A revoked partition's unacked messages are the next owner's: stop holding acks for them."""
        pipeline.ack_order.forget(revoked)

    inputs = [topology.settings.topic_events] + ([topology.settings.topic_repartition]
                                                 if topology.repartition is not None else [])

    @app.on_partitions_assigned.connect
    def count_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:  # noqa: ARG001 - signal API
        """``nextaction_assigned_partitions{topic}``: how the group shares the input topics."""
        for topic in inputs:
            monitoring.ASSIGNED_PARTITIONS.labels(topic).set(sum(1 for tp in assigned if tp.topic == topic))

    @app.agent(topology.events, name="process_events", concurrency=1)
    async def process_events(stream):
        """Validate, update state, queue for prediction. Yields what happened to each message."""
        await pipeline.start_batcher()
        manual = stream.noack()
        async for event in manual.events():
            result = await pipeline.handle(event, manual)
            health.progressed()
            yield result

    if topology.repartition is not None:
        @app.agent(topology.repartition, name="process_rerouted", concurrency=1)
        async def process_rerouted(stream):
            """The events the pipeline forwarded to the partition that owns their key: same handling."""
            await pipeline.start_batcher()
            manual = stream.noack()
            async for event in manual.events():
                yield await pipeline.handle(event, manual)

        pipeline.rerouted_agent = process_rerouted

    listener = ModelUpdateListener(topology.settings, pipeline.handle_model_update,
                                   catch_up=topology.settings.model_updates_catch_up)
    pipeline.model_updates = listener

    @app.task
    async def follow_model_updates():
        """Every worker follows ``model-updates`` itself (no consumer group): see stream_app.updates."""
        await listener.run()

    settings = topology.settings
    if settings.state_idle_ttl_s > 0:
        @app.timer(settings.state_sweep_interval_s, name="sweep_idle_users")
        async def sweep_idle_users():
            """Forget users idle longer than ``state_idle_ttl_s`` (through the agent: Pipeline.sweep)."""
            try:
                await pipeline.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next tick; never stop the worker
                log.exception("idle sweep failed")

    @app.page("/metrics")
    async def prometheus_metrics(web, request):
        body, content_type = monitoring.render()
        return web.bytes(body, content_type=content_type)

    health = HealthWatch(topology.settings.health_stall_s)
    app.health = health

    @app.page("/healthz")
    async def healthz(web, request):
        """200 while the worker keeps up, 503 when input waits and it is stalled (stream_app.health)."""
        try:
            lag, committed = consumer_sample(app.consumer, topology.settings.topic_events)
        except Exception as exc:  # noqa: BLE001 - no consumer yet (starting): judged on the clocks alone
            log.debug("healthz: no consumer sample (%s)", exc)
            lag, committed = 0, {}
        state = health.check(lag, committed)
        return web.json(state, status=200 if state["ok"] else 503)

    watch = PartitionWatch(topology.settings.health_stall_s)

    @app.timer(5.0)
    async def _sample_commits():  # commits are noticed even when nobody asks /healthz
        topic = topology.settings.topic_events
        with contextlib.suppress(Exception):
            health.observe(consumer_sample(app.consumer, topic)[1])
        try:
            state = partition_state(app.consumer, topic)
        except Exception as exc:  # noqa: BLE001 - no consumer yet (starting)
            log.debug("partition watch: no consumer state (%s)", exc)
            return
        for p in watch.update(state):
            s = state[p]
            log.warning("%s[%d]: %s records wait and its committed offset has not moved for %.0f s; consumer "
                        "state: %s, flow %s", topic, p, (s["highwater"] or 0) - (s["committed"] or 0),
                        watch.stall_s, s, getattr(app.consumer, "flow_active", None))
        monitoring.PARTITIONS_STALLED.labels(topic).set(len(watch.stalled))

    @app.on_before_shutdown.connect
    async def _stop_batcher(app_, **kwargs):  # after Faust waited for in-flight events (stream_wait_empty)
        await pipeline.stop_batcher()

    pipeline.agent = process_events
    dashboard.install(app, pipeline, settings)  # /dashboard: live charts + user inspector (stream_app/dashboard.py)
    return pipeline
