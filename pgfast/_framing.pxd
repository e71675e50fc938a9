# The interface of PostgreSQL wire framing on pgfast's hot path.
#
# Python code drives connections (negotiation, authentication, pooling); everything
# here runs per packet and allocates at most one bytes object per call, never one
# per message of a relayed stream.

cpdef enum:
    # ProcessStartupPacket's limits on the length word, which counts itself: PostgreSQL
    # subtracts 4 and refuses fewer than 4 bytes (no request code) or more than
    # MAX_STARTUP_PACKET_LENGTH (10000), so 8 .. 10004 in all; longer is refused before
    # it is read.
    STARTUP_MIN_LENGTH = 8
    STARTUP_MAX_LENGTH = 10004

    PROTOCOL_3_0 = 196608          # 3 << 16
    CANCEL_REQUEST_CODE = 80877102  # 1234 << 16 | 5678
    SSL_REQUEST_CODE = 80877103
    GSSENC_REQUEST_CODE = 80877104


cdef class ReadBuffer:
    """Bytes received but not yet framed; feed_data() in, take_*() out."""
    cdef bytearray _buf
    cdef Py_ssize_t _pos

    cpdef feed_data(self, bytes data)
    cpdef Py_ssize_t size(self)
    cpdef int first_byte(self)
    cdef const unsigned char *_head(self)
    cpdef take_startup(self)
    cpdef take_message(self, Py_ssize_t max_length)
    cpdef bytes take_all(self)


cdef class MessageScanner:
    """Follows message boundaries in a relayed stream without copying it.

    The relay hands every chunk through scan(); the scanner only reads headers, so
    the pool knows whether a backend is between messages and what the last
    ReadyForQuery said, at the cost of a few compares per message. A backend is
    idle (see Relay.backend_clean) only when every request the client sent (Query,
    Sync, FunctionCall) has had its ReadyForQuery back and nothing came after the last
    of them: a Parse/Bind/Execute without its Sync is work in flight, whatever the
    counts say.
    """
    cdef bint _from_client          # type bytes mean different things in each direction
    cdef Py_ssize_t _remaining      # payload bytes of the current message still to come
    cdef unsigned char _header[5]
    cdef int _header_len
    cdef readonly int last_type     # type byte of the last message whose header completed
    cdef readonly int tx_status     # 'I', 'T' or 'E' from the last ReadyForQuery, 0 before one
    cdef readonly long long requests  # client stream: Query, Sync and FunctionCall messages seen
    # client stream: messages since the last of those, other than COPY data (CopyData,
    # CopyDone, CopyFail) and a lone Flush: extended-protocol work no ReadyForQuery covers yet
    cdef readonly long long trailing
    cdef readonly long long readies   # backend stream: ReadyForQuery messages seen
    # client stream: Query/Parse messages whose SQL starts with DROP, ALTER or CREATE
    # DATABASE, which PostgreSQL refuses while other sessions (idle pooled backends
    # among them) use the database concerned
    cdef readonly long long database_ddl
    cdef bint _sniffing
    cdef unsigned char _sql_head[64]
    cdef int _sql_head_len

    cpdef Py_ssize_t scan(self, bytes data) except -2
    cdef void _on_header(self) noexcept
    cdef void _sniff(self, const unsigned char *p, Py_ssize_t n) noexcept
    cdef void _end_sniff(self) noexcept
