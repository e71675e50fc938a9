# The interface of pgfast's hot path: PostgreSQL wire framing and the TLS pump.
#
# Python code drives connections (negotiation, authentication, pooling); everything
# here runs per packet or per TLS record and allocates at most one bytes object per
# call, never one per record or per message.

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
    ReadyForQuery said, at the cost of a few compares per message. A session is
    idle when every request the client sent (Query, Sync, FunctionCall) has had its
    ReadyForQuery back.
    """
    cdef bint _from_client          # type bytes mean different things in each direction
    cdef Py_ssize_t _remaining      # payload bytes of the current message still to come
    cdef unsigned char _header[5]
    cdef int _header_len
    cdef readonly int last_type     # type byte of the last message whose header completed
    cdef readonly int tx_status     # 'I', 'T' or 'E' from the last ReadyForQuery, 0 before one
    cdef readonly long long requests  # client stream: Query, Sync and FunctionCall messages seen
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


# OpenSSL entry points, resolved once by pgfast._openssl from the library that
# pyOpenSSL (through cryptography) loaded, so the pump and pyOpenSSL always share one
# OpenSSL copy.
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


cdef enum PumpState:
    PUMP_OPEN = 0
    PUMP_PEER_CLOSED = 1    # close_notify received: nothing more will be decrypted
    PUMP_FAILED = 2         # a fatal TLS error: the connection must be dropped


cdef class TLSPump:
    """Ciphertext in, plaintext out and back, over one SSL* and its memory BIOs.

    The SSL* belongs to a pyOpenSSL Connection, whose context holds the callbacks
    (certificate verification, ALPN) and which answers questions about the session;
    the pump drives the handshake and the data phase by calling OpenSSL directly, so
    no Python object exists per record.
    """
    cdef void *_ssl
    cdef void *_into_ssl     # memory BIO: ciphertext received from the peer
    cdef void *_from_ssl     # memory BIO: ciphertext to send to the peer
    cdef object _owner       # the pyOpenSSL Connection that owns the pointers
    cdef char *_out          # pre-allocated output buffer, grown only for larger chunks
    cdef Py_ssize_t _out_size
    cdef PumpState _state

    cdef int _reserve(self, Py_ssize_t size) except -1
    cdef bytes _drain_ciphertext(self)
    cdef _raise_tls_error(self, int ret)
    cpdef bint handshake(self, bytes ciphertext) except -1
    cpdef bytes decrypt(self, bytes ciphertext)
    cpdef bytes encrypt(self, bytes plaintext)
    cpdef bytes close_notify(self)
