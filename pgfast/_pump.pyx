# cython: language_level=3, boundscheck=False, wraparound=False
"""The TLS pump (see _pump.pxd for the interface)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uintptr_t
from libc.stdlib cimport malloc, realloc

from OpenSSL import SSL

from pgfast import _openssl


class TLSError(Exception):
    """OpenSSL failed the connection; the message is OpenSSL's reason."""


ctypedef int (*ssl_read_fn)(void *ssl, void *buf, int num) noexcept nogil
ctypedef int (*ssl_write_fn)(void *ssl, const void *buf, int num) noexcept nogil
ctypedef int (*bio_read_fn)(void *bio, void *buf, int num) noexcept nogil
ctypedef int (*bio_write_fn)(void *bio, const void *buf, int num) noexcept nogil
ctypedef int (*ssl_get_error_fn)(const void *ssl, int ret) noexcept nogil
ctypedef int (*ssl_shutdown_fn)(void *ssl) noexcept nogil
ctypedef int (*ssl_do_handshake_fn)(void *ssl) noexcept nogil
ctypedef unsigned long (*err_get_error_fn)() noexcept nogil
ctypedef void (*err_clear_error_fn)() noexcept nogil
ctypedef const char *(*err_reason_string_fn)(unsigned long e) noexcept nogil

cdef struct OpenSSLCalls:
    ssl_read_fn SSL_read
    ssl_write_fn SSL_write
    bio_read_fn BIO_read
    bio_write_fn BIO_write
    ssl_get_error_fn SSL_get_error
    ssl_shutdown_fn SSL_shutdown
    ssl_do_handshake_fn SSL_do_handshake
    err_get_error_fn ERR_get_error
    err_clear_error_fn ERR_clear_error
    err_reason_string_fn ERR_reason_error_string

cdef OpenSSLCalls _calls


cdef void _resolve_calls() except *:
    # once, at import: the library pyOpenSSL itself uses (cryptography's), so both
    # always share one OpenSSL copy
    cdef dict addresses = _openssl.function_addresses(
        ("SSL_read", "SSL_write", "BIO_read", "BIO_write", "SSL_get_error", "SSL_shutdown",
         "SSL_do_handshake", "ERR_get_error", "ERR_clear_error", "ERR_reason_error_string"))
    _calls.SSL_read = <ssl_read_fn><uintptr_t>addresses["SSL_read"]
    _calls.SSL_write = <ssl_write_fn><uintptr_t>addresses["SSL_write"]
    _calls.BIO_read = <bio_read_fn><uintptr_t>addresses["BIO_read"]
    _calls.BIO_write = <bio_write_fn><uintptr_t>addresses["BIO_write"]
    _calls.SSL_get_error = <ssl_get_error_fn><uintptr_t>addresses["SSL_get_error"]
    _calls.SSL_shutdown = <ssl_shutdown_fn><uintptr_t>addresses["SSL_shutdown"]
    _calls.SSL_do_handshake = <ssl_do_handshake_fn><uintptr_t>addresses["SSL_do_handshake"]
    _calls.ERR_get_error = <err_get_error_fn><uintptr_t>addresses["ERR_get_error"]
    _calls.ERR_clear_error = <err_clear_error_fn><uintptr_t>addresses["ERR_clear_error"]
    _calls.ERR_reason_error_string = <err_reason_string_fn><uintptr_t>addresses["ERR_reason_error_string"]


_resolve_calls()


cdef enum:
    SSL_ERROR_WANT_READ = 2
    SSL_ERROR_SYSCALL = 5
    SSL_ERROR_ZERO_RETURN = 6
    RECORD_PLAINTEXT = 16384
    # PostgreSQL never puts more than its 8 KB send buffer into one record, and libpq's
    # reader depends on that: it select()s on the socket once its buffer holds less
    # than 8 KB of room, and plaintext left inside OpenSSL would never wake it
    MAX_RECORD_PLAINTEXT = 8192
    MAX_RECORD_OVERHEAD = 256       # TLS 1.2/1.3 header + tag + padding, rounded up
    # ciphertext goes into the BIO a record's worth at a time, so a connection's memory
    # BIO never grows to the size of a socket read
    FEED_CHUNK = RECORD_PLAINTEXT + 2048
    INITIAL_SCRATCH = 65536


