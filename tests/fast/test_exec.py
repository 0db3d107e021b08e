"""``GET /vms/{id}/exec`` end to end over a real helper_server on loopback: the synthetic driver's
guest is the real helper (``guest.helper``) run on this host, so that the wire, the flow
control, the API's framing and the client are all the real ones; tests/test_exec_guests.py
runs the same in real guests."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from goldclone.client import APIError, AsyncClient
from goldclone.client.exec import ExecSession
from goldclone.drivers.synthetic import SyntheticDriver, SyntheticHost
from goldclone.exec_protocol import ExecRequest, TerminalSize
from goldclone.guest import helper
from goldclone.guest.channel import Channel
from goldclone.settings import Settings
from tests.fast.conftest import as_, goldclone_cli
from tests.harness import Goldclone, goldclone_server, processes_mentioning, read_until
from tests.serving import GOLDCLONE, in_pty


def client_of(helper_server: Goldclone, who: str = "alice") -> AsyncClient:
    return AsyncClient(str(helper_server.client.base_url), token=as_(who)["Authorization"][7:])


async def run(helper_server: Goldclone, helper_vm: str, stdin: bytes = b"", **request: Any) -> Any:
    async with client_of(helper_server) as client:
        return await client.exec(helper_vm, ExecRequest(**request), stdin)


async def test_stdout_and_stderr_come_apart_in_order_with_stdin_and_the_exit_code(
    helper_server: Goldclone, helper_vm: str
) -> None:
    script = "echo one; echo two >&2; read line; echo got $line; echo three >&2; exit 3"
    done = await run(helper_server, helper_vm, b"hello\n", script=script)
    assert (done.stdout, done.stderr) == (b"one\ngot hello\n", b"two\nthree\n")
    assert (done.result.exit_code, done.result.signal, done.result.error) == (3, None, None)


@pytest.mark.parametrize(("script", "code", "signal"), [("true", 0, None), ("false", 1, None),
                                                         ("kill -9 $$", 137, 9)])  # fmt: skip
async def test_exit_codes_and_the_signal_that_ended_a_command(
    helper_server: Goldclone, helper_vm: str, script: str, code: int, signal: int | None
) -> None:
    done = await run(helper_server, helper_vm, script=script)
    assert (done.result.exit_code, done.result.signal) == (code, signal)


async def test_50_mb_of_output_and_of_input_arrive_intact(
    helper_server: Goldclone, helper_vm: str
) -> None:
    size = 50 * 1000 * 1000
    done = await run(helper_server, helper_vm, argv=["head", "-c", str(size), "/dev/urandom"])
    assert len(done.stdout) == size and done.result.exit_code == 0
    echoed = await run(helper_server, helper_vm, done.stdout, argv=["sha256sum"])
    assert echoed.stdout.split()[0].decode() == hashlib.sha256(done.stdout).hexdigest()


async def test_output_arrives_while_the_command_still_runs(
    helper_server: Goldclone, helper_vm: str
) -> None:
    async with client_of(helper_server) as client:
        session = await client.exec_session(
            helper_vm, ExecRequest(script="echo ready; read x; echo $x")
        )
        output = session.output()
        assert await read_until(output, b"ready\n") == b"ready\n"  # it now waits for stdin
        await session.write(b"go on\n")
        assert await read_until(output, b"go on\n") == b"go on\n"
        assert [item async for item in output] == []
        assert session.result is not None and session.result.exit_code == 0


async def test_a_timeout_kills_the_command(helper_server: Goldclone, helper_vm: str) -> None:
    marker = f"sleep {1000 + secrets.randbelow(1000)}.{secrets.randbelow(10**6)}"
    started = asyncio.get_running_loop().time()
    done = await run(
        helper_server, helper_vm, script=f"echo started; {marker}; echo never", timeout=0.5
    )
    assert done.stdout == b"started\n"
    assert (done.result.timed_out, done.result.signal, done.result.exit_code) == (True, 9, 137)
    assert asyncio.get_running_loop().time() - started < 10
    assert not processes_mentioning(marker.split()[1])


async def test_a_tty_has_its_size_and_takes_a_resize(
    helper_server: Goldclone, helper_vm: str
) -> None:
    request = ExecRequest(
        script="stty size; read x; stty size", tty=TerminalSize(rows=30, cols=100)
    )
    async with client_of(helper_server) as client:
        session = await client.exec_session(helper_vm, request)
        output = session.output()
        assert await read_until(output, b"30 100\r\n") == b"30 100\r\n"
        await session.resize(50, 132)
        await session.write(b"\n")
        seen = b"".join([data async for _, data in output])
    assert seen.endswith(b"50 132\r\n")
    assert session.result is not None and session.result.exit_code == 0


async def test_env_and_cwd(helper_server: Goldclone, helper_vm: str, tmp_path: Path) -> None:
    script, env = 'echo "$GREETING"; pwd', {"GREETING": "hi there"}
    done = await run(helper_server, helper_vm, script=script, env=env, cwd=str(tmp_path))
    assert done.stdout == f"hi there\n{tmp_path}\n".encode()


async def test_a_command_that_cannot_run_says_why(helper_server: Goldclone, helper_vm: str) -> None:
    missing = await run(helper_server, helper_vm, argv=["no-such-program-here"])
    assert missing.result.exit_code == 127 and missing.result.error is not None
    assert missing.result.error["code"] == "cannot-run"
    assert "no-such-program-here" in missing.result.error["message"]
    nowhere = await run(helper_server, helper_vm, argv=["true"], cwd="/no/such/folder")
    assert nowhere.result.exit_code == 126 and nowhere.result.error is not None


async def test_a_client_that_goes_away_ends_its_command(
    helper_server: Goldclone, helper_vm: str
) -> None:
    marker = f"{2000 + secrets.randbelow(1000)}.{secrets.randbelow(10**6)}"
    async with client_of(helper_server) as client:
        session = await client.exec_session(
            helper_vm, ExecRequest(script=f"echo up; sleep {marker}")
        )
        assert await read_until(session.output(), b"up\n") == b"up\n"
        assert processes_mentioning(marker)
        await session.close()
    await until_gone(marker)


async def until_gone(marker: str) -> None:
    async with asyncio.timeout(10):
        while processes_mentioning(marker):
            await asyncio.sleep(0.05)


async def test_many_sessions_at_once_share_the_channel(
    helper_server: Goldclone, helper_vm: str
) -> None:
    results = await asyncio.gather(
        *(
            run(helper_server, helper_vm, script=f"head -c 300000 /dev/zero; echo {n}")
            for n in range(8)
        )
    )
    for n, done in enumerate(results):
        assert done.stdout == b"\0" * 300000 + f"{n}\n".encode()


async def test_exec_is_refused_before_the_socket_opens(
    helper_server: Goldclone, helper_vm: str, request_body: dict[str, Any]
) -> None:
    url = str(helper_server.client.base_url).replace("http://", "ws://") + f"/vms/{helper_vm}/exec"
    for headers, status, code in (
        ({}, 401, "unauthorized"),
        (as_("alice-reader"), 403, "forbidden"),
        (as_("bob"), 404, "vm-not-found"),  # another tenant's VM is not found
    ):
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(url, additional_headers=headers)
        assert refused.value.response.status_code == status, headers
        assert json.loads(refused.value.response.body or b"{}")["code"] == code
    async with client_of(helper_server, "root") as admin:  # an admin reaches every tenant's VM
        assert (await admin.exec(helper_vm, ExecRequest(argv=["true"]))).result.exit_code == 0


async def test_exec_needs_a_running_vm_whose_guest_has_a_helper(
    fast_settings: Settings, request_body: dict[str, Any]
) -> None:
    driver = SyntheticDriver(fast_settings.data_dir, SyntheticHost(boot_seconds=30))
    async with goldclone_server(fast_settings, driver) as helper_server:
        created = await helper_server.post_vm(request_body)
        async with client_of(helper_server) as client:
            with pytest.raises(APIError) as starting:
                await client.exec(created["id"], ExecRequest(argv=["true"]))
            assert (starting.value.status, starting.value.code) == (409, "vm-conflict")
            driver.host.boot_seconds = 0
            await helper_server.delete(created["id"])
            created = await helper_server.post_vm(request_body)
            await helper_server.wait_for(created["id"], "running")
            with pytest.raises(APIError) as unavailable:
                await client.exec(created["id"], ExecRequest(argv=["true"]))
            assert (unavailable.value.status, unavailable.value.code) == (409, "exec-unavailable")


async def test_a_bad_request_on_the_socket_is_a_clear_error(
    helper_server: Goldclone, helper_vm: str
) -> None:
    url = str(helper_server.client.base_url)
    headers = as_("alice")
    session = await ExecSession.open(url, headers, helper_vm, ExecRequest(argv=["cat"]))
    await session._socket.send(b"\x07nonsense")
    assert [item async for item in session.output()] == []
    assert session.result is not None and session.result.error is not None
    assert session.result.error["code"] == "invalid-request"
    ws_url = url.replace("http://", "ws://") + f"/vms/{helper_vm}/exec"
    async with websockets.connect(ws_url, additional_headers=headers) as raw:
        await raw.send(json.dumps({"argv": ["true"], "script": "true"}))
        ended = await raw.recv()
        assert isinstance(ended, bytes) and ended[0] == 3
        assert json.loads(ended[1:])["error"]["code"] == "invalid-request"


async def test_the_cli_passes_stdin_through_and_exits_with_the_commands_code(
    helper_server: Goldclone, helper_vm: str
) -> None:
    script = "cat; echo oops >&2; exit 5"
    done = await goldclone_cli(
        helper_server, "exec", helper_vm[:8], "--", "sh", "-c", script, stdin=b"data\n"
    )
    assert (done.stdout, done.stderr, done.returncode) == (b"data\n", b"oops\n", 5)
    options = ["-e", "A=1", "-w", "/", "--", "sh", "-c", "echo $A; pwd"]
    env = await goldclone_cli(helper_server, "exec", helper_vm, *options)
    assert (env.stdout, env.returncode) == (b"1\n/\n", 0)


async def test_the_cli_says_why_a_command_did_not_run_or_was_killed(
    helper_server: Goldclone, helper_vm: str
) -> None:
    missing = await goldclone_cli(helper_server, "exec", helper_vm, "--", "no-such-program")
    assert missing.returncode == 127
    assert missing.stderr.decode().startswith("goldclone exec: cannot-run: cannot run no-such")
    late = await goldclone_cli(
        helper_server, "exec", helper_vm, "--timeout", "0.5", "--", "sleep", "600"
    )
    assert late.returncode == 124 and b"killed after 0.5 s" in late.stderr
    unknown = await goldclone_cli(helper_server, "exec", "nothing-of-that-name", "--", "true")
    assert unknown.returncode == 1 and b"vm-not-found" in unknown.stderr
    no_command = await goldclone_cli(helper_server, "exec", helper_vm)
    assert no_command.returncode == 2 and b"give the command after --" in no_command.stderr


async def test_the_cli_runs_a_command_on_a_terminal(
    helper_server: Goldclone, helper_vm: str
) -> None:
    env = {**os.environ, "GOLDCLONE_URL": str(helper_server.client.base_url),
           "GOLDCLONE_TOKEN": as_("alice")["Authorization"][7:], "COLUMNS": "91",
           "LINES": "27"}  # fmt: skip
    argv = [*GOLDCLONE, "exec", "-t", helper_vm, "--", "sh", "-c", "tty; stty size; exit 3"]
    shown, code = await asyncio.to_thread(in_pty, argv, env)
    assert code == 3
    assert re.search(r"/dev/pts/\d+\r\n27 91\r\n", shown), shown


async def test_a_channel_syncs_past_what_an_earlier_connection_left() -> None:
    """Bytes of an earlier connection (a long run without a line break, stale lines, a ready
    line with another nonce) come before the helper's answer; only the answer to this
    connection's nonce syncs it."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    writer.write(b"x" * 200_000 + b"\nstale\n" + helper.READY + b"an-old-nonce\n")

    async def answer() -> None:
        await reader.readuntil(b"\n")  # the blank line before the sync
        nonce = (await reader.readuntil(b"\n")).removeprefix(helper.SYNC).rstrip(b"\n")
        writer.write(helper.READY + nonce + b"\n")
        await writer.drain()

    answering = asyncio.create_task(answer())
    channel = await Channel.open(lambda: asyncio.open_unix_connection(sock=ours), "test")
    await answering
    assert not channel.closed.is_set()
    await channel.close()
    writer.close()
