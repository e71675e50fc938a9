# cython: language_level=3, boundscheck=False, wraparound=False
"""PostgreSQL wire framing and the TLS pump (see _wire.pxd for the interface)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy


class ProtocolViolation(Exception):
    """The peer broke the framing rules; message is PostgreSQL's wording (08P01)."""


class TLSError(Exception):
    """OpenSSL failed the connection; the message is OpenSSL's reason."""


cdef inline uint32_t _be32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


def pack_int32(uint32_t value):
    return bytes(((value >> 24) & 0xff, (value >> 16) & 0xff, (value >> 8) & 0xff, value & 0xff))


cdef class ReadBuffer:

    def __cinit__(self):
        self._buf = bytearray()
        self._pos = 0

    cpdef feed_data(self, bytes data):
        if self._pos and self._pos == len(self._buf):
            # everything consumed: restart at the front instead of growing forever
            self._buf = bytearray(data)
            self._pos = 0
        else:
            self._buf += data

    cpdef Py_ssize_t size(self):
        return len(self._buf) - self._pos

    cpdef int first_byte(self):
        """The next unread byte, or -1: enough to tell a TLS ClientHello from a packet length."""
        return self._head()[0] if self.size() else -1

    cdef inline const unsigned char *_head(self):
        return <const unsigned char *>(<char *>self._buf) + self._pos

    cpdef take_startup(self):
        """(request code, body after the code) once a whole startup packet is here."""
        cdef Py_ssize_t avail = self.size()
        if avail < 4:
            return None
        cdef uint32_t length = _be32(self._head())
        # checked from the header alone, before buffering the packet: a client cannot
        # make the server hold more than STARTUP_MAX_LENGTH bytes for it
        if length < STARTUP_MIN_LENGTH or length > STARTUP_MAX_LENGTH:
            raise ProtocolViolation("invalid length of startup packet")
        if avail < length:
            return None
        cdef uint32_t code = _be32(self._head() + 4)
        body = bytes(self._buf[self._pos + 8:self._pos + length])
        self._pos += length
        return code, body

    cpdef take_message(self, Py_ssize_t max_length):
        """(type byte, payload) once a whole regular message is here."""
        cdef Py_ssize_t avail = self.size()
        if avail < 5:
            return None
        cdef const unsigned char *head = self._head()
        cdef uint32_t length = _be32(head + 1)
        if length < 4 or length > <uint32_t>max_length:
            raise ProtocolViolation(f"invalid message length {length}")
        if avail < 1 + <Py_ssize_t>length:
            return None
        msg_type = head[0]
        payload = bytes(self._buf[self._pos + 5:self._pos + 1 + length])
        self._pos += 1 + length
        return msg_type, payload

    cpdef bytes take_all(self):
        data = bytes(self._buf[self._pos:])
        self._buf = bytearray()
        self._pos = 0
        return data


def parse_startup_parameters(bytes body):
    """Name/value pairs of a StartupMessage body (after the protocol version).

    PostgreSQL's layout: NUL-terminated name, NUL-terminated value, ..., a final NUL.
    Strings are kept as bytes-in-str (surrogateescape) so they forward unchanged.
    """
    if not body or body[len(body) - 1] != 0:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    fields = body[:len(body) - 1].split(b"\0")
    if fields == [b""]:
        return []
    # an empty name ends PostgreSQL's walk, so it is only allowed as that final NUL
    if len(fields) % 2 != 1 or fields[len(fields) - 1] != b"" or b"" in fields[0:len(fields) - 1:2]:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    fields.pop()
    strings = [f.decode("utf-8", "surrogateescape") for f in fields]
    return list(zip(strings[0::2], strings[1::2]))


cdef inline const unsigned char *_skip_space(const unsigned char *p, const unsigned char *end) noexcept:
    while p < end and (p[0] == b' ' or p[0] == b'\t' or p[0] == b'\n' or p[0] == b'\r'):
        p += 1
    return p


cdef inline bint _word_is(const unsigned char **at, const unsigned char *end, const char *word) noexcept:
    """Whether the SQL at *at starts with `word` (any case) as a whole word; advances past it."""
    cdef const unsigned char *p = at[0]
    cdef Py_ssize_t k = 0
    while word[k] != 0:
        if p + k >= end or (p[k] | 0x20) != <unsigned char>word[k]:
            return False
        k += 1
    if p + k < end and ((p[k] | 0x20) >= b'a' and (p[k] | 0x20) <= b'z' or p[k] == b'_'
                        or (p[k] >= b'0' and p[k] <= b'9')):
        return False
    at[0] = p + k
    return True


