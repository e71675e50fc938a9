# cython: language_level=3, boundscheck=False, wraparound=False
"""PostgreSQL wire framing (see _framing.pxd for the interface)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t
from libc.string cimport memcpy


class ProtocolViolation(Exception):
    """The peer broke the framing rules; message is PostgreSQL's wording (08P01)."""


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
            return
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            # mostly consumed, a partial message pending: drop what was taken
            del self._buf[:self._pos]
            self._pos = 0
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
        if length < 4 or <Py_ssize_t>length > max_length:
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
        self.trailing = 0
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
                self.trailing = 0
            elif t == b'd' or t == b'c' or t == b'f':
                pass    # COPY sub-protocol data, part of the request it follows (ignored outside COPY)
            elif t != b'H' or self.trailing:
                # a Flush with nothing before it changes nothing on the backend
                self.trailing += 1
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
