"""goldclone's helper in the guest: runs commands and opens guest ports for the host, over one
virtio-serial port, with no network and no SSH. One file of Python's standard library (3.9 or
later), to copy into any guest with a ``python3``; the host imports its protocol from here.
The wire and its flow control are in docs/design.md, "Exec"."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import select
import signal
import socket
import struct
import sys
import warnings  # noqa: F401  os.execvpe imports it: in the child, a guest may not have it

PORT_NAME = "org.goldclone.exec.0"
HEADER = struct.Struct("!IBI")
MAX_PAYLOAD = 64 * 1024
WINDOW = 256 * 1024
"""Bytes of data one side may send in a session before the other has consumed them."""
MAX_SESSIONS = 64
SYNC = b"\x00goldclone-sync:"
READY = b"\x00goldclone-ready-1:"
"""The host sends ``SYNC + nonce + newline``; the helper answers ``READY + nonce + newline``,
and frames follow. Bytes before them (of an earlier connection) are skipped."""

OPEN, INPUT, STDOUT, STDERR, EXIT, RESIZE, SIGNAL, CREDIT, CLOSE = range(1, 10)
"""Frame kinds; what each carries is in docs/design.md, "Exec"."""
CREDIT_BODY = struct.Struct("!I")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TIOCSCTTY = 0x540E
_TIOCSWINSZ = 0x5414
_READ = 64 * 1024
_IDLE_RECHECK = 1.0
_PORT_TRIES = 300
_NOT_FOUND, _NOT_EXECUTABLE = 127, 126


class Session:
    """A command or a connection to a guest port; ``outputs``: fd -> the kind it goes as."""

    def __init__(self, sid: int) -> None:
        self.sid, self.pid, self.input_fd, self.unacked = sid, 0, -1, 0
        self.outputs: dict[int, int] = {}
        self.pending = bytearray()
        self.status: int | None = None
        self.input_ended = self.is_socket = self.tty = False


class Helper:
    def __init__(self, port: int, reconnects: bool) -> None:
        self.port = port
        self.reconnects = reconnects
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.synced = False
        self.hung_up = False
        self.sessions: dict[int, Session] = {}
        self.wakeup_r, self.wakeup_w = os.pipe()
        for fd in (self.wakeup_r, self.wakeup_w, port):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGIO, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self.stop)
        self.stopping = False
        if reconnects:
            # virtio_console sends SIGIO when the host opens or closes the port.
            fcntl.fcntl(port, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(port, fcntl.F_SETFL, fcntl.fcntl(port, fcntl.F_GETFL) | os.O_ASYNC)

    def stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> None:
        while not self.stopping:
            self.reap()
            wanted = {self.wakeup_r: select.POLLIN}
            if not self.hung_up:
                wanted[self.port] = select.POLLIN | (select.POLLOUT if self.outbox else 0)
            for session in self.sessions.values():
                if session.unacked < WINDOW:
                    for fd in session.outputs:
                        wanted[fd] = wanted.get(fd, 0) | select.POLLIN
                if session.pending and session.input_fd >= 0:
                    wanted[session.input_fd] = wanted.get(session.input_fd, 0) | select.POLLOUT
            poller = select.poll()
            for fd, events in wanted.items():
                poller.register(fd, events)
            timeout = _IDLE_RECHECK * 1000 if self.hung_up else None
            for fd, events in poller.poll(timeout):
                if fd == self.wakeup_r:
                    os.read(fd, 4096)
                elif fd == self.port:
                    if not self.port_ready(events):
                        return
                else:
                    self.serve_fd(fd, events)
            if self.hung_up:  # until the host opens the port again (SIGIO wakes the poll)
                again = select.poll()
                again.register(self.port, select.POLLIN)
                self.hung_up = any(events & select.POLLHUP for _, events in again.poll(0))
        self.reset()  # SIGTERM: what it runs ends with it

    def port_ready(self, events: int) -> bool:
        """Read and write the port; False when it ended for good."""
        if events & select.POLLOUT:
            self.flush()
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
            try:
                data = os.read(self.port, _READ)
            except BlockingIOError:
                return True
            if not data:
                self.lost_host()
                return self.reconnects
            self.inbox += data
            self.parse()
        return True

    def lost_host(self) -> None:
        self.reset()
        self.inbox.clear()
        self.synced = False
        self.hung_up = True

    def reset(self) -> None:
        """A host that closed its end or synced anew: what it asked for is gone with it."""
        for sid in list(self.sessions):
            self.end(sid)
        self.outbox.clear()

    def parse(self) -> None:
        while True:
            if not self.synced:
                if not self.find_sync():
                    return
                continue
            if len(self.inbox) < HEADER.size:
                return
            sid, kind, length = HEADER.unpack_from(self.inbox)
            if length > MAX_PAYLOAD:
                self.synced = False  # not a frame: wait for the host's next sync
                continue
            if len(self.inbox) < HEADER.size + length:
                return
            payload = bytes(self.inbox[HEADER.size : HEADER.size + length])
            del self.inbox[: HEADER.size + length]
            try:
                self.frame(sid, kind, payload)
            except (ValueError, TypeError, KeyError, AttributeError):
                if kind == OPEN:
                    self.exit(sid, {"error": "a request the helper cannot read", "exit_code": 1})

    def find_sync(self) -> bool:
        start = self.inbox.find(SYNC)
        if start < 0:
            del self.inbox[: max(0, len(self.inbox) - len(SYNC))]
            return False
        end = self.inbox.find(b"\n", start)
        if end < 0:
            del self.inbox[:start]
            return False
        nonce = bytes(self.inbox[start + len(SYNC) : end])
        del self.inbox[: end + 1]
        self.reset()
        self.outbox += READY + nonce + b"\n"
        self.synced = True
        self.flush()
        return True

    def frame(self, sid: int, kind: int, payload: bytes) -> None:
        session = self.sessions.get(sid)
        if kind == OPEN:
            if session is not None or len(self.sessions) >= MAX_SESSIONS:
                self.exit(sid, {"error": "session taken or too many sessions", "exit_code": 1})
                return
            self.open(sid, json.loads(payload))
        elif session is None:
            return  # a frame that crossed the session's end
        elif kind == INPUT:
            if payload:
                session.pending += payload
            else:
                session.input_ended = True
            self.write_input(session)
        elif kind == CREDIT:
            session.unacked -= CREDIT_BODY.unpack(payload)[0]
        elif kind == RESIZE:
            size = json.loads(payload)
            _set_size(session.input_fd, size)
        elif kind == SIGNAL:
            if session.pid:
                _kill_group(session.pid, int(json.loads(payload)["signal"]))
        elif kind == CLOSE:
            self.end(sid)

    def open(self, sid: int, request: dict[str, object]) -> None:
        session = Session(sid)
        try:
            if "connect" in request:
                _connect(session, int(str(request["connect"])))
            else:
                _spawn(session, request)
        except _Refused as refused:
            self.exit(sid, {"error": str(refused), "exit_code": refused.exit_code})
            return
        except OSError as error:  # no pipes, TTYs or processes left to give it
            self.exit(sid, {"error": f"cannot start it: {error.strerror}", "exit_code": 126})
            return
        self.sessions[sid] = session

    def serve_fd(self, fd: int, events: int) -> None:
        for session in list(self.sessions.values()):
            if fd == session.input_fd and events & select.POLLOUT:
                self.write_input(session)
            if fd in session.outputs and events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self.read_output(session, fd)

    def read_output(self, session: Session, fd: int) -> None:
        try:
            data = os.read(fd, min(_READ, WINDOW - session.unacked))
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: a TTY whose other side closed
        if data:
            session.unacked += len(data)
            self.send(session.sid, session.outputs[fd], data)
            return
        kind = session.outputs.pop(fd)
        if session.is_socket:
            self.send(session.sid, kind, b"")
            self.end(session.sid, {"exit_code": 0})
        elif fd != session.input_fd:
            os.close(fd)
        self.finish(session)

    def write_input(self, session: Session) -> None:
        fd = session.input_fd
        while session.pending and fd >= 0:
            try:
                written = os.write(fd, session.pending[:_READ])
            except BlockingIOError:
                return
            except OSError:
                written = len(session.pending)  # the command stopped reading: drop the rest
            del session.pending[:written]
            self.send(session.sid, CREDIT, CREDIT_BODY.pack(written))
        if session.input_ended and not session.tty and fd >= 0:
            if session.is_socket:
                session.input_ended = False
                _shut_write(fd)
            else:
                session.input_fd = -1
                os.close(fd)

    def reap(self) -> None:
        for session in list(self.sessions.values()):
            if session.pid and session.status is None:
                try:
                    pid, status = os.waitpid(session.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = session.pid, 0
                if pid:
                    session.status = status
            if session.status is not None:
                self.drain_after_exit(session)
                self.finish(session)

    def drain_after_exit(self, session: Session) -> None:
        """Send what the command wrote before it ended (within the window); a pipe that a
        process it left behind still holds open is not waited for."""
        for fd in list(session.outputs):
            while fd in session.outputs and session.unacked < WINDOW:
                if not select.select([fd], [], [], 0)[0]:
                    session.outputs.pop(fd)
                    if fd != session.input_fd:
                        os.close(fd)
                    break
                self.read_output(session, fd)

    def finish(self, session: Session) -> None:
        if session.status is None or session.outputs or session.is_socket:
            return
        if os.WIFSIGNALED(session.status):
            number = os.WTERMSIG(session.status)
            self.end(session.sid, {"exit_code": 128 + number, "signal": number})
        else:
            self.end(session.sid, {"exit_code": os.waitstatus_to_exitcode(session.status)})

    def end(self, sid: int, result: dict[str, object] | None = None) -> None:
        """Forget the session, killing what it still runs; tell the host ``result`` unless
        the host ended it (None)."""
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        if session.pid and session.status is None:
            _kill_group(session.pid, signal.SIGKILL)
            os.waitpid(session.pid, 0)
        for fd in {*session.outputs, session.input_fd} - {-1}:
            os.close(fd)
        if result is not None:
            self.exit(sid, result)

    def exit(self, sid: int, result: dict[str, object]) -> None:
        self.send(sid, EXIT, json.dumps(result).encode())

    def send(self, sid: int, kind: int, payload: bytes) -> None:
        if not self.synced:
            return
        self.outbox += HEADER.pack(sid, kind, len(payload)) + payload
        self.flush()

    def flush(self) -> None:
        while self.outbox:
            try:
                written = os.write(self.port, self.outbox)
            except BlockingIOError:
                return
            except OSError:
                self.outbox.clear()  # no host: nothing is listening
                return
            del self.outbox[:written]


class _Refused(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _spawn(session: Session, request: dict[str, object]) -> None:
    asked = request.get("argv")
    argv = [str(arg) for arg in asked] if isinstance(asked, list) else []
    if not argv:
        raise _Refused("no command given", _NOT_FOUND)
    env = _environment(request.get("env"), tty=bool(request.get("tty")))
    cwd = str(request.get("cwd") or env["HOME"])
    tty = request.get("tty")
    if isinstance(tty, dict):
        master, slave = os.openpty()
        _set_size(master, tty)
        ends = {0: slave, 1: slave, 2: slave}
        session.outputs = {master: STDOUT}
        session.input_fd = master
        session.tty = True
        mine = [master]
    else:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ends = {0: in_r, 1: out_w, 2: err_w}
        session.outputs = {out_r: STDOUT, err_r: STDERR}
        session.input_fd = in_w
        mine = [in_w, out_r, err_r]
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it never returns
        _child(argv, env, cwd, ends, session.tty, report_w)
    os.close(report_w)
    for fd in set(ends.values()):
        os.close(fd)
    failure = _read_all(report_r)
    if failure:
        os.waitpid(pid, 0)
        for fd in mine:
            os.close(fd)
        number, _, what = failure.decode().partition(":")
        code = _NOT_FOUND if int(number) == errno.ENOENT and what == "run" else _NOT_EXECUTABLE
        reason = os.strerror(int(number))
        target = cwd if what == "cwd" else argv[0]
        raise _Refused(f"cannot {'enter' if what == 'cwd' else 'run'} {target}: {reason}", code)
    for fd in mine:
        os.set_blocking(fd, False)
    session.pid = pid


def _child(
    argv: list[str], env: dict[str, str], cwd: str, ends: dict[int, int], tty: bool, report: int
) -> None:
    what = "cwd"
    try:
        os.setsid()
        if tty:
            fcntl.ioctl(ends[0], _TIOCSCTTY, 0)
        for target, fd in ends.items():
            os.dup2(fd, target)
        os.closerange(3, report)
        os.closerange(report + 1, 65536)
        fcntl.fcntl(report, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        for number in (signal.SIGPIPE, signal.SIGCHLD, signal.SIGIO, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.chdir(cwd)
        what = "run"
        os.execvpe(argv[0], argv, env)
    except Exception as error:
        os.write(report, f"{getattr(error, 'errno', None) or errno.EIO}:{what}".encode())
    finally:
        os._exit(_NOT_EXECUTABLE)


def _connect(session: Session, port: int) -> None:
    if not 0 < port < 65536:
        raise _Refused(f"no such port: {port}", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.connect(("127.0.0.1", port))
    except OSError as error:
        sock.close()
        raise _Refused(f"cannot connect to port {port} in the guest: {error.strerror}", 1) from None
    fd = sock.detach()
    os.set_blocking(fd, False)
    session.outputs = {fd: STDOUT}
    session.input_fd = fd
    session.is_socket = True


def _environment(asked: object, tty: bool) -> dict[str, str]:
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        home = "/"
    env = {"PATH": DEFAULT_PATH, "HOME": home, "LANG": "C.UTF-8"}
    if tty:
        env["TERM"] = "xterm-256color"
    if isinstance(asked, dict):
        env.update({str(name): str(value) for name, value in asked.items()})
    return env


def _set_size(fd: int, size: object) -> None:
    if fd < 0 or not isinstance(size, dict):
        return
    rows, cols = int(size.get("rows", 24)), int(size.get("cols", 80))
    with contextlib.suppress(OSError):  # not a TTY: a session without one ignores sizes
        fcntl.ioctl(fd, _TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _kill_group(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, number)


def _shut_write(fd: int) -> None:
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_WR)


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _find_port(name: str) -> str | None:
    root = "/sys/class/virtio-ports"
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            with open(f"{root}/{entry}/name") as f:
                if f.read().strip() == name:
                    return f"/dev/{entry}"
        except OSError:
            continue
    return None


def main(args: list[str]) -> int:
    """``--fd N``: serve the host over an open file descriptor until it closes (the synthetic
    driver's guest); otherwise find the virtio port by name and serve it, across the host's
    reconnections, for as long as the guest runs."""
    for fd in (0, 1, 2):  # so that no pipe or TTY of a command is given a standard number
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    if args[:1] == ["--fd"] and len(args) == 2:
        Helper(int(args[1]), reconnects=False).run()
        return 0
    path = _find_port(PORT_NAME)
    for _ in range(_PORT_TRIES):  # virtio_console may not have found it yet
        if path is not None:
            break
        select.select([], [], [], 0.1)
        path = _find_port(PORT_NAME)
    if path is None:
        print(f"goldclone-helper: no virtio port named {PORT_NAME}", file=sys.stderr)
        return 3  # not a failure to start again after (systemd: RestartPreventExitStatus)
    Helper(os.open(path, os.O_RDWR | os.O_NOCTTY), reconnects=True).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
