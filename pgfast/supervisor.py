"""With pgfast.workers > 1: the parent process that forks the workers and keeps them
running.

The parent serves no client. It forks one worker per listening-socket copy (each worker
has its own SO_REUSEPORT accept queue; the Unix sockets are shared), says it is ready
once every worker is, restarts a worker that dies (a LOG line; what the dead worker held
in the shared counters is given back; its clients lost their connections, the others
notice nothing), and on SIGTERM/SIGINT stops the workers (they end their clients with
57P01) before its caller stops PostgreSQL. It waits for signals synchronously, so no
event loop exists in it when it forks.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import time

from . import log
from .reload import reload
from .worker import Service, prepare_forked_worker, serve

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0


def _exit_description(status: int) -> str:
    """PostgreSQL's LogChildExit wording."""
    if os.WIFEXITED(status):
        return f"exited with exit code {os.WEXITSTATUS(status)}"
    number = os.WTERMSIG(status)
    return f"was terminated by signal {number}: {signal.strsignal(number)}"


class Supervisor:
    def __init__(self, service: Service, tcp_sockets: list[list[socket.socket]], postmaster):
        self._service = service
        self._tcp_sockets = tcp_sockets
        self._postmaster = postmaster
        self._workers: dict[int, int] = {}        # pid -> worker index

    def _fork(self, index: int) -> tuple[int, int]:
        """A worker; (pid, the read end of its readiness pipe)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(read_end)
                prepare_forked_worker(index, self._service)
                for other, sockets in enumerate(self._tcp_sockets):
                    if other != index:
                        for sock in sockets:
                            sock.close()
                status = serve(self._service, index, self._tcp_sockets[index], supervised=True, ready_fd=write_end)
            except BaseException as exc:       # a worker must never return into the parent's code
                log.log(f"pgfast worker {index} failed: {type(exc).__name__}: {exc}")
            finally:
                os._exit(status)
        os.close(write_end)
        self._workers[pid] = index
        return pid, read_end

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        pending = [self._fork(index)[1] for index in range(len(self._tcp_sockets))]
        if not self._await_ready(pending):
            self._stop_workers()
            return 1
        log.log("database system is ready to accept connections")
        while True:
            info = signal.sigwaitinfo(_SIGNALS)
            if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                log.log("received fast shutdown request")
                self._stop_workers()
                return 0
            if info.si_signo == signal.SIGHUP:
                # read and report here (a worker started again later gets what this read),
                # then each worker applies it, and PostgreSQL reloads its own
                reload(self._service)
                for pid in self._workers:
                    os.kill(pid, signal.SIGHUP)
                try:
                    os.kill(self._postmaster.process.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass
                continue
            if self._postmaster.process.poll() is not None:
                log.fatal(f"PostgreSQL exited unexpectedly with status {self._postmaster.process.returncode}; "
                          "shutting down")
                self._stop_workers()
                return 1
            self._reap_and_restart()

    def _await_ready(self, pipes: list[int]) -> bool:
        deadline = time.monotonic() + _READY_TIMEOUT
        waiting = set(pipes)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                log.fatal("pgfast's worker processes did not start in time")
                return False
            readable, _, _ = select.select(list(waiting), [], [], left)
            for fd in readable:
                ok = os.read(fd, 1) == b"."
                os.close(fd)
                waiting.discard(fd)
                if not ok:
                    log.fatal("a pgfast worker process failed to start")
                    for other in waiting:
                        os.close(other)
                    return False
        return True

    def _reap_and_restart(self) -> None:
        for pid, index in list(self._workers.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            del self._workers[pid]
            self._service.shared.reclaim(index)
            log.log(f"worker process {index} (PID {pid}) {_exit_description(status)}; starting it again")
            _, ready = self._fork(index)
            os.close(ready)

    def _stop_workers(self) -> None:
        for pid in self._workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _STOP_TIMEOUT
        while self._workers and time.monotonic() < deadline:
            for pid in list(self._workers):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    del self._workers[pid]
            time.sleep(0.02)
        for pid in list(self._workers):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            del self._workers[pid]
