# cython: language_level=3
"""TLS to an upstream PostgreSQL, as an asyncio transport (see _tlsstream.pxd)."""

from pgfast._pump import TLSError


cdef class TLSTransport:

    def __cinit__(self, raw, TLSPump pump, protocol):
        self._raw = raw
        self._raw_write = raw.write
        self._pump = pump
        self._closing = False
        self.set_protocol(protocol)
        raw.set_protocol(_Wire(self))

    # --- what the backend's protocol (BackendConnection, a relay) calls ------------------

    def write(self, bytes data):
        if self._closing:
            return
        try:
            self._raw_write(self._pump.encrypt(data))
        except TLSError as exc:
            self._fail(exc)

    def writelines(self, chunks):
        self.write(b"".join(chunks))

    def write_eof(self):
        """close_notify: PostgreSQL reads it as the end of its client's input and answers
        what it was sent before it (TLS 1.3 lets the other direction go on)."""
        if not self._closing:
            self._raw_write(self._pump.close_notify())

    def can_write_eof(self):
        return True

    def set_protocol(self, protocol):
        self._protocol = protocol
        self._data_received = protocol.data_received

    def get_protocol(self):
        return self._protocol

    def pause_reading(self):
        self._raw.pause_reading()

    def resume_reading(self):
        self._raw.resume_reading()

    def is_reading(self):
        return self._raw.is_reading()

    def is_closing(self):
        return self._closing or self._raw.is_closing()

    def get_write_buffer_size(self):
        return self._raw.get_write_buffer_size()

    def get_extra_info(self, name, default=None):
        return self._raw.get_extra_info(name, default)

    def close(self):
        if self._closing:
            return
        self._closing = True
        self._raw_write(self._pump.close_notify())
        self._raw.close()

    def abort(self):
        self._closing = True
        self._raw.abort()

    cdef _fail(self, exc):
        self._failure = exc
        self.abort()

    # --- what the TCP transport's protocol (_Wire) passes on -----------------------------

    cdef _received(self, bytes ciphertext):
        cdef bytes plaintext
        try:
            plaintext = self._pump.decrypt(ciphertext)
        except TLSError as exc:
            self._fail(exc)
            return
        if self._pump._outgoing is not None:
            self._raw_write(self._pump.take_outgoing())
        if plaintext:
            self._data_received(plaintext)
        if self._pump.peer_closed:
            # PostgreSQL sends close_notify only as it ends the session: nothing follows
            self.abort()


cdef class _Wire:
    """The TCP transport's protocol: ciphertext in, plaintext to the backend's protocol."""
    cdef TLSTransport _tls

    def __cinit__(self, TLSTransport tls):
        self._tls = tls

    def data_received(self, bytes data):
        self._tls._received(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self._tls._closing = True
        self._tls._protocol.connection_lost(exc if exc is not None else self._tls._failure)

    def pause_writing(self):
        self._tls._protocol.pause_writing()

    def resume_writing(self):
        self._tls._protocol.resume_writing()
