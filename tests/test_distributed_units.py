"""Sharing through Redis, piece by piece, in one process against a real Redis (testbeds/redis.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import anyio
import pytest

from mcp_orchestrator import Orchestrator
from mcp_orchestrator.config import Config, DeduplicationSection, DistributedSection, config_from_mapping
from mcp_orchestrator.distributed.ends import Ending, Outcome
from mcp_orchestrator.distributed.lane import Call
from mcp_orchestrator.distributed.link import where
from mcp_orchestrator.distributed.shared import SharedState
from mcp_orchestrator.errors import ConfigError
from mcp_orchestrator.models import InferResult, Submission
from testbeds.processes import free_port
from testbeds.redis import RedisServer, redis_server
from tests.conftest import wait_for
from tests.support_admission import GatedWorker
from tests.support_distributed import REDIS_TIMEOUT_MS, WAIT_LIMIT_S

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


# ---------------------------------------------------------------------------- configuration


def test_the_file_wins_over_redis_url_and_an_empty_url_turns_sharing_off() -> None:
    env = {"REDIS_URL": "redis://from-env:6379/2"}
    assert DistributedSection().url(env) == "redis://from-env:6379/2"
    assert DistributedSection().url({}) is None
    assert DistributedSection(redis_url="redis://file:6379").url(env) == "redis://file:6379"
    assert DistributedSection(redis_url="").url(env) is None


def test_a_bad_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"distributed": {"redis_url": "http://user:hunter2@host"}}, "team.toml")
    assert "distributed.redis_url" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_status_and_logs_name_redis_without_its_password() -> None:
    assert where("redis://user:hunter2@cache.internal:6380/3", None) == "redis://cache.internal:6380/3"
    assert where("redis://:hunter2@cache.internal", 5) == "redis://cache.internal:6379/5"


def test_without_a_url_redis_is_not_even_imported() -> None:
    code = (
        "import sys; from mcp_orchestrator import Orchestrator; o = Orchestrator(); "
        "print(o.pipeline.sharing is None, 'redis' in sys.modules)"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.split() == ["True", "False"]


# ---------------------------------------------------------------------------- health


async def test_an_unreachable_redis_is_one_warning_and_requests_carry_on(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://admin:hunter2@127.0.0.1:{free_port()}/0"  # nobody listens there
    config = config_from_mapping({"distributed": {"redis_url": url, "timeout_ms": 200}})
    caplog.set_level(logging.WARNING)
    async with Orchestrator(config) as orchestrator:
        results = [await orchestrator.infer(Submission(prompt=f"still works {n}")) for n in range(5)]
        status = orchestrator.status()
    assert [r.text for r in results] == [f"still works {n}" for n in range(5)]
    assert status.distributed is not None and status.distributed.state == "degraded"
    assert status.distributed.local_fallbacks >= 1 and status.reconciles
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "hunter2" not in caplog.text and "admin" not in caplog.text


async def test_sharing_resumes_by_itself_after_a_restart(redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    config = _shared_config(redis, "resume")
    async with Orchestrator(config) as orchestrator:
        await orchestrator.infer(Submission(prompt="before"))
        redis.stop()
        try:
            await orchestrator.infer(Submission(prompt="during"))
            degraded = orchestrator.status().distributed
        finally:
            redis.start()
        with anyio.fail_after(30):
            while True:  # the link's prober notices within 0.5 s; nothing here can signal it
                if orchestrator.status().distributed.state == "ok":  # type: ignore[union-attr]
                    break
                await anyio.sleep(0.05)
        await orchestrator.infer(Submission(prompt="after"))
        shared = orchestrator.status().distributed
    assert degraded is not None and degraded.state == "degraded"
    assert shared is not None and shared.state == "ok" and shared.transitions == 2
    assert "reachable again" in caplog.text


# ---------------------------------------------------------------------------- the shared parts


async def test_the_shared_cache_keeps_its_bounds(redis: RedisServer) -> None:
    dedup = config_from_mapping({"deduplication": {"max_entries": 3}}).deduplication
    state = SharedState(redis.url, _section("bounds"), dedup, 100)
    async with state.running():
        for n in range(5):
            args = state.cache.put_args(f"k{n}", f"answer {n}")
            assert args is not None
            names, values = args
            await state.flights.ends.send(f"k{n}", _ok(), (names, values))
        kept = [await state.flights.join(f"k{n}", look=True, share=False) for n in range(5)]
    assert [joined.verdict for joined in kept] == ["alone", "alone", "hit", "hit", "hit"]
    assert state.cache.put_args("big", "x" * (dedup.max_bytes + 1)) is None


async def test_a_flight_publishes_its_outcome_only_when_another_process_follows(redis: RedisServer) -> None:
    """Distinct prompts (nobody follows) cost no process a message; the first follower's join
    tells the leader (a notice); a follower that joined before the leader ended is told, once,
    and the mark goes with the flight."""
    leader, follower = (SharedState(redis.url, _section("told"), _dedup(), 100) for _ in range(2))
    async with leader.running(), follower.running():
        await _subscribed(leader, follower)
        listener = leader.link.client.pubsub(ignore_subscribe_messages=True)
        await listener.subscribe(leader.keys.events)

        async def published() -> list[tuple[str, str]]:
            messages = []
            with anyio.move_on_after(0.3):
                while True:
                    message = await listener.get_message(ignore_subscribe_messages=True, timeout=0.3)
                    if message is not None:
                        data = json.loads(message["data"])
                        messages.append((data["t"], data["k"]))

            return messages

        assert (await leader.flights.join("alone", look=True, share=True)).verdict == "lead"
        await leader.flights.ends.send("alone", _ok(), None)
        assert await published() == []

        assert (await leader.flights.join("watched", look=True, share=True)).verdict == "lead"
        with follower.flights.watch("watched") as watch:
            assert (await follower.flights.join("watched", look=True, share=True)).verdict == "follow"
            await leader.flights.ends.send("watched", _ok(), None)
            outcome = await watch.wait(5.0)
        assert outcome == _ok()
        assert await published() == [("followed", "watched"), ("flight", "watched")]
        assert not await leader.link.client.exists(leader.keys.followed("watched"), leader.keys.lock("watched"))
        await listener.aclose()  # type: ignore[no-untyped-call]


async def test_a_follower_is_told_even_when_the_leader_holds_a_longer_lock(redis: RedisServer) -> None:
    """A rolling change of lock_ttl_ms: the follower's mark lasts as long as the leader's lock
    (it joins again only then), not just twice its own expiry."""
    leader = SharedState(redis.url, _section("ttl", lock_ttl_ms=5000), _dedup(), 100)
    follower = SharedState(redis.url, _section("ttl", lock_ttl_ms=200), _dedup(), 100)
    async with leader.running(), follower.running():
        await _subscribed(leader, follower)
        assert (await leader.flights.join("long", look=True, share=True)).verdict == "lead"
        with follower.flights.watch("long") as watch:
            joined = await follower.flights.join("long", look=True, share=True)
            assert joined.verdict == "follow" and joined.lock_ms > 4000
            await anyio.sleep(0.6)  # past twice the follower's own expiry
            await leader.flights.ends.send("long", _ok(), None)
            outcome = await watch.wait(2.0)
    assert outcome == _ok()


LONG_DELAY_S = 600.0
"""An end delay no test outlives: an end that goes out did so because it had to, not by time."""


async def test_an_end_nobody_follows_waits_and_goes_out_with_others_in_one_write(redis: RedisServer) -> None:
    state = _waiting_state(redis, "later")
    ends = state.flights.ends
    async with state.running():
        for n in range(3):
            await _lead_and_end(state, f"k{n}", f"answer {n}")
        await anyio.sleep(0.2)  # the background task had its chance: it waits for the delay
        assert await state.link.client.exists(*(state.keys.lock(f"k{n}") for n in range(3))) == 3
        await ends.flush()
        assert (ends.sent, ends.writes) == (3, 1)
        assert not await state.link.client.exists(*(state.keys.lock(f"k{n}") for n in range(3)))
        assert [(await state.flights.join(f"k{n}", look=True, share=False)).answer for n in range(3)] == [
            "answer 0",
            "answer 1",
            "answer 2",
        ]


async def test_a_follower_makes_a_queued_end_go_out_at_once(redis: RedisServer) -> None:
    leader, follower = _waiting_leader_and_follower(redis, "hurry")
    async with leader.running(), follower.running():
        await _subscribed(leader, follower)
        assert (await leader.flights.join("over", look=True, share=True)).verdict == "lead"
        leader.flights.ends.end("over", lambda: (_ok(), None))  # over, its end queued
        with follower.flights.watch("over") as watch:
            assert (await follower.flights.join("over", look=True, share=True)).verdict == "follow"
            with anyio.fail_after(WAIT_LIMIT_S):
                outcome = await watch.wait(WAIT_LIMIT_S)
    assert outcome == _ok()


async def test_a_flight_followed_while_it_runs_ends_at_once(redis: RedisServer) -> None:
    leader, follower = _waiting_leader_and_follower(redis, "early")
    async with leader.running(), follower.running():
        await _subscribed(leader, follower)
        assert (await leader.flights.join("running", look=True, share=True)).verdict == "lead"
        with follower.flights.watch("running") as watch:
            assert (await follower.flights.join("running", look=True, share=True)).verdict == "follow"
            await wait_for(lambda: leader.flights.ends.followed("running"))  # the notice arrived
            leader.flights.ends.end("running", lambda: (_ok(), None))
            with anyio.fail_after(WAIT_LIMIT_S):
                outcome = await watch.wait(WAIT_LIMIT_S)
    assert outcome == _ok()
    assert leader.flights.ends.sent == 1


async def test_queued_ends_go_out_at_shutdown(redis: RedisServer) -> None:
    state = _waiting_state(redis, "last")
    async with state.running():
        await _lead_and_end(state, "last", "the answer")
    async with state.running():
        assert (await state.flights.join("last", look=True, share=False)).answer == "the answer"


async def test_a_process_joining_its_own_ended_flight_sends_the_end_first(redis: RedisServer) -> None:
    """It does not follow a flight that is already over (nobody would end it but itself)."""
    state = _waiting_state(redis, "again")
    async with state.running():
        await _lead_and_end(state, "again", "first answer")
        assert (await state.flights.join("again", look=True, share=True)).answer == "first answer"
        assert (await state.flights.join("again", look=False, share=True)).verdict == "lead"  # the lock went


async def test_an_end_that_cannot_be_built_releases_the_flight(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    leader, follower = _waiting_leader_and_follower(redis, "bug")
    async with leader.running(), follower.running():
        await _subscribed(leader, follower)
        assert (await leader.flights.join("bug", look=True, share=True)).verdict == "lead"
        with follower.flights.watch("bug") as watch:
            assert (await follower.flights.join("bug", look=True, share=True)).verdict == "follow"

            def broken() -> tuple[Outcome, None]:
                raise ValueError("cannot encode")

            leader.flights.ends.end("bug", broken)
            with anyio.fail_after(WAIT_LIMIT_S):
                outcome = await watch.wait(WAIT_LIMIT_S)
    assert outcome == Outcome("released")
    assert "could not share the outcome of flight bug" in caplog.text


async def test_a_notice_that_comes_before_the_join_reply_still_counts(redis: RedisServer) -> None:
    """The notice needs our lock, so it comes after our join ran, but it may be read before
    the join's reply: the flight is known from the moment the join is sent."""
    state = _waiting_state(redis, "race")
    ends = state.flights.ends
    async with state.running():
        await ends.joining("race")
        ends.noticed({"t": "followed", "k": "race"})  # read before the reply
        ends.joined("race", leads=True)
        ends.end("race", lambda: (_ok(), None))
        await wait_for(lambda: ends.sent == 1)
        ends.noticed({"t": "followed", "k": "nobody's"})  # not a flight of ours: nothing kept
        assert not ends.followed("race") and not ends.followed("nobody's")


