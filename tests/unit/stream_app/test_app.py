"""stream_app.app: the security defaults of the Faust app (the HTTP answers of a real worker are in
tests/integration/test_security.py)."""

from __future__ import annotations


def test_faust_table_and_router_views_are_off_and_the_web_server_binds_loopback(make_app):
    app, _ = make_app()
    conf = app.conf
    assert not conf.web_tables_enabled and not conf.web_router_enabled
    assert not conf.web_graph_enabled and not conf.web_stats_enabled
    mounted = [prefix for prefix, _ in app.web._enabled_blueprints()]
    assert "/table" not in mounted and "/router" not in mounted
    assert conf.web_bind == "127.0.0.1" and conf.web_host == "127.0.0.1"
    assert conf.broker_credentials is None  # PLAINTEXT by default


def test_sasl_settings_reach_faust(make_app):
    import faust

    app, _ = make_app(kafka_security_protocol="SASL_SSL", kafka_sasl_username="nx", kafka_sasl_password="pw",
                      kafka_sasl_mechanism="SCRAM-SHA-512")
    creds = app.conf.broker_credentials
    assert isinstance(creds, faust.SASLCredentials) and creds.mechanism.value == "SCRAM-SHA-512"
    assert creds.protocol.value == "SASL_SSL" and creds.ssl_context is not None


def test_every_table_store_gets_the_bounded_rocksdb_options(make_app):
    """Faust's defaults (64 MiB × 3 memtables, a 2 GiB block cache per table partition) would let a
    worker's memory grow by gigabytes; the settings reach the real RocksDB store of every table."""
    app, _ = make_app(rocksdb_write_buffer_mb=4, rocksdb_write_buffers=2, rocksdb_block_cache_mb=16)
    stores = [app.topology.histories.data]
    for store in stores:
        o = store.rocksdb_options
        assert (o.write_buffer_size, o.max_write_buffer_number, o.block_cache_size) == (4 << 20, 2, 16 << 20)
