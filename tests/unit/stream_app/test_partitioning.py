"""stream_app.partitioning: the Java/murmur2 rule (the owner of a key) and librdkafka's CRC32 rule."""

from __future__ import annotations

import zlib

import pytest
from aiokafka.partitioner import DefaultPartitioner

from stream_app.partitioning import crc32_partition, java_partition, owner

# Kafka's own test of Utils.murmur2 (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java):
# signed 32-bit Java ints.
JAVA_MURMUR2 = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
                b"a-little-bit-longer-string": -1486304829,
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, b"abc": 479470107}


@pytest.mark.parametrize("key, java_hash", JAVA_MURMUR2.items())
def test_java_rule_is_toPositive_of_the_java_murmur2(key, java_hash):
    for n in (1, 3, 4, 12, 100):
        assert java_partition(key, n) == (java_hash & 0x7FFFFFFF) % n  # Utils.toPositive(murmur2) % n


def test_java_rule_matches_aiokafka_default_partitioner_and_owner():
    parts = list(range(7))
    for i in range(2000):
        key = f"user-{i}".encode()
        assert java_partition(key, 7) == DefaultPartitioner()(key, parts, parts) == owner(key, 7)


def test_the_two_rules_place_u1_to_u8_as_the_clients_were_seen_to():
    keys = [f"u{i}".encode() for i in range(1, 9)]
    # the Java console producer and aiokafka; kcat (librdkafka's default consistent_random)
    assert [java_partition(k, 4) for k in keys] == [0, 2, 2, 2, 3, 2, 2, 2]
    assert [crc32_partition(k, 4) for k in keys] == [2, 0, 2, 1, 3, 1, 3, 2]
    assert crc32_partition(b"u1", 4) == zlib.crc32(b"u1") % 4
    # so a mixed fleet of producers splits most users across two partitions
    assert sum(java_partition(k, 4) != crc32_partition(k, 4) for k in keys) == 5
