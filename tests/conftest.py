"""Shared fixtures. The suite runs as root inside a private network namespace (``make test``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy.engine import make_url

from goldclone.demo.image import build_demo_image
from goldclone.drivers.qemu.network.manager import HOSTS_ROOT
from goldclone.settings import Settings, VMwareConfig
from goldclone.store.database import Database
from tests.fake_vmrun import FakeVmrun
from tests.harness import Goldclone, goldclone_server, processes_mentioning
from tests.netns import foreign_network
from tests.postgres import PostgresCluster, running_cluster
from tests.servers import CallbackReceiver, FileServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test that needs PostgreSQL or the Debian guest by the fixtures it uses
    (``-m 'not postgres'`` leaves them out); their fixtures fail it, saying what is missing."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "postgres" in fixtures or params.get("database_url") == "postgresql":
            item.add_marker(pytest.mark.postgres)
        if "debian_image" in fixtures:
            item.add_marker(pytest.mark.debian)
    # the longest first, so that one worker of several runs it while the others take the rest
    items.sort(key=lambda item: item.get_closest_marker("debian") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Refuse, before any test runs, a run whose tests need what this process lacks: each test
    says what it needs by its marks (pyproject.toml); a test with none needs neither root nor
    QEMU, and runs anywhere."""
    needing_root = [item.nodeid for item in session.items if item.get_closest_marker("root")]
    if not needing_root:
        return
    which = f"{needing_root[0]} and {len(needing_root) - 1} other test(s)"
    if os.geteuid() != 0:
        pytest.exit(
            f"{which} need root: run them with `make test`, leave them out with "
            "`-m 'not root'`, or run only the fast ones with `scripts/test-fast`",
            returncode=2,
        )
    if problem := foreign_network():
        pytest.exit(
            f"{which} create bridges, taps and DHCP servers, so they must run in a private "
            f"network namespace: run them with `make test` (this one has {problem})",
            returncode=2,
        )


T = TypeVar("T")


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """A short folder for the session: QMP socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="gct"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_package(workdir: Path) -> Path:
    """The demo guest's image package, built once per session."""
    package = workdir / "served" / "demo.tar.gz"
    package.parent.mkdir()
    asyncio.run(build_demo_image(package))
    return package


@pytest.fixture(scope="session")
def file_server(workdir: Path, demo_package: Path) -> Iterator[FileServer]:
    with FileServer(demo_package.parent).running() as server:
        yield server


@pytest.fixture(scope="session")
def debian_image() -> Path:
    """The Debian test guest that ``scripts/test`` built or found in its cache."""
    return prepared("GOLDCLONE_DEBIAN_IMAGE", "the Debian guest")


@pytest.fixture(scope="session")
def debian_qcow2(file_server: FileServer, debian_image: Path) -> Path:
    """The Debian test guest, served as a bare qcow2 by the run's file server."""
    served = file_server.root / "debian-12.qcow2"
    served.symlink_to(debian_image)
    return served


@pytest.fixture
def demo_body(file_server: FileServer, demo_package: Path) -> dict[str, Any]:
    """A create of the demo guest, served by the run's file server."""
    image = {"url": file_server.url(demo_package.name), "checksum": checksum(demo_package)}
    return {"image": image, "cpus": 1, "memory": 256}


@pytest.fixture
def callbacks() -> Iterator[CallbackReceiver]:
    with CallbackReceiver().running() as receiver:
        yield receiver


def ssh_key(folder: Path, comment: str = "ci@goldclone-test") -> tuple[Path, str]:
    """A new ed25519 key pair made by OpenSSH's ssh-keygen in ``folder``: the private key's
    path, and the public key line."""
    key = folder / f"id_ed25519_{len(list(folder.glob('id_ed25519_*.pub')))}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(key)], check=True)  # fmt: skip
    return key, key.with_name(key.name + ".pub").read_text().strip()


def checksum(path: Path, kind: str = "sha256") -> str:
    with path.open("rb") as data:
        return hashlib.file_digest(data, kind).hexdigest()