async def test_a_caller_leaving_while_its_join_sends_the_queued_end_loses_no_end(redis: RedisServer) -> None:
    state = _waiting_state(redis, "leave")
    async with state.running():
        await _lead_and_end(state, "leave", "kept")
        with anyio.CancelScope() as scope:
            scope.cancel()  # the caller is gone before the join sends anything
            await state.flights.join("leave", look=True, share=True)
        assert not await state.link.client.exists(state.keys.lock("leave"))
        assert (await state.flights.join("leave", look=True, share=False)).answer == "kept"


async def test_a_refused_script_in_a_batch_leaves_the_connection_in_step(redis: RedisServer) -> None:
    state = SharedState(redis.url, _section("step"), _dedup(), 100)
    async with state.running():
        script = state.link.client.register_script(
            "if KEYS[1] == 'bad' then return redis.error_reply('refused here') end return KEYS[1]"
        )
        calls: list[Call] = [(["a"], []), (["bad"], []), (["c"], [])]
        first = await state.link.script_many(script, calls)
        assert [reply if isinstance(reply, bytes) else str(reply) for reply in first] == [b"a", "refused here", b"c"]
        assert await state.link.script(script, ["d"], []) == b"d"  # the next reply is its own
        assert state.link.failures == 0


async def test_ends_sent_together_after_redis_forgot_the_script_all_run(redis: RedisServer) -> None:
    state = _waiting_state(redis, "forgot")
    async with state.running():
        for n in range(3):
            await _lead_and_end(state, f"f{n}", f"answer {n}")
        await state.link.client.script_flush()
        await state.flights.ends.flush()
        assert [(await state.flights.join(f"f{n}", look=True, share=False)).answer for n in range(3)] == [
            "answer 0",
            "answer 1",
            "answer 2",
        ]
        assert state.link.failures == 0


