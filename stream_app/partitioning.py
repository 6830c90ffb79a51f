"""Which partition a record key belongs to, by the rules Kafka clients use (pure).

The worker keeps one history per user only if every event of the user reaches the partition that
owns the user's table rows. A worker's table partition N lives with ``events`` partition N, so a
user whose events arrive on two partitions (producers with different partitioners, or a random
one) would get two histories. The worker takes the rule of the Java clients, which Faust's own
producer (aiokafka) and Kafka Streams share, as the owner of a key (:func:`owner`), and re-routes
an event that arrived elsewhere through its repartition topic (:mod:`stream_app.pipeline`).

=========================  ===================================================  ==========================
rule                       who uses it                                          partition of a key
=========================  ===================================================  ==========================
murmur2 (Java)             Java clients, Kafka Streams, aiokafka, Faust,        ``murmur2(key) & 0x7fffffff
                           librdkafka with ``partitioner=murmur2_random``        % n``
CRC32 (``consistent``)     librdkafka's default ``consistent_random``: kcat,    ``crc32(key) % n``
                           confluent-kafka (Python), Go, .NET, Node wrappers
=========================  ===================================================  ==========================

>>> [java_partition(f"u{i}".encode(), 4) for i in range(1, 9)]
[0, 2, 2, 2, 3, 2, 2, 2]
>>> [crc32_partition(f"u{i}".encode(), 4) for i in range(1, 9)]
[2, 0, 2, 1, 3, 1, 3, 2]
"""

from __future__ import annotations

import zlib
from functools import lru_cache

from aiokafka.partitioner import murmur2


def java_partition(key: bytes, n: int) -> int:
    """The partition the Java clients' default partitioner gives a non-empty key (``Utils.toPositive(
    Utils.murmur2(key)) % n``); aiokafka's ``DefaultPartitioner`` is the same function."""
    return (murmur2(key) & 0x7FFFFFFF) % n


def crc32_partition(key: bytes, n: int) -> int:
    """librdkafka's ``consistent`` / ``consistent_random`` rule for a non-empty key: ``crc32(key) % n``."""
    return zlib.crc32(key) % n


@lru_cache(maxsize=65_536)
def owner(key: bytes, n: int) -> int:
    """The partition that owns ``key`` among ``n``: :func:`java_partition` (cached: users repeat)."""
    return java_partition(key, n)
