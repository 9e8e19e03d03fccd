"""--gc-interval: no automatic full collections, one on a timer, the start-up heap frozen."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.task import Clock

from pushsvc import gcpolicy


class Node:
    """An object in a reference cycle: only the cycle collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_full_collections_run_on_the_timer_and_not_on_their_own() -> None:
    before = gc.get_threshold()
    service = gcpolicy.FullCollections(60)
    service.clock = Clock()
    service.startService()
    try:
        assert gc.get_threshold() == (*gcpolicy.YOUNG, gcpolicy.NEVER)
        assert gc.get_freeze_count() > 0  # the start-up heap is out of every collection
        cycle = Node()
        alive = weakref.ref(cycle)
        del cycle
        service.clock.advance(60)  # the timer's full collection frees whatever is left
        assert alive() is None
    finally:
        service.stopService()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_option_defaults_to_a_minute_and_zero_keeps_cpythons_schedule() -> None:
    from pushsvc.tap import PushOptions, makeService

    opts = PushOptions()
    opts.parseOptions(["--ws-port=tcp:0", "--text-port=tcp:0", "--http-port=off"])
    assert opts["gc-interval"] == 60.0
    kinds = {type(s) for s in makeService(opts)}
    assert gcpolicy.FullCollections in kinds
    opts = PushOptions()
    opts.parseOptions(["--ws-port=tcp:0", "--text-port=tcp:0", "--gc-interval=0"])
    assert gcpolicy.FullCollections not in {type(s) for s in makeService(opts)}
