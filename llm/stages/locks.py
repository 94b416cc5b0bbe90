"""One computation per stage output: a lease lock next to it, ``<root>/<stage>/<key>.lock``.

Two identical runs at once (two ``kiln tokenize --force`` on one root, a Prefect retry while the
first attempt still runs, two machines on one S3 root) would otherwise work in the same
``<key>.partial`` and the loser fails on files the winner just renamed away. The first run takes the
lock and computes; the others wait until the output is published (and reuse it) or until the holder
is gone (and then take over).

The lock is a small JSON record (who holds it: ``host``, ``pid``, ``since``, a random ``token``):

* local root: created with ``os.link`` of a complete temp file, which fails if the lock exists (atomic
  on local disks and NFS alike, and a reader never sees a half-written record);
* S3 root: ``put_object(IfNoneMatch="*")``, a conditional put (S3 since 2024, MinIO, moto), and read
  back, so a server that ignores the condition is caught by a token that is not ours.

The holder refreshes the lease from a heartbeat thread (mtime touch / conditional re-put) every quarter
of ``KILN_LOCK_LEASE_S`` (default 120 s). A lock is stale when its holder ran on this machine and that
process is gone (checked at once: pid plus process start time), or, for a holder on another machine,
when it has not been refreshed for a lease. A stale lock is replaced: locally by renaming it aside and
checking it was the record judged stale, on S3 by a put conditional on its ETag.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from llm.storage import Store, is_s3, local_path, split_s3, with_retries

T = TypeVar("T")

DEFAULT_LEASE_S = 120.0
POLL_S = 1.0


def lease_seconds() -> float:
    """``KILN_LOCK_LEASE_S``: how long a holder on another machine may go without a heartbeat."""
    raw = os.environ.get("KILN_LOCK_LEASE_S", "").strip()
    return float(raw) if raw else DEFAULT_LEASE_S


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def host_id() -> str | None:
    """This kernel and pid namespace: two processes with the same id can check each other's pids.

    Hostnames alone collide (containers, cloned VMs); the boot id and the pid namespace do not. None
    where /proc is missing: then only the lease decides whether a holder is gone.
    """
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{ns}" if boot else None


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot), so a reused pid is not taken for the holder."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; fields 1-2 ("pid (comm)") are cut off


def process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    return started is None or process_start(pid) in (None, started)


@dataclass
class Held:
    """What a reader sees of a lock: its record (None if unreadable), version and seconds since refreshed."""

    record: dict[str, Any] | None
    version: str
    age_s: float


class _Backend(Protocol):
    where: str

    def create(self, body: bytes) -> bool: ...
    def read(self) -> Held | None: ...
    def replace(self, held: Held, body: bytes) -> bool: ...
    def renew(self, token: str) -> bool: ...
    def remove(self, token: str) -> None: ...


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("token"), str) else None


class _FileLock:
    """The lock as a file on a local (or NFS) root."""

    def __init__(self, path: Path):
        self.path = Path(os.path.abspath(path))  # the heartbeat must not depend on the cwd
        self.where = str(self.path)

    def create(self, body: bytes) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(body)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system (some FUSE/SMB mounts): an exclusive create
            return self._create_exclusive(body)
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self, body: bytes) -> bool:
        """O_CREAT|O_EXCL: as atomic, but a reader may see the record half-written (it then waits)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return True

    def read(self) -> Held | None:
        try:
            raw = self.path.read_bytes()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        rec = _parse(raw)
        return Held(rec, rec["token"] if rec else f"unreadable@{mtime}", max(0.0, time.time() - mtime))

    def replace(self, held: Held, body: bytes) -> bool:
        aside = self.path.with_name(f".{self.path.name}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = _parse(aside.read_bytes())
        if (moved["token"] if moved else None) != (held.record or {}).get("token"):
            # Another waiter replaced the stale lock between our read and our rename: put theirs back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self.create(body)

    def renew(self, token: str) -> bool:
        held = self.read()
        if held is None or (held.record or {}).get("token") != token:
            return False
        os.utime(self.path)
        return True

    def remove(self, token: str) -> None:
        held = self.read()
        if held is not None and (held.record or {}).get("token") == token:
            self.path.unlink(missing_ok=True)


def _precondition_failed(exc: BaseException) -> bool:
    resp = getattr(exc, "response", None) or {}
    code = resp.get("Error", {}).get("Code", "")
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in (409, 412)


class _S3Lock:
    """The lock as an object on an S3 root, written with conditional puts."""

    def __init__(self, store: Store, uri: str):
        self.store, self.where = store, uri
        self.bucket, self.key = split_s3(uri)

    def _put(self, body: bytes, **cond: str) -> bool:
        client = self.store._client()  # conditional requests are this module's alone: not a Store operation
        try:
            with_retries(lambda: client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **cond),
                         what=f"lock {self.where}")
        except Exception as exc:  # noqa: BLE001 - a failed precondition is an answer, anything else is raised
            if _precondition_failed(exc):
                return False
            raise
        return True

    def _mine(self, token: str) -> bool:
        """Read-back check: the object holds our token (catches a server that ignored the condition)."""
        held = self.read()
        return held is not None and (held.record or {}).get("token") == token

    def create(self, body: bytes) -> bool:
        return self._put(body, IfNoneMatch="*") and self._mine(json.loads(body)["token"])

    def read(self) -> Held | None:
        client = self.store._client()
        try:
            resp = with_retries(lambda: client.get_object(Bucket=self.bucket, Key=self.key), what=f"read {self.where}")
        except Exception as exc:  # noqa: BLE001
            if (getattr(exc, "response", None) or {}).get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                return None
            raise
        rec = _parse(resp["Body"].read())
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()  # the server's clock, as LastModified
        return Held(rec, resp["ETag"], max(0.0, now - resp["LastModified"].timestamp()))

    def replace(self, held: Held, body: bytes) -> bool:
        return self._put(body, IfMatch=held.version) and self._mine(json.loads(body)["token"])

    def renew(self, token: str) -> bool:
        held = self.read()
        if held is None or (held.record or {}).get("token") != token:
            return False
        return self._put(json.dumps({**held.record, "renewed": time.time()}).encode(), IfMatch=held.version)

    def remove(self, token: str) -> None:
        if self._mine(token):
            client = self.store._client()
            with_retries(lambda: client.delete_object(Bucket=self.bucket, Key=self.key), what=f"unlock {self.where}")