cdef class MessageScanner:

    def __cinit__(self, bint from_client=False):
        self._from_client = from_client
        self._remaining = 0
        self._header_len = 0
        self.last_type = 0
        self.tx_status = 0
        self.requests = 0
        self.readies = 0
        self.database_ddl = 0
        self._sniffing = False
        self._sql_head_len = 0

    cdef void _on_header(self) noexcept:
        cdef int t = self._header[0]
        self.last_type = t
        self._remaining = <Py_ssize_t>_be32(self._header + 1) - 4
        if self._from_client:
            if t == b'Q' or t == b'S' or t == b'F':
                self.requests += 1
            if (t == b'Q' or t == b'P') and self._remaining > 0:
                self._sniffing = True
                self._sql_head_len = 0
        elif t == b'Z':
            self.readies += 1

    cdef void _sniff(self, const unsigned char *p, Py_ssize_t n) noexcept:
        cdef Py_ssize_t room = sizeof(self._sql_head) - self._sql_head_len
        if n > room:
            n = room
        memcpy(self._sql_head + self._sql_head_len, p, n)
        self._sql_head_len += n
        if self._sql_head_len == sizeof(self._sql_head):
            self._end_sniff()

    cdef void _end_sniff(self) noexcept:
        cdef const unsigned char *p = self._sql_head
        cdef const unsigned char *end = p + self._sql_head_len
        self._sniffing = False
        if self.last_type == b'P':          # Parse: the statement name comes first
            while p < end and p[0] != 0:
                p += 1
            p += 1
        p = _skip_space(p, end)
        if not (_word_is(&p, end, b"drop") or _word_is(&p, end, b"alter") or _word_is(&p, end, b"create")):
            return
        p = _skip_space(p, end)
        if _word_is(&p, end, b"database"):
            self.database_ddl += 1

    cpdef Py_ssize_t scan(self, bytes data) except -2:
        """Follow the messages in data; the offset of a Terminate ('X') or -1.

        Scanning stops at a Terminate so the caller can keep it from the backend.
        """
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t take
        while i < n:
            if self._remaining > 0:
                take = min(self._remaining, n - i)
                if self.last_type == b'Z' and take == self._remaining:
                    # the status is ReadyForQuery's last byte, wherever the chunk starts
                    self.tx_status = p[i + take - 1]
                if self._sniffing:
                    self._sniff(p + i, take)
                self._remaining -= take
                i += take
                if self._sniffing and self._remaining == 0:
                    self._end_sniff()
                continue
            if self._header_len == 0 and p[i] == b'X':
                return i
            self._header[self._header_len] = p[i]
            self._header_len += 1
            i += 1
            if self._header_len == 5:
                self._header_len = 0
                self._on_header()
                if self._remaining < 0:
                    raise ProtocolViolation("invalid message length")
        return -1

    @property
    def at_boundary(self):
        return self._remaining == 0 and self._header_len == 0


cdef OpenSSLCalls _calls
cdef bint _calls_installed = False


def install_openssl_calls(dict addresses):
    """Take the function addresses pgfast._openssl resolved (name -> int)."""
    global _calls_installed
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
    _calls_installed = True


cdef enum:
    SSL_ERROR_WANT_READ = 2
    SSL_ERROR_SYSCALL = 5
    SSL_ERROR_ZERO_RETURN = 6
    RECORD_PLAINTEXT = 16384
    MAX_RECORD_OVERHEAD = 256       # TLS 1.2/1.3 header + tag + padding, rounded up
    INITIAL_OUT = 262144


