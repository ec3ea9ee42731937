"""Warm pools: sandboxes made ahead of time with a profile's default inputs, which a
matching create claims instead of waiting for a cold one (docs/pools.md).

Every worker runs a `PoolKeeper`. Filling, recycling and draining a profile's pool
happens under that profile's short-lived lock in KV (sandboxer/store/pool_kv.py),
after the read model has caught up with the end of the stream, so two workers never
count the same deficit. Members are ordinary sandboxes on the operator account
`pool`, made through the one create path with `CreateRequest.pool` set and a label
holding the profile's fingerprint (a changed profile drains the old members).

A claim is a create-if-absent of `claim.<member>` in KV (one of several racing
creates wins it) followed by `ClaimSandbox`, which the member's driving worker turns
into `SandboxClaimed` only if that intent still holds and nobody claimed the member
before (checked under the aggregate's lock). A claimer that dies between the two
leaves an intent whose worker session is gone: the keeper undoes it (the member goes
back to the pool untouched; its caller never got an answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec

from events import EventMeta, SandboxClaimed
from events.base import utc_now
from extensions import Metered
from projections.sandboxes import SandboxView
from sandboxer.app.commands import (
    AnyCommand,
    ClaimSandbox,
    CreateSandbox,
    DestroySandbox,
    Outcome,
)
from sandboxer.app.failpoints import failpoint
from sandboxer.app.ledger import POOL_ACCOUNT
from sandboxer.app.lifecycle import TERMINAL, State
from sandboxer.app.manager import (
    AlreadyCreated,
    CreateInProgress,
    CreateRequest,
    Sandbox,
    SandboxManager,
)
from sandboxer.app.steps import HookFailed
from sandboxer.errors import Conflict, SandboxerError
from sandboxer.ids import check_account, check_labels, new_correlation_id
from sandboxer.metrics import Metrics
from sandboxer.profiles import Profile, ProfileError
from sandboxer.store.pool_kv import PoolKV

log = logging.getLogger(__name__)

ACTOR_POOL = "system:pool-keeper"
FINGERPRINT_LABEL = "sandboxer.pool/fingerprint"
POOL_INTERVAL = 1.0  # seconds between the keeper's passes (a claim wakes it at once)
TTL_MARGIN = 300  # a member's own TTL: max_age_seconds plus this, a backstop
REJECT_BACKOFF = 30.0  # after a member was rejected (no capacity), wait before refilling
CATCH_UP_SECONDS = 10.0
KEY_WAIT = 10.0  # how long a retry waits for its key's claim in flight to be recorded

Handle = Callable[[AnyCommand], Awaitable[Outcome]]


class ClaimRefused(Conflict):
    """The member was claimed already, or the claim intent is no longer this one."""

    wire = "pool_claim_refused"


class KeyLost(Exception):
    """Another create of the same Idempotency-Key bound (or moved) it first."""


@dataclasses.dataclass
class KeyHold:
    """An Idempotency-Key (as its derived id) this create is binding, and the binding's
    revision once read or written (None: unbound yet)."""

    key_id: str
    revision: int | None = None


def fingerprint(profile: Profile) -> str:
    """What a member was made from: any change but the description drains members."""
    made = msgspec.structs.replace(profile, description="")
    return hashlib.sha256(msgspec.json.encode(made)).hexdigest()[:16]


class PoolStatus(msgspec.Struct, frozen=True, kw_only=True):
    profile: str
    size: int
    ready: int
    provisioning: int
    max_age_seconds: int
    claimed: int  # members claimed by creates that are still live


class PoolKeeper:
    def __init__(
        self,
        manager: SandboxManager,
        kv: PoolKV,
        handle: Handle,
        holder: Callable[[], str],
        *,
        interval: float = POOL_INTERVAL,
        metrics: Metrics | None = None,
    ) -> None:
        self.manager = manager
        self.metrics = metrics or Metrics()
        self.kv = kv
        self.handle = handle
        self.holder = holder
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._made: dict[str, str] = {}  # member id -> profile, made by this worker
        self._backoff: dict[str, float] = {}  # profile -> monotonic time to fill again
        self.passes = 0  # passes over every pool so far (tests wait on it)
        self.check()

    def check(self) -> None:
        """Refuse, at start, a pool this keeper cannot keep: one with an input that has
        no default."""
        for profile in self.manager.profiles.profiles.values():
            if profile.pool is None or profile.pool.size == 0:
                continue
            try:
                profile.resolve_inputs({})
            except ProfileError as exc:
                raise ProfileError(
                    f"{profile.name}: pool members use the default inputs: {exc}", "pool"
                ) from None

    # ---- running ---------------------------------------------------------------------

    def start(self) -> None:
        self.manager.steps.pool_load = self.held
        self.manager.steps.evict = self.evict
        self._task = asyncio.create_task(self._run(), name="pool-keeper")

    async def stop(self) -> None:
        self.manager.steps.pool_load = None
        self.manager.steps.evict = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while not self.manager.closing:
            try:
                await self.keep_all()
            except Exception:
                log.exception("pool keeper pass failed; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()

    # ---- what the pools hold -----------------------------------------------------------

    def _live(self) -> list[SandboxView]:
        manager = self.manager
        views = [s.view for s in manager.sandboxes.values() if s.view is not None]
        return [*views, *manager.foreign.values()]

    def members(self, profile: str) -> list[SandboxView]:
        """Live unclaimed members of the profile's pool, oldest first."""
        found = [
            v
            for v in self._live()
            if v.pool == profile and v.claimed_at is None and v.state not in TERMINAL
        ]
        return sorted(found, key=lambda v: (v.created_at, v.id))

    def names(self) -> list[str]:
        """Profiles with a pool, and profiles that live members were made for."""
        with_pool = {n for n, p in self.manager.profiles.profiles.items() if p.pool is not None}
        held = {v.pool for v in self._live() if v.pool is not None and v.claimed_at is None}
        return sorted(with_pool | held)

    def status(self) -> list[PoolStatus]:
        live = self._live()
        answer = []
        for name in self.names():
            profile = self.manager.profiles.profiles.get(name)
            spec = profile.pool if profile is not None else None
            members = [v for v in self.members(name) if v.state != State.TEARING_DOWN]
            ready = sum(1 for v in members if v.state == State.READY)
            claimed = sum(
                1
                for v in live
                if v.pool == name and v.claimed_at is not None and v.state not in TERMINAL
            )
            answer.append(
                PoolStatus(
                    profile=name,
                    size=spec.size if spec is not None else 0,
                    ready=ready,
                    provisioning=len(members) - ready,
                    max_age_seconds=spec.max_age_seconds if spec is not None else 0,
                    claimed=claimed,
                )
            )
        return answer

    def held(self, extension: str) -> dict[str, int]:
        """Places per host of `extension` that unclaimed members hold (and an
        ordinary create may take, evicting one of them)."""
        places: dict[str, int] = {}
        for v in self._live():
            if (
                v.pool is not None
                and v.claimed_at is None
                and v.extension == extension
                and v.host is not None
                and v.state not in TERMINAL
                and v.state != State.TEARING_DOWN
            ):
                places[v.host] = places.get(v.host, 0) + 1
        return places

    # ---- filling, recycling, draining ----------------------------------------------------

    async def keep_all(self) -> None:
        await self.undo_stale_claims()
        self._note_rejections()
        for name in self.names():
            if self.manager.closing:
                return
            await self.keep(name)
        self.passes += 1

    async def keep(self, name: str) -> None:
        revision = await self.kv.lock(name, self.holder())
        if revision is None:
            return  # another worker keeps this pool right now
        try:
            last = await self.manager.store.last_seq()
            if not await self.manager.runner.wait_for(last, CATCH_UP_SECONDS):
                log.warning("pool %s: the read model is behind the stream; not filling", name)
                return
            await self._keep_locked(name)
        finally:
            await self.kv.unlock(name, revision)

    async def _keep_locked(self, name: str) -> None:
        profile = self.manager.profiles.profiles.get(name)
        spec = profile.pool if profile is not None else None
        size = spec.size if spec is not None else 0
        mark = fingerprint(profile) if profile is not None else None
        now = utc_now()
        kept: list[SandboxView] = []
        for view in self.members(name):
            if view.state == State.TEARING_DOWN:
                continue
            if spec is None or view.labels.get(FINGERPRINT_LABEL) != mark:
                await self._destroy(view.id, "pool_drain")
            elif view.metered and not self._pool_pays(view):
                # A claim that stopped halfway (its worker died between the ledger's
                # steps and SandboxClaimed): the pool no longer pays for it, nobody
                # claimed it. Drained; the settlement releases what a claimer reserved.
                await self._destroy(view.id, "pool_drain")
            elif (now - view.created_at).total_seconds() >= spec.max_age_seconds:
                await self._destroy(view.id, "pool_recycle")
            else:
                kept.append(view)
        while len(kept) > size:  # the pool shrank: the newest go first
            await self._destroy(kept.pop().id, "pool_drain")
        deficit = size - len(kept)
        if profile is None or mark is None or deficit <= 0:
            return
        if self._backoff.get(name, 0.0) > time.monotonic():
            return
        for _ in range(deficit):
            if self.manager.closing:
                return
            await self._fill_one(profile, mark)

    async def _fill_one(self, profile: Profile, mark: str) -> None:
        assert profile.pool is not None
        ttl = min(profile.pool.max_age_seconds + TTL_MARGIN, profile.max_ttl_seconds)
        meta = EventMeta(actor=ACTOR_POOL, correlation_id=new_correlation_id())
        sbx, _ = await self.manager.create(
            CreateRequest(
                profile=profile.name,
                inputs=profile.resolve_inputs({}),
                ttl_seconds=ttl,
                account=POOL_ACCOUNT,
                labels={FINGERPRINT_LABEL: mark},
                pool=profile.name,
            ),
            meta,
        )
        self._made[sbx.sandbox_id] = profile.name

    def _note_rejections(self) -> None:
        """A member this worker made that was rejected (no place for it): fill that
        pool again only after REJECT_BACKOFF, not once a second."""
        for sandbox_id, name in list(self._made.items()):
            view = self.manager.runner.projection.get(sandbox_id)
            if view is None:
                continue
            if view.state == State.REJECTED:
                log.info("pool %s: member %s rejected (%s)", name, sandbox_id, view.reason)
                self._backoff[name] = time.monotonic() + REJECT_BACKOFF
            if view.state in TERMINAL or view.claimed_at is not None:
                del self._made[sandbox_id]

    async def _destroy(self, sandbox_id: str, reason: str) -> None:
        meta = EventMeta(actor=ACTOR_POOL, correlation_id=new_correlation_id())
        try:
            await self.handle(DestroySandbox(sandbox_id=sandbox_id, reason=reason, meta=meta))
        except SandboxerError as exc:
            log.info("pool: destroying %s (%s): %s", sandbox_id, reason, exc)

    async def evict(self, extension: str, host: str) -> None:
        """An ordinary create took a place an unclaimed member held on `host`: destroy
        one such member (the newest, one still coming up first)."""
        candidates = [
            v
            for v in self._live()
            if v.pool is not None
            and v.claimed_at is None
            and v.extension == extension
            and v.host == host
            and v.state not in TERMINAL
            and v.state != State.TEARING_DOWN
        ]
        if not candidates:
            return
        victim = min(candidates, key=lambda v: (v.state == State.READY, -v.created_at.timestamp()))
        self._backoff[victim.pool or ""] = time.monotonic() + REJECT_BACKOFF
        await self._destroy(victim.id, "pool_evict")

    # ---- claims ------------------------------------------------------------------------

    def _pooled(self, command: CreateSandbox) -> Profile | None:
        """The create's profile if it has a pool (and the create is not the pool's own)."""
        profile = self.manager.profiles.profiles.get(command.profile)
        if profile is None or profile.pool is None or profile.pool.size == 0:
            return None
        return None if command.account == POOL_ACCOUNT else profile

    def _claimable(self, command: CreateSandbox) -> tuple[Profile, int, dict[str, str]] | None:
        profile = self._pooled(command)
        if profile is None or command.from_checkpoint is not None:
            return None
        try:
            if profile.resolve_inputs(command.inputs) != profile.resolve_inputs({}):
                return None
            ttl = profile.resolve_ttl(command.ttl_seconds)
            check_account(command.account)
            labels = check_labels(dict(command.labels))
        except (ValueError, SandboxerError):
            return None  # the cold create answers the error
        return profile, ttl, labels

    async def claim(self, command: CreateSandbox) -> Outcome | None:
        """Claim a ready member for this create; None: none to be had (create cold).

        A create with an Idempotency-Key (`command.sandbox_id`, the id its key derives)
        of a profile with a pool first binds the key (`KeyHold`): to the member it
        claims, or to the derived id for a cold create. A create that finds the key
        bound is a retry: AlreadyCreated names the sandbox the key made (the API then
        answers with it, or 422 if the request differs), CreateInProgress while that
        claim is still being recorded."""
        outcome = await self._claim_or_bind(command)
        if outcome is not None:
            self.metrics.pool_creates.labels(command.profile, "warm").inc()
        return outcome

    def created_cold(self, command: CreateSandbox) -> None:
        """A create this keeper had no member for was made cold (counted per pool)."""
        if self._pooled(command) is not None:
            self.metrics.pool_creates.labels(command.profile, "cold").inc()

    async def _claim_or_bind(self, command: CreateSandbox) -> Outcome | None:
        if command.sandbox_id is None:
            return await self._claim_ready(command, None)
        hold = await self._hold_key(command)
        if hold is None:
            return None  # a cold create under the derived id
        try:
            outcome = await self._claim_ready(command, hold)
            if outcome is None:  # none claimed: the key names the cold derived id
                await self._bind(hold, hold.key_id, None)
        except KeyLost:
            # Another create of this key went on meanwhile: this one is its retry.
            if await self._hold_key(command) is None:
                return None  # it went cold (the cold create answers AlreadyCreated)
            raise CreateInProgress(hold.key_id) from None
        return outcome

    async def _hold_key(self, command: CreateSandbox) -> KeyHold | None:
        """Take the create's key: a KeyHold (claim, then bind), None when the key is,
        or is now, bound to the cold derived id (or the profile has no pool and the key
        was never bound). Raises AlreadyCreated when the key made a sandbox, waiting
        for a claim of the key in flight to be recorded (CreateInProgress if it is not
        within KEY_WAIT seconds)."""
        key_id = command.sandbox_id
        assert key_id is not None
        runner = self.manager.runner
        deadline = time.monotonic() + KEY_WAIT
        while True:
            found = await self.kv.binding(key_id)
            if found is None:
                if self._pooled(command) is None:
                    return None  # no pool: the derived id is all the key ever names
                if runner.projection.get(key_id) is not None:
                    return None  # made cold before (the cold create answers AlreadyCreated)
                return KeyHold(key_id)
            bound, revision = found
            sandbox_id = str(bound.get("sandbox_id"))
            if sandbox_id == key_id:
                return None
            claim_id = bound.get("claim_id")
            intent = await self.kv.intent(sandbox_id)
            if intent is not None and intent[0].get("claim_id") == claim_id:
                view = runner.projection.get(sandbox_id)
                if view is not None and view.claim_id == claim_id:
                    raise AlreadyCreated(sandbox_id)
                if await self.kv.alive(str(intent[0].get("holder"))):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise CreateInProgress(key_id)
                    # Woken by the member's next event (its claim), or look again.
                    after = view.last_seq if view is not None else 0
                    await runner.wait_sandbox(sandbox_id, after, min(left, 1.0))
                    continue
                await self._undo_stale(sandbox_id)
            # No intent of this claim left: it was recorded (the read model shows it
            # once caught up), or it failed and the key may be bound again.
            await runner.wait_for(await self.manager.store.last_seq(), CATCH_UP_SECONDS)
            view = runner.projection.get(sandbox_id)
            if view is not None and view.claim_id == claim_id:
                raise AlreadyCreated(sandbox_id)
            return KeyHold(key_id, revision)

    async def _bind(self, hold: KeyHold, sandbox_id: str, claim_id: str | None) -> None:
        bound = {"sandbox_id": sandbox_id, "claim_id": claim_id, "holder": self.holder()}
        revision = await self.kv.bind(hold.key_id, bound, hold.revision)
        if revision is None:
            raise KeyLost(hold.key_id)
        hold.revision = revision

    async def _claim_ready(self, command: CreateSandbox, hold: KeyHold | None) -> Outcome | None:
        found = self._claimable(command)
        if found is None:
            return None
        profile, ttl, labels = found
        assert profile.pool is not None
        mark = fingerprint(profile)
        now = utc_now()
        ready = [
            v
            for v in self.members(profile.name)
            if v.state == State.READY
            and v.labels.get(FINGERPRINT_LABEL) == mark
            and (now - v.created_at).total_seconds() < profile.pool.max_age_seconds
        ]
        ready.sort(key=lambda v: (v.ready_at or v.created_at, v.id))
        for view in ready:
            outcome = await self._claim_one(view.id, command, ttl, labels, hold)
            if outcome is not None:
                self.wake()  # refill
                return outcome
        return None

    async def _claim_one(
        self,
        sandbox_id: str,
        command: CreateSandbox,
        ttl: int,
        labels: dict[str, str],
        hold: KeyHold | None = None,
    ) -> Outcome | None:
        claim_id = secrets.token_hex(16)
        intent: dict[str, Any] = {
            "claim_id": claim_id,
            "account": command.account,
            "ttl_seconds": ttl,
            "labels": labels,
            "actor": command.meta.actor,
            "correlation_id": command.meta.correlation_id,
            "holder": self.holder(),
            "at": utc_now().isoformat(),
        }
        revision = await self.kv.claim(sandbox_id, intent)
        if revision is None and await self._undo_stale(sandbox_id):
            revision = await self.kv.claim(sandbox_id, intent)  # the member is free again
        if revision is None:
            return None  # another create won this member
        if hold is not None:
            try:
                await self._bind(hold, sandbox_id, claim_id)
            except KeyLost:
                await self.kv.forget(sandbox_id, revision)
                raise
        failpoint("pool-claim-intent")  # a crash here leaves an intent to undo
        claim = ClaimSandbox(
            sandbox_id=sandbox_id,
            claim_id=claim_id,
            account=command.account,
            ttl_seconds=ttl,
            labels=labels,
            idempotency_id=hold.key_id if hold is not None else None,
            meta=command.meta,
        )
        try:
            outcome = await self.handle(claim)
        except (SandboxerError, RuntimeError) as exc:
            log.info("pool: claim of %s refused: %s", sandbox_id, exc)
        else:
            # Recorded: the member's view says claimed from here on, and its driving
            # worker refuses a second SandboxClaimed; the intent is done with.
            await self.kv.forget(sandbox_id, revision)
            return outcome
        # Not recorded (refused, gone, or its worker did not answer): take the intent
        # back, then look whether the claim landed after all (an answer that was lost).
        await self.kv.forget(sandbox_id, revision)
        last = await self.manager.store.last_seq()
        await self.manager.runner.wait_for(last, CATCH_UP_SECONDS)
        view = self.manager.runner.projection.get(sandbox_id)
        if view is not None and view.claim_id == claim_id:
            return Outcome(seq=view.last_seq, sandbox_id=sandbox_id)
        return None

    async def record_claim(self, command: ClaimSandbox) -> Outcome:
        """The member's driving worker: record SandboxClaimed if the intent is still
        this claim's and nobody claimed the member before."""
        held = await self.kv.intent(command.sandbox_id)
        if held is None or held[0].get("claim_id") != command.claim_id:
            raise ClaimRefused(f"the claim of {command.sandbox_id} is no longer held")
        manager = self.manager
        sbx = manager.get(command.sandbox_id)
        credits = 0
        if sbx is not None and sbx.view is not None and sbx.view.metered:
            credits = await self._pay_claim(sbx, command)

        def build(e: Any) -> SandboxClaimed:
            sbx = manager.get(command.sandbox_id)
            view = sbx.view if sbx is not None else None
            if view is None or view.pool is None or view.claimed_at is not None:
                raise ClaimRefused(f"sandbox {command.sandbox_id} is not an unclaimed member")
            occurred: dt.datetime = e["occurred_at"]
            return SandboxClaimed(
                **e,
                account=command.account,
                ttl_seconds=command.ttl_seconds,
                expires_at=occurred + dt.timedelta(seconds=command.ttl_seconds),
                labels=command.labels,
                claim_id=command.claim_id,
                credits_held=credits,
                idempotency_id=command.idempotency_id,
            )

        seq = await manager.record_step(
            command.sandbox_id, build, command.meta, event_id=f"{command.sandbox_id}.claimed"
        )
        return Outcome(seq=seq, sandbox_id=command.sandbox_id)

    async def _undo_stale(self, sandbox_id: str) -> bool:
        """The member's intent, if one whose claiming worker is gone before it was
        recorded, undone now (not left for the next pass): whether it was."""
        found = await self.kv.intent(sandbox_id)
        if found is None:
            return True  # undone meanwhile
        intent, revision = found
        view = self.manager.runner.projection.get(sandbox_id)
        if view is None or view.claimed_at is not None:
            return False
        if await self.kv.alive(str(intent.get("holder"))):
            return False  # a claim in flight
        return await self.kv.forget(sandbox_id, revision)

    def _pool_pays(self, view: SandboxView) -> bool:
        """Whether the pool's reservation for the member is open (a metered member)."""
        charge = self.manager.ledger.charge(view.id)
        return charge is not None and charge.account == POOL_ACCOUNT and not charge.closed

    async def _pay_claim(self, sbx: Sandbox, command: ClaimSandbox) -> int:
        """A metered member changes hands: the claimer's estimate must be covered; the
        pool pays for the wait (debit and release, `<member>.pool-debit` and
        `.pool-release`), then the claimer's reservation starts
        (`<member>.claim-reserve`). Each step is done once: a retry finds it done.
        Returns what the claimer holds."""
        manager = self.manager
        view = sbx.view
        assert view is not None
        ledger = manager.ledger
        charge = ledger.charge(view.id)
        if charge is not None and charge.account == command.account and not charge.closed:
            return charge.reserved  # paid before (a retry)
        loaded = manager.extensions.get(view.extension)
        try:
            estimate = await manager.steps.estimate_for(sbx, loaded, command.ttl_seconds)
        except HookFailed as exc:
            raise ClaimRefused(f"the estimate failed: {exc.error}") from None
        available = ledger.account(command.account).available
        if available < estimate.amount:
            raise ClaimRefused(
                f"account {command.account} has {available} credits, the estimate is "
                f"{estimate.amount}"
            )
        meta = msgspec.structs.replace(command.meta, causation_id=sbx.last_event_id)
        if charge is not None and charge.account == POOL_ACCOUNT and not charge.closed:
            waited = max((utc_now() - (view.provisioned_at or view.created_at)).total_seconds(), 0)
            ctx = manager.steps.context(sbx)
            metered = cast(Metered, loaded.adapter)
            debit = await metered.meter_actual(ctx, waited)
            await ledger.settle(view.id, debit, meta, phases=("pool-debit", "pool-release"))
        held = await ledger.reserve(view.id, command.account, estimate, meta, phase="claim-reserve")
        if held.rejected or held.account != command.account:
            raise ClaimRefused(f"account {command.account} could not cover the estimate")
        return held.reserved

    async def undo_stale_claims(self) -> None:
        """Claim intents left behind: a member that ended (its intent is done with),
        and an intent whose claiming worker is gone before SandboxClaimed was
        recorded (undone: the member is unclaimed again)."""
        intents = await self.kv.intents()
        if not intents:
            return
        for sandbox_id, (intent, revision) in intents.items():
            view = self.manager.runner.projection.get(sandbox_id)
            if view is None:
                continue  # not in the read model yet
            if view.state in TERMINAL:
                await self.kv.forget(sandbox_id, revision)
            elif view.claimed_at is None and not await self.kv.alive(str(intent.get("holder"))):
                log.warning(
                    "pool: claim of %s by %s was never recorded and its worker is gone; "
                    "the member goes back to the pool",
                    sandbox_id,
                    intent.get("holder"),
                )
                await self.kv.forget(sandbox_id, revision)