async def test_a_script_is_sent_once_on_a_new_connection_after_redis_restarts(redis: RedisServer) -> None:
    """The idle connections die with a restart; the next command notices before sending (no
    retry that could run a script twice) and Redis, restarted empty, gets the script's text."""
    state = SharedState(redis.url, _section("once"), _dedup(), 100)
    async with state.running():
        count = state.link.client.register_script("return redis.call('INCR', KEYS[1])")
        assert await state.link.script(count, ["once:n"], []) == 1
        redis.stop()
        redis.start()
        await anyio.sleep(0.2)  # the closed sockets' end reaches the event loop
        assert await state.link.script(count, ["once:n"], []) == 1  # restarted empty: counted once
        assert await state.link.script(count, ["once:n"], []) == 2
        assert state.link.failures == 0


async def test_the_global_bucket_never_grants_more_than_its_bound(redis: RedisServer) -> None:
    """Three SharedStates (three connections, as three processes would have) take from one
    bucket as fast as they can, never waiting: at most burst + rate * elapsed succeed."""
    states = [SharedState(redis.url, _section("gcra"), _dedup(), 100) for _ in range(3)]
    granted = 0
    async with states[0].running(), states[1].running(), states[2].running():
        started = anyio.current_time()
        for round_ in range(60):
            state = states[round_ % 3]
            buckets = state.limits.buckets(rate=20, burst=4, session_id=None, session_rate=None, session_burst=4)
            reservation = await state.limits.reserve(buckets, 0.0)
            granted += reservation.granted
        elapsed = anyio.current_time() - started
    assert 4 <= granted <= 4 + 20 * elapsed + 1  # + 1: the token refilled at the very end


