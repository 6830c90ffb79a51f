"""The one seeded synthetic event generator: shoppers in sessions over a fixed catalogue.

:func:`events` yields time-ordered event dicts in the ``events`` topic schema (``user_id``,
``item_id``, ``action``, ``ts``, ``session_id``, ``device``, ``location``, ``category``, and
``price`` on cart/purchase), fully determined by its arguments. The catalogue (items, categories,
popularity, related items, prices) depends on ``n_items`` alone, so two seeds over the same
``n_items`` share it: ``nextaction demo`` trains on one seed and streams another.
:func:`synthetic` is the same events as a :class:`~models.datasets.core.Dataset`
(``models.datasets.load("synthetic", ...)``); ``stream_app.replay.synthetic`` streams them, with
malformed events mixed in.

>>> evs = list(events(200, 10, seed=7, n_items=100))
>>> len(evs), evs == list(events(200, 10, seed=7, n_items=100))
(200, True)
>>> sorted(evs[0])
['action', 'category', 'device', 'item_id', 'location', 'session_id', 'ts', 'user_id']
>>> ds = synthetic(n_users=20, n_items=100, seed=1)
>>> len(ds.sequences), len(ds.items), ds.has_time, ds.has_actions
(20, 100, True, True)
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Iterator
from itertools import accumulate

from models.datasets.core import Dataset, dataset_from_columns
from models.errors import DatasetError
from models.schema import ACTION_INDEX

__all__ = ["N_ITEMS", "START_MS", "Catalog", "events", "synthetic"]

N_ITEMS = 500  #: default catalogue size
START_MS = 1_700_000_000_000  #: 2023-11-14T22:13:20Z: fixed, so the arguments fully determine the events
_DEVICES = ("ios", "android", "web")
_DEVICE_W = (0.45, 0.40, 0.15)
_LOCATIONS = ("de-be", "de-by", "fr-idf", "es-md", "it-lo", "gb-lnd", "us-ca", "us-ny", "us-tx", "br-sp",
              "in-mh", "jp-13", "cn-bj", "au-nsw", "ca-on", "mx-cmx", "pl-mz", "nl-nh", "se-ab", "kr-11")
# next action given the previous one (same item for click/cart/fav/purchase; "view" = another item)
_FUNNEL = {
    "view": (("view", 0.68), ("click", 0.15), ("cart", 0.12), ("fav", 0.05)),
    "click": (("view", 0.65), ("cart", 0.25), ("fav", 0.10)),
    "cart": (("purchase", 0.70), ("view", 0.30)),
    "fav": (("view", 0.80), ("cart", 0.20)),
    "purchase": (("view", 1.0),),
}


class Catalog:
    """``n_items`` items (``i0`` ...) in categories, Zipf popularity within a category, a fixed
    "related items" structure and prices: a function of ``n_items`` only."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.n_cat = min(n_items, max(3, min(40, n_items // 25)))
        self.items = [f"i{i}" for i in range(n_items)]
        self.by_cat: list[list[str]] = [self.items[c::self.n_cat] for c in range(self.n_cat)]
        self.cum = [list(accumulate(1.0 / (r + 1) ** 1.1 for r in range(len(items)))) for items in self.by_cat]
        prices = random.Random(n_items)
        self.price = {item: round(prices.lognormvariate(3.2, 0.8), 2) for item in self.items}
        self.cat_of = {item: c for c, items in enumerate(self.by_cat) for item in items}
        self.rank = {item: r for items in self.by_cat for r, item in enumerate(items)}

    def sample(self, cat: int, rng: random.Random) -> str:
        cum = self.cum[cat]
        return self.by_cat[cat][bisect.bisect_left(cum, rng.random() * cum[-1])]

    def related(self, item: str, rng: random.Random) -> str:
        """One of the next 3 items in its category's list (co-viewed items)."""
        items = self.by_cat[self.cat_of[item]]
        return items[(self.rank[item] + 1 + int(rng.random() * 3)) % len(items)]


