"""One run at a time per output (ln_ray/io/lease.py): the lease is taken atomically, refused to a
second run while its holder's heartbeat is alive, broken once it is stale, and lost by a run
whose lease another broke; locally and on S3 (moto, over HTTP)."""

from __future__ import annotations

import threading

import pytest

from ln_ray.io.lease import LEASE_FILE, Lease, LeaseHeld, read_lease


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _lease(root: str, run_id: str, clock: Clock, timeout: float = 600.0) -> Lease:
    return Lease(root, run_id, "score", timeout, clock=clock)


def _lifecycle(root: str) -> None:
    clock = Clock()
    first = _lease(root, "run-a", clock)
    first.acquire()
    assert read_lease(root).run_id == "run-a"

    second = _lease(root, "run-b", clock)
    clock.now += 599  # alive: its heartbeat is within its timeout
    with pytest.raises(LeaseHeld, match=r"in use by run run-a \(score, .*last heartbeat 599s ago"):
        second.acquire()

    first.renew()  # a heartbeat
    clock.now += 599
    with pytest.raises(LeaseHeld, match="can be broken 1s from now"):
        second.acquire()

    clock.now += 2  # run-a missed its heartbeat for longer than its timeout: it died
    second.acquire()
    assert second.broken.run_id == "run-a" and read_lease(root).run_id == "run-b"

    first.renew()  # run-a comes back: the lease is no longer its, and it must not publish
    with pytest.raises(LeaseHeld, match="lost the lease .* held by run run-b"):
        first.check()
    first.release()  # gives back nothing that is not its own
    assert read_lease(root).run_id == "run-b"

    second.check()
    second.release()
    assert read_lease(root) is None
    third = _lease(root, "run-c", clock)
    third.acquire()  # free again
    third.release()


def test_a_lease_on_a_local_disk(tmp_path):
    _lifecycle(str(tmp_path / "out"))


def test_a_lease_on_s3(s3_server):
    import s3fs

    s3fs.S3FileSystem().mkdir("ln-ray-lease")
    _lifecycle("s3://ln-ray-lease/out")


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_runs_racing_for_one_lease_leave_exactly_one_holder(tmp_path, stale):
    root = str(tmp_path / "out")
    clock = Clock()
    if stale:
        dead = _lease(root, "dead", clock)
        dead.acquire()
        clock.now += 10_000
    leases = [_lease(root, f"run-{i}", clock) for i in range(8)]
    won, lost = [], []
    start = threading.Barrier(len(leases))

    def take(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            won.append(lease.run_id)
        except LeaseHeld:
            lost.append(lease.run_id)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(lost) == len(leases) - 1
    assert read_lease(root).run_id == won[0]
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == [LEASE_FILE, "_lease.lock"]  # nothing half-written left behind


def test_the_heartbeat_keeps_a_long_run_alive(tmp_path):
    root = str(tmp_path / "out")
    with Lease(root, "long", "score", timeout_s=0.5) as lease:
        beats = {read_lease(root).heartbeat}
        for _ in range(4):
            threading.Event().wait(0.2)
            beats.add(read_lease(root).heartbeat)
        other = Lease(root, "other", "score", timeout_s=0.5)
        with pytest.raises(LeaseHeld):
            other.acquire()
        lease.check()
    assert len(beats) >= 3 and read_lease(root) is None