async def test_a_replay_is_claimed_once_and_only_its_own_claim_is_given_back(redis: RedisServer) -> None:
    states = [SharedState(redis.url, _section("claims"), _dedup(), 100) for _ in range(2)]
    async with states[0].running(), states[1].running():
        claims = [await state.dead_letters.claim("dl-x-1") for state in (*states, states[0])]
        await states[1].dead_letters.release("dl-x-1", claims[1].token)  # not its claim: nothing changes
        still = await states[1].dead_letters.claim("dl-x-1")
        await states[0].dead_letters.release("dl-x-1", claims[0].token)  # its replay never ran
        after = await states[1].dead_letters.claim("dl-x-1")
    assert claims[0].holder is None
    assert claims[1].holder == states[0].owner and claims[2].holder == states[0].owner
    assert still.holder == states[0].owner
    assert after.holder is None


# ---------------------------------------------------------------------------- who runs the first join


def _shared_config(redis: RedisServer, prefix: str) -> Config:
    return config_from_mapping(
        {"distributed": {"redis_url": redis.url, "key_prefix": prefix, "timeout_ms": REDIS_TIMEOUT_MS}}
    )


async def test_a_follower_whose_caller_leaves_still_answers_the_others_waiting_with_it(redis: RedisServer) -> None:
    """Two identical requests in one process wait on another process's flight; the one that
    started the trip leaves, and the other still gets the flight's answer."""
    leading_worker, following_worker = GatedWorker(), GatedWorker()
    config = _shared_config(redis, "handoff")
    async with Orchestrator(config, leading_worker) as leader, Orchestrator(config, following_worker) as follower:
        shared = [o.pipeline.sharing.shared for o in (leader, follower)]  # type: ignore[union-attr]
        await _subscribed(*shared)
        flights = shared[1].flights
        results: list[InferResult] = []
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(leader.infer, Submission(prompt="one answer"))
                await wait_for(lambda: leading_worker.calls == 1)
                leaving = anyio.CancelScope()

                async def first_caller() -> None:
                    with leaving:
                        await follower.infer(Submission(prompt="one answer"))

                tg.start_soon(first_caller)
                await wait_for(lambda: flights.followed == 1)

                async def second_caller() -> None:
                    results.append(await follower.infer(Submission(prompt="one answer")))

                tg.start_soon(second_caller)
                await wait_for(lambda: len(follower.pipeline.ledger.live) == 2)
                leaving.cancel()  # the first caller leaves while following
                await wait_for(lambda: follower.status().totals.cancelled == 1)
                leading_worker.open()
        status = follower.status()
    assert following_worker.calls == 0
    assert [(r.text, r.coalesced) for r in results] == [("one answer", True)]
    assert (status.totals.cancelled, status.totals.completed, status.totals.in_flight) == (1, 1, 0)
    assert status.reconciles and leader.status().reconciles


