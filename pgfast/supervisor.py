"""With pgfast.workers > 1: the parent process that forks the workers and keeps them
running.

The parent serves no client. It forks one worker per listening-socket copy (each worker
has its own SO_REUSEPORT accept queue; the Unix sockets are shared), says it is ready
once every worker is, restarts a worker that dies (a LOG line; what the dead worker held
in the shared counters is given back; its clients lost their connections, the others
notice nothing), and passes a shutdown request (shutdown.py) on to the workers, waiting
for them before its caller stops PostgreSQL. It waits for signals synchronously, so no
event loop exists in it when it forks.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import time

from . import log, pidfile
from .metrics import metrics
from .reload import reload
from .shutdown import SIGNALS, Mode
from .worker import Service, prepare_forked_worker, serve

_SIGNALS = {*SIGNALS, signal.SIGHUP, signal.SIGCHLD}
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
        self._mode: Mode | None = None            # the shutdown under way
        self._deadline: float | None = None       # when its workers are killed
        self._status = 0

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
                status, _mode = serve(self._service, index, self._tcp_sockets[index], supervised=True,
                                      ready_fd=write_end)
            except BaseException as exc:       # a worker must never return into the parent's code
                log.log(f"pgfast worker {index} failed: {type(exc).__name__}: {exc}")
            finally:
                os._exit(status)
        os.close(write_end)
        self._workers[pid] = index
        return pid, read_end

    def run(self) -> tuple[int, Mode]:
        """Serve until every worker has stopped; the exit status and how it stopped."""
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        pending = [self._fork(index)[1] for index in range(len(self._tcp_sockets))]
        if not self._await_ready(pending):
            self._stop_workers(Mode.FAST)
            return 1, Mode.FAST
        self._service.pidfile.set_status(pidfile.READY)
        log.log("database system is ready to accept connections")
        while self._mode is None or self._workers:
            info = self._next_signal()
            if info is None:
                self._kill_workers()        # past the shutdown's deadline
            elif info.si_signo in SIGNALS:
                self._begin_shutdown(Mode.for_signal(info.si_signo))
            elif info.si_signo == signal.SIGHUP:
                # read and report here (a worker started again later gets what this read),
                # then each worker applies it, and PostgreSQL reloads its own
                reload(self._service)
                self._signal_workers(signal.SIGHUP)
                if self._postmaster is not None:
                    try:
                        os.kill(self._postmaster.process.pid, signal.SIGHUP)
                    except ProcessLookupError:
                        pass
            else:
                if self._mode is None and self._postmaster is not None and self._postmaster.process.poll() is not None:
                    log.fatal(f"PostgreSQL exited unexpectedly with status {self._postmaster.process.returncode}; "
                              "shutting down")
                    self._status = 1
                    self._begin_shutdown(Mode.FAST, announce=False)
                self._reap(restart=self._mode is None)
        return self._status, self._mode

    def _next_signal(self):
        if self._deadline is None:
            return signal.sigwaitinfo(_SIGNALS)
        return signal.sigtimedwait(_SIGNALS, max(0.0, self._deadline - time.monotonic()))

    def _begin_shutdown(self, mode: Mode, announce: bool = True) -> None:
        """Tell the workers; a smart shutdown waits as long as their clients stay, the
        others only _STOP_TIMEOUT."""
        if self._mode is not None and mode <= self._mode:
            return
        self._mode = mode
        if announce:
            log.log(mode.request_line)
        self._service.pidfile.set_status(pidfile.STOPPING)
        self._signal_workers(mode.signal)
        self._deadline = None if mode is Mode.SMART else time.monotonic() + _STOP_TIMEOUT

    def _signal_workers(self, signum: int) -> None:
        for pid in self._workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

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

    def _reap(self, restart: bool) -> None:
        for pid, index in list(self._workers.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            del self._workers[pid]
            self._service.shared.reclaim(index)
            metrics.forget_gauges(index)
            if restart:
                log.log(f"worker process {index} (PID {pid}) {_exit_description(status)}; starting it again")
                _, ready = self._fork(index)
                os.close(ready)
            else:
                # its listening sockets, kept open here, would go on taking connections
                # nobody accepts; closed, the kernel sends them to the workers still running
                for sock in self._tcp_sockets[index]:
                    sock.close()

    def _stop_workers(self, mode: Mode) -> None:
        """Outside the signal loop (a start that failed): stop them and wait."""
        self._signal_workers(mode.signal)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while self._workers and time.monotonic() < deadline:
            self._reap(restart=False)
            time.sleep(0.02)
        self._kill_workers()

    def _kill_workers(self) -> None:
        for pid in list(self._workers):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self._service.shared.reclaim(self._workers.pop(pid))
