# cython: language_level=3, boundscheck=False, wraparound=False
"""Counters shared by pgfast's worker processes, in one anonymous shared mapping made
before they are forked.

Limits that are global (clients, backends, a transaction pool's size) are enforced on
one atomic counter each: take() adds first and gives back what went over, so two
workers can never both take the last place. Each worker's own share is kept beside the
global count, so when a worker dies the parent gives back exactly what it held
(reclaim()). Cancel routing uses a table of process IDs (real backend pids and pgfast's
virtual ones) -> the worker that issued the key, so a CancelRequest that lands on
another worker (SO_REUSEPORT spreads connections by address) reaches its session.

Layout (all int64, native order): per counter kind, global then one per worker; the
pool table (key hash, global count, count per worker, clients waiting per worker); the
pid table (pid << 8 | worker, 0 empty, -1 deleted).
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint64_t

import mmap

cdef extern from *:
    """
    static inline long long pgfast_add(long long *p, long long v) {
        return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST);
    }
    static inline long long pgfast_load(long long *p) {
        return __atomic_load_n(p, __ATOMIC_SEQ_CST);
    }
    static inline void pgfast_store(long long *p, long long v) {
        __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
    }
    static inline int pgfast_cas(long long *p, long long expected, long long desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    """
    long long pgfast_add(long long *p, long long v) nogil
    long long pgfast_load(long long *p) nogil
    void pgfast_store(long long *p, long long v) nogil
    bint pgfast_cas(long long *p, long long expected, long long desired) nogil

cdef enum:
    MAX_WORKERS = 64
    KINDS = 4                 # CLIENTS, BACKENDS, and two spare
    POOL_SLOTS = 4096
    PID_SLOTS = 1 << 17
    POOL_ENTRY = 2 + 2 * MAX_WORKERS     # key, global count, count per worker, waiting per worker

CLIENTS = 0
BACKENDS = 1

cdef Py_ssize_t _KIND_BASE = 0
cdef Py_ssize_t _POOL_BASE = KINDS * (1 + MAX_WORKERS)
cdef Py_ssize_t _PID_BASE = _POOL_BASE + POOL_SLOTS * POOL_ENTRY
cdef Py_ssize_t _TOTAL = _PID_BASE + PID_SLOTS


cdef class Shared:
    cdef object _map
    cdef Py_buffer _view
    cdef long long *_words
    cdef readonly int worker          # this process's worker index (set after fork)

    def __cinit__(self):
        self._map = mmap.mmap(-1, _TOTAL * 8, flags=mmap.MAP_SHARED)
        PyObject_GetBuffer(self._map, &self._view, PyBUF_WRITABLE)
        self._words = <long long *>self._view.buf
        self.worker = 0

    def __dealloc__(self):
        if self._words is not NULL:
            PyBuffer_Release(&self._view)

    def set_worker(self, int worker):
        if not 0 <= worker < MAX_WORKERS:
            raise ValueError("worker index out of range")
        self.worker = worker

    # --- kinds: clients, backends --------------------------------------------------------

    cdef inline long long *_kind(self, int kind, int column) noexcept:
        return self._words + _KIND_BASE + kind * (1 + MAX_WORKERS) + column

    def take(self, int kind, long long limit):
        """One more of kind if the total stays within limit; False (nothing taken) if not."""
        if pgfast_add(self._kind(kind, 0), 1) > limit:
            pgfast_add(self._kind(kind, 0), -1)
            return False
        pgfast_add(self._kind(kind, 1 + self.worker), 1)
        return True

    def add(self, int kind, long long delta):
        """Count without a limit (backends PostgreSQL itself may refuse)."""
        pgfast_add(self._kind(kind, 0), delta)
        pgfast_add(self._kind(kind, 1 + self.worker), delta)

    def give(self, int kind):
        self.add(kind, -1)

    def total(self, int kind):
        return pgfast_load(self._kind(kind, 0))

    def held(self, int kind, int worker):
        return pgfast_load(self._kind(kind, 1 + worker))

    # --- transaction pools, by a hash of their key -----------------------------------------

    cdef long long *_pool_entry(self, long long key_hash) except NULL:
        """The entry for key_hash (0 is reserved for empty), claimed if new."""
        cdef long long *entry
        cdef uint64_t i, start
        if key_hash == 0:
            key_hash = 1
        start = (<uint64_t>key_hash) % POOL_SLOTS
        for i in range(POOL_SLOTS):
            entry = self._words + _POOL_BASE + ((start + i) % POOL_SLOTS) * POOL_ENTRY
            if pgfast_load(entry) == key_hash:
                return entry
            if pgfast_load(entry) == 0 and pgfast_cas(entry, 0, key_hash):
                return entry
            if pgfast_load(entry) == key_hash:
                return entry
        raise MemoryError("pgfast's shared pool table is full")

    def pool_take(self, long long key_hash, long long limit):
        cdef long long *entry = self._pool_entry(key_hash)
        if pgfast_add(entry + 1, 1) > limit:
            pgfast_add(entry + 1, -1)
            return False
        pgfast_add(entry + 2 + self.worker, 1)
        return True

    def pool_give(self, long long key_hash):
        cdef long long *entry = self._pool_entry(key_hash)
        pgfast_add(entry + 1, -1)
        pgfast_add(entry + 2 + self.worker, -1)

    def pool_total(self, long long key_hash):
        return pgfast_load(self._pool_entry(key_hash) + 1)

    def set_waiting(self, long long key_hash, long long waiting):
        """How many of this worker's clients wait for this pool."""
        pgfast_store(self._pool_entry(key_hash) + 2 + MAX_WORKERS + self.worker, waiting)

    def waiting_elsewhere(self, long long key_hash):
        """Clients of other workers waiting for this pool."""
        cdef long long *entry = self._pool_entry(key_hash)
        cdef long long total = 0
        cdef int w
        for w in range(MAX_WORKERS):
            if w != self.worker:
                total += pgfast_load(entry + 2 + MAX_WORKERS + w)
        return total

    # --- process IDs in cancel keys -> the worker that issued them ------------------------

    def register_pid(self, long long pid):
        cdef uint64_t i, start = (<uint64_t>pid * 2654435761u) % PID_SLOTS
        cdef long long *slot
        cdef long long word = (pid << 8) | self.worker
        cdef long long seen
        for i in range(PID_SLOTS):
            slot = self._words + _PID_BASE + (start + i) % PID_SLOTS
            seen = pgfast_load(slot)
            if (seen == 0 or seen == -1) and pgfast_cas(slot, seen, word):
                return
        raise MemoryError("pgfast's shared cancel table is full")

    def unregister_pid(self, long long pid):
        cdef uint64_t i, start = (<uint64_t>pid * 2654435761u) % PID_SLOTS
        cdef long long *slot
        cdef long long seen
        for i in range(PID_SLOTS):
            slot = self._words + _PID_BASE + (start + i) % PID_SLOTS
            seen = pgfast_load(slot)
            if seen == 0:
                return
            if seen > 0 and (seen >> 8) == pid and (seen & 0xff) == self.worker:
                pgfast_cas(slot, seen, -1)
                return

    def owner_of(self, long long pid):
        """The worker that issued a key with this process ID, or None."""
        cdef uint64_t i, start = (<uint64_t>pid * 2654435761u) % PID_SLOTS
        cdef long long seen
        for i in range(PID_SLOTS):
            seen = pgfast_load(self._words + _PID_BASE + (start + i) % PID_SLOTS)
            if seen == 0:
                return None
            if seen > 0 and (seen >> 8) == pid:
                return seen & 0xff
        return None

    # --- a worker died: what it held is given back ---------------------------------------

    def reclaim(self, int worker):
        cdef int kind
        cdef long long held
        cdef Py_ssize_t i
        cdef long long *entry
        cdef long long seen
        for kind in range(KINDS):
            held = pgfast_load(self._kind(kind, 1 + worker))
            pgfast_add(self._kind(kind, 0), -held)
            pgfast_add(self._kind(kind, 1 + worker), -held)
        for i in range(POOL_SLOTS):
            entry = self._words + _POOL_BASE + i * POOL_ENTRY
            held = pgfast_load(entry + 2 + worker)
            if held:
                pgfast_add(entry + 1, -held)
                pgfast_add(entry + 2 + worker, -held)
            pgfast_store(entry + 2 + MAX_WORKERS + worker, 0)
        for i in range(PID_SLOTS):
            seen = pgfast_load(self._words + _PID_BASE + i)
            if seen > 0 and (seen & 0xff) == worker:
                pgfast_cas(self._words + _PID_BASE + i, seen, -1)