async def test_a_caller_leaving_while_its_join_is_unanswered_gives_the_lock_back(redis: RedisServer) -> None:
    """The caller leaves while Redis holds its join unanswered (CLIENT PAUSE here; in life a
    slow Redis, which may run a script whose connection has since closed): the join is still
    read to its end, and the lock it took is given back at once, not left to expire while the
    same request in every other process follows a flight nobody runs (a minute here)."""
    config = config_from_mapping(
        {
            "distributed": {
                "redis_url": redis.url,
                "key_prefix": "unanswered",
                "timeout_ms": REDIS_TIMEOUT_MS,
                "lock_ttl_ms": 60_000,
            }
        }
    )
    async with Orchestrator(config) as leaving, Orchestrator(config) as other:
        client = leaving.pipeline.sharing.shared.link.client  # type: ignore[union-attr]
        with anyio.fail_after(WAIT_LIMIT_S):
            await leaving.infer(Submission(prompt="first"))  # Redis has the join script (no NOSCRIPT below)
            while await client.keys("unanswered:flight:*"):  # noqa: ASYNC110 - Redis has no event for it
                await anyio.sleep(0.01)  # "first"'s end has run: the one script Redis will hold is the join
            await client.client_pause(int(WAIT_LIMIT_S * 1000), all=False)  # scripts wait, unanswered
            try:
                caller = anyio.CancelScope()

                async def call() -> None:
                    with caller:
                        await leaving.infer(Submission(prompt="one answer"))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(call)
                    while (await client.info("clients"))["blocked_clients"] == 0:  # noqa: ASYNC110
                        await anyio.sleep(0.01)  # until Redis holds the join (no event tells)
                    caller.cancel()
            finally:
                await client.client_unpause()
            while await client.keys("unanswered:flight:*"):  # noqa: ASYNC110
                await anyio.sleep(0.01)  # until no flight's lock is left
            result = await other.infer(Submission(prompt="one answer"))
        left, status = leaving.status().distributed, other.status().distributed
    assert left is not None and left.flights_led == 2  # "first", and the join that ran after its caller left
    assert (result.text, result.coalesced) == ("one answer", False)
    assert status is not None and (status.flights_led, status.flights_followed) == (1, 0)
    assert leaving.status().reconciles and other.status().reconciles


