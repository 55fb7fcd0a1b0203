"""The fronts of `corral up -d` live in the keeper and outlive the agent: a `kill -9` of the
agent under load refuses no connection and cuts none in flight, the next agent takes the
front back as it was (its counters go on), and the keeper's death puts the front back in the
agent. Real processes, real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral._core import process_alive
from tests.e2e import kill_groups, wait_until, write_spec
from tests.test_cli import corral
from tests.test_survival import agent_back, keeper, marked, status

pytestmark = pytest.mark.timeout(180)

FRONT = 23071

ECHO = """
import os, socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(os.environ["CORRAL_INSTANCE"].encode() + b" " + line)
            self.wfile.flush()
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("127.0.0.1", int(os.environ["CORRAL_PORT_TCP"])), H).serve_forever()
"""

SPEC = f"""
    name: fronted
    services:
      echo:
        replicas: 2
        command: ["{{py}}", "echo.py"]
        ports: {{tcp: auto}}
        expose: {FRONT}
        health:
          readiness: {{tcp: {{port: tcp}}, period: 100ms}}
        shutdown: {{timeout: 3s, drain: 1s}}
"""


class Clients:
    """New connections through the front in a loop on a thread, each sending a line and
    reading the answer: counts what was refused or cut."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    s.sendall(b"ping\n")
                    got = s.makefile("rb").readline()
                if not got.endswith(b" ping\n"):
                    raise OSError(f"answer {got!r}")
                self.ok += 1
            except OSError as e:
                self.failed.append(f"{type(e).__name__}: {e}")
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "echo.py").write_text(ECHO)
    write_spec(tmp_path, SPEC)
    r = corral("up", "-d", cwd=tmp_path)
    assert r.returncode == 0, r
    yield tmp_path
    corral("down", cwd=tmp_path)
    left = marked(tmp_path)
    kill_groups(left)
    for pid in left:
        os.kill(pid, signal.SIGKILL) if process_alive(pid) else None
    k = keeper(tmp_path)
    if process_alive(int(k["pid"])):
        os.kill(int(k["pid"]), signal.SIGKILL)


def test_kill_9_of_the_agent_refuses_nothing_and_cuts_no_connection_in_flight(stack: Path) -> None:
    before = status(stack)
    held = socket.create_connection(("127.0.0.1", FRONT), timeout=10)
    reader = held.makefile("rb")
    held.sendall(b"one\n")
    first = reader.readline()
    assert first.endswith(b" one\n"), first
    clients = Clients(FRONT)
    wait_until(lambda: clients.ok >= 20, 10, "clients get answers through the front")
    os.kill(before["agent_pid"], signal.SIGKILL)
    # While no agent lives, and while the next one re-adopts, the front answers.
    held.sendall(b"two\n")
    assert reader.readline() == first.replace(b"one", b"two"), "the connection in flight goes on, to its instance"
    after = agent_back(stack, before["agent_pid"])
    n = clients.ok
    wait_until(lambda: clients.ok >= n + 20, 10, "clients keep getting answers under the new agent")
    clients.stop()
    assert clients.failed == [], clients.failed[:5]
    held.sendall(b"three\n")
    assert reader.readline() == first.replace(b"one", b"three")
    held.close()
    assert {i["pid"] for i in after["services"]["echo"]} == {i["pid"] for i in before["services"]["echo"]}
    front = status(stack)["fronts"]["echo"]
    assert front["address"] == f"127.0.0.1:{FRONT}"
    assert front["connections"] >= clients.ok, "the keeper's front, counters and all, is the one the new agent has"
    assert front["refused"] == 0
    assert (stack / ".corral" / "fronts.sock").stat().st_mode & 0o777 == 0o600


def test_a_front_moved_by_apply_moves_in_the_keeper_and_down_closes_it(stack: Path) -> None:
    spec = (stack / "corral.yaml").read_text()
    (stack / "corral.yaml").write_text(spec.replace(f"expose: {FRONT}", f"expose: {FRONT + 1}"))
    r = corral("up", "-d", cwd=stack)  # to a running stack: an apply
    assert r.returncode == 0, r
    with socket.create_connection(("127.0.0.1", FRONT + 1), timeout=10) as s:
        s.sendall(b"moved\n")
        assert s.makefile("rb").readline().endswith(b" moved\n")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", FRONT), timeout=5).close()
    keeper_pid = int(keeper(stack)["pid"])
    r = corral("down", cwd=stack)
    assert r.returncode == 0, r
    wait_until(lambda: not process_alive(keeper_pid), 10, "the keeper ends after down")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", FRONT + 1), timeout=5).close()


def test_when_the_keeper_dies_the_front_listens_again_in_the_agent(stack: Path) -> None:
    st = status(stack)
    os.kill(int(keeper(stack)["pid"]), signal.SIGKILL)

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", FRONT), timeout=2) as s:
                s.sendall(b"back\n")
                return s.makefile("rb").readline().endswith(b" back\n")
        except OSError:
            return False

    wait_until(answers, 15, "the front answers again, from the agent")
    assert status(stack)["agent_pid"] == st["agent_pid"], "the same agent"
    wait_until(lambda: status(stack)["status"] == "up", 30, "the rolling restart after the keeper's death ends")
    assert answers()


def test_only_the_keepers_own_user_may_configure_its_fronts(stack: Path) -> None:
    """A process of another uid that reaches the socket gets no answer: the keeper reads
    the kernel's peer credentials and hangs up."""
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    path = stack / ".corral" / "fronts.sock"
    probe = (
        "import os, socket, json\n"
        f"d = os.open({str(path.parent)!r}, os.O_PATH)\n"  # past the test's own 0700 directories
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(f'/proc/self/fd/{d}/fronts.sock')\n"
        "try:\n"  # the hang-up may come before the send (broken pipe) or after (reset, or EOF)
        "    s.sendall(json.dumps({'op': 'close', 'name': 'echo'}).encode() + b'\\n')\n"
        "    print('hung up' if s.recv(100) == b'' else 'answered')\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    print('hung up')\n"
    )
    os.chmod(path, 0o666)  # so the kernel lets it connect at all: the keeper's check is what is tried
    os.chmod(stack / ".corral", 0o711)
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    finally:
        os.chmod(path, 0o600)
        os.chmod(stack / ".corral", 0o700)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hung up", "no answer"
    with socket.create_connection(("127.0.0.1", FRONT), timeout=10) as s:
        s.sendall(b"still\n")
        assert s.makefile("rb").readline().endswith(b" still\n"), "the front was not closed"
