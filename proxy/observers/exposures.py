"""Exposures and goal conversions, read off each finished exchange (an inline observer: O(flags)).

An experiment flag is exposed when its entry reached the origin: the request head was written
upstream, and the header budget did not leave the flag out. A Split flag's exposure goes to its
source's analytics (impressions). A request that reached a ``[[goals]]`` goal (method, path and the
status the client got) is a conversion of the request's unit.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from proxy.dataplane.exchange import Exchange
from proxy.experiments.analytics import Analytics
from proxy.experiments.goals import Goals
from proxy.experiments.recorder import Recorder


class ExposureObserver:
    name = "experiments"
    inline = True  # appends to bounded queues; the recorder and the sources' analytics write elsewhere

    def __init__(self, recorder: Recorder, goals: Goals, analytics: Mapping[str, Analytics]) -> None:
        self.recorder = recorder
        self.goals = goals
        self.analytics = analytics

    def observe(self, exchange: Exchange) -> None:
        if exchange.control or not exchange.forwarded:
            return
        context = exchange.context
        if context is None:
            return
        unit = context.get("key")
        if unit.__class__ is not str or not unit:
            return
        now = time.time()
        recorder, analytics = self.recorder, self.analytics
        if exchange.resolved and (recorder.active or analytics):
            at = now - exchange.duration_s
            for flag, served in exchange.sent():
                if flag.experiment is not None:
                    if flag.overridden is None:
                        value = served.value
                        # engine.variant_name, inlined: this runs for every experiment flag of every request
                        variant = value if value.__class__ is str else ("true" if value else "false")
                        recorder.exposed(flag.key, variant, unit, at)
                elif analytics:
                    sink = analytics.get(flag.source)
                    if sink is not None:
                        sink.exposed(flag, served, context, int(at * 1000))
        if self.goals and exchange.status and not exchange.client_gone:  # a 499 is nobody's conversion
            for goal in self.goals.reached(exchange.method, exchange.path, exchange.status):
                recorder.converted(goal, unit, now)
                for sink in analytics.values():
                    sink.converted(unit, goal, None, int(now * 1000), None)