@pytest.fixture
def settings(workdir: Path) -> Iterator[Settings]:
    data_dir = Path(tempfile.mkdtemp(prefix="d", dir=workdir))
    yield Settings(data_dir=data_dir, ip_timeout=90.0, download_timeout=5.0,
                   shutdown_timeout=5.0, callback_schedule=(0, 0.05, 0.2))  # fmt: skip
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite database at this code's schema, made once for the run."""
    path = tmp_path_factory.mktemp("schema") / "state.db"
    _migrate(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def migrated_postgres(postgres: PostgresCluster) -> str:
    """The name of a PostgreSQL database at this code's schema, made once for the run: the
    template of each test's own."""
    url = _in_a_loop_of_its_own(postgres.new_database())
    _migrate(url)
    name: str = make_url(url).database or ""
    return name


def _migrate(url: str) -> None:
    async def migrate() -> None:
        database = Database(url, "test-host")
        await database.open()
        await database.close()

    _in_a_loop_of_its_own(migrate())


def _in_a_loop_of_its_own(work: Coroutine[Any, Any, T]) -> T:
    """``work`` run to its end in a thread with its own event loop: a session fixture is
    first asked for from inside a test's loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, work).result()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new database of the test's own, at this code's schema: SQLite in the test's own
    folder, and one on the run's PostgreSQL server. Each is a copy of one migrated once for
    the run, which a migration per test made the fast tests a quarter slower;
    tests/fast/test_store.py migrates from nothing."""
    if request.param == "postgresql":
        template = request.getfixturevalue("migrated_postgres")
        url: str = await request.getfixturevalue("postgres").new_database(template)
        return url
    return sqlite_copy(request.getfixturevalue("migrated_sqlite"), tmp_path)


def sqlite_copy(migrated: Path, folder: Path) -> str:
    """A new SQLite database in ``folder``, a copy of ``migrated``."""
    copy = folder / "state.db"
    shutil.copyfile(migrated, copy)
    return f"sqlite+aiosqlite:///{copy}"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A real store's database, migrated, of each kind."""
    url = database_url
    db = Database(url, "test-host")
    await db.open()
    yield db
    await db.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """The run's PostgreSQL server, started at the first test that needs it."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def fake_vmrun(tmp_path: Path) -> FakeVmrun:
    """The stand-in ``vmrun`` (tests/fake_vmrun.py), with its state in the test's tmp dir."""
    return FakeVmrun(tmp_path / "vmrun")


def on_fake_vmrun(settings: Settings, fake: FakeVmrun, **changes: object) -> Settings:
    """``settings`` with the vmware driver on the stand-in ``vmrun``; ``changes`` go to its
    ``VMwareConfig``."""
    vmware = VMwareConfig(vmrun=str(fake.path), host_type="ws", lease_files=(fake.lease_file,))
    return dataclasses.replace(
        settings, driver="vmware", vmware=dataclasses.replace(vmware, **changes)
    )


@pytest.fixture
async def goldclone(settings: Settings) -> AsyncIterator[Goldclone]:
    async with goldclone_server(settings) as server:
        yield server


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running(workdir: Path) -> Iterator[None]:
    """No qemu or dnsmasq that this process's tests started outlives them."""
    yield
    left = processes_mentioning(str(workdir))
    assert not left, f"processes of the test run are still running: {left}"


_MADE_BEFORE = pytest.StashKey[set[Path]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _is_worker(session.config):
        session.config.stash[_MADE_BEFORE] = goldclone_cgroups() | dhcp_host_folders()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if it left a cgroup or a folder of DHCP host files: checked once, by the
    process that ran the tests or started the workers that did, after they all ended."""
    if _is_worker(session.config):
        return
    made = sorted((goldclone_cgroups() | dhcp_host_folders()) - session.config.stash[_MADE_BEFORE])
    if made:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.ensure_newline()
        reporter.write_line(
            f"cgroups or DHCP host folders of the test run are left: {made}", red=True
        )


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def dhcp_host_folders() -> set[Path]:
    """The folders of fixed DHCP addresses of goldclone services on this host."""
    return set(HOSTS_ROOT.glob("*")) if HOSTS_ROOT.is_dir() else set()


def goldclone_cgroups() -> set[Path]:
    """The parent cgroups of goldclone services on this host, in each hierarchy."""
    return {path for path in Path("/sys/fs/cgroup").glob("*/**/goldclone-*") if path.is_dir()}


def prepared(variable: str, what: str) -> Path:
    """The path that ``scripts/test`` puts in ``variable``: ``what`` it made once and cached.
    Without it the test fails (never skips), saying how to run the suite."""
    path = os.environ.get(variable)
    if not path or not Path(path).exists():
        pytest.fail(
            f"{variable} names nothing: run the suite with scripts/test (make test), which "
            f"makes {what} once and caches it"
        )
    return Path(path)