# One output buffer for every pump: they all run on the event loop's thread with the
# GIL held, and each call copies its result out into one bytes object before
# returning, so a connection costs no buffer of its own while it is idle.
cdef char *_scratch = NULL
cdef Py_ssize_t _scratch_size = 0


cdef int _reserve(Py_ssize_t size) except -1:
    global _scratch, _scratch_size
    cdef Py_ssize_t grown = _scratch_size or INITIAL_SCRATCH
    cdef char *buf
    if size <= _scratch_size:
        return 0
    while grown < size:
        grown *= 2
    buf = <char *>realloc(_scratch, grown)
    if buf is NULL:
        raise MemoryError()
    _scratch = buf
    _scratch_size = grown
    return 0


def pump_for(connection):
    """A pump for a pyOpenSSL Connection made on memory BIOs (Connection(ctx, None))."""
    return TLSPump.new(connection)


cdef class TLSPump:

    def __init__(self):
        raise TypeError("TLSPump is made with pump_for(connection)")

    @staticmethod
    cdef TLSPump new(object connection):
        if type(connection) is not SSL.Connection:
            raise TypeError(f"expected an OpenSSL.SSL.Connection, got {type(connection).__name__}")
        ssl, into_ssl, from_ssl = _openssl.connection_pointers(connection)
        cdef TLSPump pump = TLSPump.__new__(TLSPump)
        pump._owner = connection
        pump._ssl = <void *><uintptr_t>ssl
        pump._into_ssl = <void *><uintptr_t>into_ssl
        pump._from_ssl = <void *><uintptr_t>from_ssl
        pump._state = PUMP_OPEN
        return pump

    @property
    def peer_closed(self):
        return self._state == PUMP_PEER_CLOSED

    @property
    def failed(self):
        return self._state == PUMP_FAILED

    cdef _raise_tls_error(self, int ret):
        cdef unsigned long code = _calls.ERR_get_error()
        cdef const char *reason
        self._state = PUMP_FAILED
        _calls.ERR_clear_error()
        if code:
            reason = _calls.ERR_reason_error_string(code)
            if reason is not NULL:
                raise TLSError(reason.decode("ascii", "replace"))
        if ret == SSL_ERROR_SYSCALL:
            raise TLSError("unexpected EOF")
        raise TLSError(f"SSL error code {ret}")

    cdef int _feed(self, const char *data, Py_ssize_t size) except -1:
        # a memory BIO refuses a write only when it cannot allocate
        if size and _calls.BIO_write(self._into_ssl, data, <int>size) != size:
            self._state = PUMP_FAILED
            _calls.ERR_clear_error()
            raise MemoryError("could not buffer TLS data")
        return 0

    cdef Py_ssize_t _read_plaintext(self, Py_ssize_t filled) except -1:
        """SSL_read every whole record into the scratch buffer from `filled` on."""
        cdef int got, err
        while True:
            _reserve(filled + RECORD_PLAINTEXT)
            got = _calls.SSL_read(self._ssl, _scratch + filled, <int>min(_scratch_size - filled, 1 << 30))
            if got <= 0:
                break
            filled += got
        err = _calls.SSL_get_error(self._ssl, got)
        if err == SSL_ERROR_ZERO_RETURN:
            self._state = PUMP_PEER_CLOSED
        elif err != SSL_ERROR_WANT_READ:
            self._raise_tls_error(err)
        return filled

    cdef Py_ssize_t _drain_into(self, Py_ssize_t filled) except -1:
        """Move the ciphertext OpenSSL produced into the scratch buffer from `filled` on."""
        cdef int got
        while True:
            _reserve(filled + RECORD_PLAINTEXT + MAX_RECORD_OVERHEAD)
            got = _calls.BIO_read(self._from_ssl, _scratch + filled, <int>min(_scratch_size - filled, 1 << 30))
            if got <= 0:
                return filled
            filled += got

    cpdef bint handshake(self, bytes ciphertext) except -1:
        """Feed the peer's handshake bytes; True once the handshake is complete. What
        to send back is in pending_ciphertext(); a failed handshake raises TLSError
        and leaves the alert to send there."""
        cdef int ret, err
        self._feed(PyBytes_AS_STRING(ciphertext), PyBytes_GET_SIZE(ciphertext))
        _calls.ERR_clear_error()
        ret = _calls.SSL_do_handshake(self._ssl)
        if ret == 1:
            return True
        err = _calls.SSL_get_error(self._ssl, ret)
        if err == SSL_ERROR_WANT_READ:
            return False
        self._raise_tls_error(err)

    cpdef bytes decrypt(self, bytes ciphertext):
        """Plaintext of every whole record now available (b'' while a record is partial).
        After a TLSError, the alert for the peer is in pending_ciphertext()."""
        cdef const char *p = PyBytes_AS_STRING(ciphertext)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(ciphertext)
        cdef Py_ssize_t pos = 0, take, filled = 0
        if self._state != PUMP_OPEN:
            return b""
        # as be_tls_read does: an error other code left queued must not be taken for ours
        _calls.ERR_clear_error()
        while True:
            take = min(n - pos, <Py_ssize_t>FEED_CHUNK)
            self._feed(p + pos, take)
            pos += take
            filled = self._read_plaintext(filled)
            if pos >= n or self._state != PUMP_OPEN:
                break
        plaintext = PyBytes_FromStringAndSize(_scratch, filled)
        # records OpenSSL made while reading (a refused renegotiation's alert, a TLS 1.3
        # KeyUpdate's answer): the caller sends them now, not with its next write
        filled = self._drain_into(0)
        if filled:
            self._outgoing = (self._outgoing or b"") + PyBytes_FromStringAndSize(_scratch, filled)
        return plaintext

    cpdef bytes take_outgoing(self):
        """What decrypt() left to send (b'' mostly)."""
        out, self._outgoing = self._outgoing, None
        return out or b""

    cpdef bytes encrypt(self, bytes plaintext):
        """Ciphertext records for plaintext, none carrying more than 8192 bytes of it."""
        cdef const char *p = PyBytes_AS_STRING(plaintext)
        cdef Py_ssize_t left = PyBytes_GET_SIZE(plaintext)
        cdef Py_ssize_t filled = 0
        cdef int wrote
        if self._state == PUMP_FAILED:
            raise TLSError("connection already failed")
        _calls.ERR_clear_error()
        # what OpenSSL queued on its own (TLS 1.3 session tickets, alerts) goes first
        filled = self._drain_into(0)
        while left > 0:
            wrote = _calls.SSL_write(self._ssl, p, <int>min(left, <Py_ssize_t>MAX_RECORD_PLAINTEXT))
            if wrote <= 0:
                self._raise_tls_error(_calls.SSL_get_error(self._ssl, wrote))
            p += wrote
            left -= wrote
            filled = self._drain_into(filled)
        if self._outgoing is not None:        # made before all of this
            return self.take_outgoing() + PyBytes_FromStringAndSize(_scratch, filled)
        return PyBytes_FromStringAndSize(_scratch, filled)

    cpdef bytes close_notify(self):
        """The close_notify alert to send before closing (b'' when it cannot be sent)."""
        if self._state == PUMP_FAILED:
            return b""
        _calls.SSL_shutdown(self._ssl)
        _calls.ERR_clear_error()
        return self.pending_ciphertext()

    cpdef bytes pending_ciphertext(self):
        """Records OpenSSL produced on its own (handshake replies, alerts, key updates)."""
        earlier = self.take_outgoing()
        return earlier + PyBytes_FromStringAndSize(_scratch, self._drain_into(0))