def lock_uri(store: Store, stage: str, key: str) -> str:
    return store.uri(stage, f"{key}.lock")


def read_lock(store: Store, stage: str, key: str) -> dict[str, Any] | None:
    """The record of the live lock on (stage, key), or None (no lock, or a stale one): for ``kiln ls``."""
    lock = StageLock(store, stage, key)
    held = lock.backend.read()
    if held is None or lock.stale(held):
        return None
    return held.record


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class StageLock:
    """The right to compute one (root, stage, key); see the module docstring."""

    def __init__(self, store: Store, stage: str, key: str, *, lease_s: float | None = None, poll_s: float = POLL_S,
                 say: Callable[[str], None] = _say):
        uri = lock_uri(store, stage, key)
        self.backend: _Backend = _S3Lock(store, uri) if is_s3(uri) else _FileLock(local_path(uri))
        self.stage, self.lease_s, self.poll_s, self.say = stage, lease_seconds() if lease_s is None else lease_s, poll_s, say
        self.token = uuid.uuid4().hex
        self._host = host_id()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _record(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"token": self.token, "host": socket.gethostname(), "host_id": self._host, "pid": pid,
                           "pid_start": process_start(pid), "since": time.time(), "lease_s": self.lease_s}).encode()

    def stale(self, held: Held) -> bool:
        rec = held.record or {}
        if self._host is not None and rec.get("host_id") == self._host and isinstance(rec.get("pid"), int):
            return not process_alive(rec["pid"], rec.get("pid_start"))  # same machine: certain, no lease needed
        return held.age_s > self.lease_s

    def acquire(self, ready: Callable[[], T | None]) -> T | None:
        """Take the lock, or return ``ready()`` as soon as it is not None (the output was published).

        ``ready`` is checked again right after the lock is taken: another run may have published
        between the caller's check and this one, and then there is nothing left to compute.
        """
        announced = False
        while True:
            if self.backend.create(self._record()):
                return self._taken(ready)
            found = ready()
            if found is not None:
                return found
            held = self.backend.read()
            if held is None:
                continue  # released just now: try again at once
            if (held.record or {}).get("token") == self.token:
                return self._taken(ready)  # our own create: its answer was lost and the retry found it done
            if self.stale(held):
                self.say(f"[kiln] {self.stage}: taking over the stale lock {self.backend.where} ({_who(held)})")
                if self.backend.replace(held, self._record()):
                    return self._taken(ready)
                continue
            if not announced:
                self.say(f"[kiln] {self.stage}: the same output is being computed by {_who(held)}; waiting for it "
                         f"(lock {self.backend.where})")
                announced = True
            time.sleep(self.poll_s)

    def _taken(self, ready: Callable[[], T | None]) -> T | None:
        found = ready()
        if found is not None:
            self.backend.remove(self.token)
            return found
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"kiln-lock-{self.stage}", daemon=True)
        self._beat.start()
        return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if not self.backend.renew(self.token):
                    self.say(f"[kiln] {self.stage}: lost the lock {self.backend.where} to another run "
                             f"(was this process stopped for longer than the {self.lease_s:.0f}s lease?)")
                    return
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the lease tolerates a few
                self.say(f"[kiln] {self.stage}: could not refresh the lock {self.backend.where}: {exc}")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        self.backend.remove(self.token)


def _who(held: Held) -> str:
    rec = held.record
    if rec is None:
        return f"an unreadable lock record, last touched {held.age_s:.0f}s ago"
    since = time.strftime("%H:%M:%S", time.localtime(rec.get("since", 0)))
    return f"pid {rec.get('pid')} on {rec.get('host')} since {since}"