cdef class TLSPump:

    def __cinit__(self, owner, uintptr_t ssl, uintptr_t into_ssl, uintptr_t from_ssl):
        if not _calls_installed:
            raise RuntimeError("pgfast._openssl has not installed the OpenSSL calls")
        self._owner = owner
        self._ssl = <void *>ssl
        self._into_ssl = <void *>into_ssl
        self._from_ssl = <void *>from_ssl
        self._out = <char *>malloc(INITIAL_OUT)
        if self._out is NULL:
            raise MemoryError()
        self._out_size = INITIAL_OUT
        self._state = PUMP_OPEN

    def __dealloc__(self):
        free(self._out)

    @property
    def peer_closed(self):
        return self._state == PUMP_PEER_CLOSED

    cdef int _reserve(self, Py_ssize_t size) except -1:
        cdef char *grown
        if size > self._out_size:
            grown = <char *>realloc(self._out, size)
            if grown is NULL:
                raise MemoryError()
            self._out = grown
            self._out_size = size
        return 0

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

    cpdef bint handshake(self, bytes ciphertext) except -1:
        """Feed the peer's handshake bytes; True once the handshake is complete. What
        to send back is in pending_ciphertext(); a failed handshake raises TLSError
        and leaves the alert to send there."""
        cdef int ret, err
        if ciphertext:
            _calls.BIO_write(self._into_ssl, PyBytes_AS_STRING(ciphertext), <int>PyBytes_GET_SIZE(ciphertext))
        _calls.ERR_clear_error()
        ret = _calls.SSL_do_handshake(self._ssl)
        if ret == 1:
            return True
        err = _calls.SSL_get_error(self._ssl, ret)
        if err == SSL_ERROR_WANT_READ:
            return False
        self._raise_tls_error(err)

    cpdef bytes decrypt(self, bytes ciphertext):
        """Plaintext of every whole record now available (b'' while a record is partial)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(ciphertext)
        cdef Py_ssize_t filled = 0
        cdef int got = 0
        cdef int err
        if self._state != PUMP_OPEN:
            return b""
        if n:
            _calls.BIO_write(self._into_ssl, PyBytes_AS_STRING(ciphertext), <int>n)
        # as be_tls_read does: an error other code left queued must not be taken for ours
        _calls.ERR_clear_error()
        while True:
            # plaintext never outgrows its ciphertext by more than one record (a partial
            # record from an earlier call completing now), so this grows at most once
            if filled + RECORD_PLAINTEXT > self._out_size:
                self._reserve(self._out_size * 2)
            got = _calls.SSL_read(self._ssl, self._out + filled, <int>(self._out_size - filled))
            if got <= 0:
                break
            filled += got
        err = _calls.SSL_get_error(self._ssl, got)
        if err == SSL_ERROR_ZERO_RETURN:
            self._state = PUMP_PEER_CLOSED
        elif err != SSL_ERROR_WANT_READ:
            self._raise_tls_error(err)
        return PyBytes_FromStringAndSize(self._out, filled)

    cpdef bytes encrypt(self, bytes plaintext):
        """Ciphertext records for plaintext (a memory BIO never refuses a write)."""
        cdef const char *p = PyBytes_AS_STRING(plaintext)
        cdef Py_ssize_t left = PyBytes_GET_SIZE(plaintext)
        cdef int wrote
        if self._state == PUMP_FAILED:
            raise TLSError("connection already failed")
        _calls.ERR_clear_error()
        # pyOpenSSL turns on SSL_MODE_ENABLE_PARTIAL_WRITE, so each call may take
        # only one record's worth
        while left > 0:
            wrote = _calls.SSL_write(self._ssl, p, <int>min(left, 1 << 30))
            if wrote <= 0:
                self._raise_tls_error(_calls.SSL_get_error(self._ssl, wrote))
            p += wrote
            left -= wrote
        return self._drain_ciphertext()

    cdef bytes _drain_ciphertext(self):
        cdef Py_ssize_t filled = 0
        cdef int got
        while True:
            if filled + RECORD_PLAINTEXT + MAX_RECORD_OVERHEAD > self._out_size:
                self._reserve(self._out_size * 2)
            got = _calls.BIO_read(self._from_ssl, self._out + filled, <int>(self._out_size - filled))
            if got <= 0:
                break
            filled += got
        return PyBytes_FromStringAndSize(self._out, filled)

    cpdef bytes close_notify(self):
        """The close_notify alert to send before closing (b'' when it cannot be sent)."""
        if self._state == PUMP_FAILED:
            return b""
        _calls.SSL_shutdown(self._ssl)
        _calls.ERR_clear_error()
        return self._drain_ciphertext()

    def pending_ciphertext(self):
        """Records OpenSSL produced on its own while reading (alerts, key updates)."""
        return self._drain_ciphertext()