def _user_events(uid: str, n: int, catalog: Catalog, rng: random.Random) -> Iterator[dict]:
    prefs = rng.sample(range(catalog.n_cat), k=min(catalog.n_cat, rng.choice((1, 2, 2, 3))))
    pref_w = list(accumulate(rng.random() + 0.2 for _ in prefs))
    devices = [rng.choices(_DEVICES, _DEVICE_W)[0]]
    if rng.random() < 0.2:
        devices.append(rng.choice([d for d in _DEVICES if d != devices[0]]))
    location = rng.choice(_LOCATIONS)
    ts = START_MS + int(rng.random() * 6 * 3600 * 1000)
    emitted, session = 0, 0
    while emitted < n:
        session += 1
        device = devices[0] if len(devices) == 1 or rng.random() < 0.7 else devices[1]
        length = max(1, min(n - emitted, int(rng.expovariate(1 / 7.0)) + 1))
        item, action = None, None
        for j in range(length):
            if j:
                ts += max(1000, int(rng.lognormvariate(math.log(25_000), 1.0)))  # in-session gap ~25 s
                nxt = rng.random()
                for action_next, p in _FUNNEL[action]:
                    nxt -= p
                    if nxt < 0:
                        break
                action = action_next
                if action == "view":
                    item = (catalog.related(item, rng) if rng.random() < 0.5
                            else catalog.sample(prefs[bisect.bisect_left(pref_w, rng.random() * pref_w[-1])], rng))
            else:
                action = "view"
                item = catalog.sample(prefs[bisect.bisect_left(pref_w, rng.random() * pref_w[-1])], rng)
            ev = {"user_id": uid, "item_id": item, "action": action, "ts": ts, "session_id": f"{uid}-s{session}",
                  "device": device, "location": location, "category": f"c{catalog.cat_of[item]}"}
            if action in ("cart", "purchase"):
                ev["price"] = catalog.price[item]
            yield ev
        emitted += length
        ts += max(600_000, int(rng.lognormvariate(math.log(4 * 3600_000), 1.0)))  # between sessions ~4 h


def events(n_events: int, n_users: int, seed: int = 0, n_items: int = N_ITEMS, *, min_per_user: int = 1,
           max_per_user: int | None = None) -> Iterator[dict]:
    """``n_events`` time-ordered events of ``min(n_users, n_events)`` users over a catalogue of
    ``n_items``, fully determined by the arguments.

    Users have 1–3 preferred categories, a main device (sometimes a second one) and a location;
    their activity is heavy-tailed (log-normal weights; each user gets at least ``min_per_user``
    events, and at most ``max_per_user``, which may leave the total short of ``n_events``).
    Sessions (mean ~8 events, gaps log-normal around 25 s) follow a view → click/cart/fav →
    purchase funnel on the same item (a cart is mostly bought next); a new view is either a
    related item (the next few of its category: a learnable successor structure) or a Zipf-popular
    item of a preferred category. Sessions are separated by hours. Timestamps start at
    :data:`START_MS` and are strictly increasing per user.
    """
    if n_events < 0 or n_users < 1 or n_items < 1 or min_per_user < 1:
        raise DatasetError(f"synthetic: need n_events >= 0, n_users >= 1, n_items >= 1 and min_per_user >= 1 "
                           f"(got {n_events}, {n_users}, {n_items}, {min_per_user})")
    if max_per_user is not None and max_per_user < min_per_user:
        raise DatasetError(f"synthetic: max_per_user {max_per_user} < min_per_user {min_per_user}")
    if n_events == 0:
        return
    if n_events < min_per_user:
        raise DatasetError(f"synthetic: n_events {n_events} < min_per_user {min_per_user}")
    rng = random.Random(seed)
    n_users = min(n_users, n_events // min_per_user)
    catalog = Catalog(n_items)
    weights = [rng.lognormvariate(0.0, 1.0) for _ in range(n_users)]
    total_w = sum(weights)
    extra = max(0, n_events - min_per_user * n_users)
    counts = [min_per_user + int(extra * w / total_w) for w in weights]
    by_activity = sorted(range(n_users), key=lambda u: -weights[u])
    for i in range(max(0, n_events - sum(counts))):  # rounding remainder, to the most active users first
        counts[by_activity[i % n_users]] += 1
    if max_per_user is not None:
        counts = [min(c, max_per_user) for c in counts]
    width = len(str(n_users - 1))
    streams = [_user_events(f"u{u:0{width}d}", counts[u], catalog, random.Random(seed * 1_000_003 + u))
               for u in range(n_users)]
    yield from heapq.merge(*streams, key=lambda e: e["ts"])


def synthetic(n_users: int = 500, n_items: int = N_ITEMS, seed: int = 0, events_per_user: int = 20,
              min_len: int = 5, max_len: int | None = None) -> Dataset:
    """:func:`events` (``n_users * events_per_user`` of them, ``min_len`` to ``max_len`` per user)
    as a Dataset whose catalogue is all ``n_items`` items, in id order."""
    if events_per_user < min_len:
        raise DatasetError(f"synthetic: events_per_user {events_per_user} < min_len {min_len}")
    evs = list(events(n_users * events_per_user, n_users, seed, n_items, min_per_user=min_len,
                      max_per_user=max_len))

    def col(name: str) -> list:
        return [e[name] for e in evs]

    return dataset_from_columns(
        "synthetic", col("user_id"), col("item_id"), col("ts"), [ACTION_INDEX[a] for a in col("action")],
        col("device"), col("location"), col("category"), item_order=Catalog(n_items).items, has_actions=True,
        meta={"seed": seed, "n_users": n_users, "n_items": n_items, "events_per_user": events_per_user,
              "min_len": min_len, "max_len": max_len})
