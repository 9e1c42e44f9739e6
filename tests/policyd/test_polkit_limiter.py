"""polkit checks in flight are bounded per caller uid and in total: a caller that opens
authentication dialogs and never answers them gets Busy instead of using up policyd's
pending-reply budget with the bus daemon (which libxl's Attach needs too). No daemon needed."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from policyd.bus.polkit import Limiter
from policyd.errors import Busy


def test_per_uid_and_total_bounds() -> None:
    async def scenario() -> None:
        limiter = Limiter(per_uid=2, total=3)
        async with contextlib.AsyncExitStack() as held:
            await held.enter_async_context(limiter.slot(1000))
            await held.enter_async_context(limiter.slot(1000))
            with pytest.raises(Busy, match="uid 1000"):
                await held.enter_async_context(limiter.slot(1000))
            await held.enter_async_context(limiter.slot(1001))  # another uid still fits
            with pytest.raises(Busy):
                await held.enter_async_context(limiter.slot(1002))  # the total is reached
        assert not limiter.in_flight  # every slot released
        async with limiter.slot(1000):  # and usable again
            assert limiter.in_flight[1000] == 1

    asyncio.run(scenario())


def test_slot_released_when_the_check_fails() -> None:
    async def scenario() -> None:
        limiter = Limiter(per_uid=1, total=1)
        with pytest.raises(RuntimeError):
            async with limiter.slot(7):
                raise RuntimeError("polkit said no")
        async with limiter.slot(7):
            pass

    asyncio.run(scenario())