async def test_a_lock_a_timed_out_join_took_is_given_back_when_redis_answers_again(redis: RedisServer) -> None:
    """Redis stalled: the join timed out and the request ran on this process alone, but Redis
    ran the join once it went on and the lock (a minute long here) is this process's. When
    Redis answers again, the lock is given back, and another process asking for the same
    answer leads at once instead of following a flight nobody runs."""

    def config(timeout_ms: int) -> Config:
        section = {"redis_url": redis.url, "key_prefix": "stalled", "timeout_ms": timeout_ms, "lock_ttl_ms": 60_000}
        return config_from_mapping({"distributed": section})

    async with Orchestrator(config(200)) as stalled, Orchestrator(config(REDIS_TIMEOUT_MS)) as other:
        client = other.pipeline.sharing.shared.link.client  # type: ignore[union-attr]
        with anyio.fail_after(WAIT_LIMIT_S):
            await stalled.infer(Submission(prompt="first"))  # Redis has the scripts (no NOSCRIPT below)
            while await client.keys("stalled:flight:*"):  # noqa: ASYNC110 - Redis has no event for it
                await anyio.sleep(0.01)  # "first"'s end has run
            with redis.paused():
                alone = await stalled.infer(Submission(prompt="one answer"))
            degraded = stalled.status().distributed
            while stalled.status().distributed.state != "ok":  # type: ignore[union-attr]  # noqa: ASYNC110
                await anyio.sleep(0.05)  # the link's prober finds Redis again (every 0.5 s)
            while await client.keys("stalled:flight:*"):  # noqa: ASYNC110
                await anyio.sleep(0.01)
            result = await other.infer(Submission(prompt="one answer"))
        status = other.status().distributed
    assert alone.text == "one answer" and degraded is not None and degraded.local_fallbacks >= 1
    assert (result.text, result.coalesced) == ("one answer", False)
    assert status is not None and (status.flights_led, status.flights_followed) == (1, 0)
    assert stalled.status().reconciles and other.status().reconciles


async def _subscribed(*states: SharedState) -> None:
    """Wait for each state's events subscription: one made later wakes every follower ("released")."""
    await wait_for(lambda: all(state.events.connected for state in states))


def _section(prefix: str, **fields: int) -> DistributedSection:
    """Sharing under `prefix`, with the tests' generous command timeout (see REDIS_TIMEOUT_MS)."""
    return DistributedSection(key_prefix=prefix, timeout_ms=REDIS_TIMEOUT_MS, **fields)


def _ok() -> Outcome:
    return Outcome("ok", answer="{}")


def _waiting_state(redis: RedisServer, prefix: str) -> SharedState:
    """One process's state whose unfollowed ends would wait LONG_DELAY_S."""
    state = SharedState(redis.url, _section(prefix), _dedup(), 100)
    state.flights.ends.delay_s = LONG_DELAY_S
    return state


def _waiting_leader_and_follower(redis: RedisServer, prefix: str) -> tuple[SharedState, SharedState]:
    """Two processes' states; the leader's unfollowed ends would wait LONG_DELAY_S."""
    return _waiting_state(redis, prefix), SharedState(redis.url, _section(prefix), _dedup(), 100)


async def _lead_and_end(state: SharedState, key: str, answer: str) -> None:
    """Lead the flight of `key`, then queue its end, which stores `answer` in the shared cache."""
    assert (await state.flights.join(key, look=True, share=True)).verdict == "lead"
    state.flights.ends.end(key, _cached(state, key, answer))


def _cached(state: SharedState, key: str, answer: str) -> Ending:
    """An end that stores `answer` in the shared cache."""
    put = state.cache.put_args(key, answer)
    return lambda: (Outcome("ok", answer=answer), put)


def _dedup() -> DeduplicationSection:
    return config_from_mapping({}).deduplication
