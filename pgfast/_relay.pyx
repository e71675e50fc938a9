# cython: language_level=3
"""The relay between a client and a backend (see _relay.pxd)."""

from pgfast._framing import ProtocolViolation
from pgfast._pump import TLSError

cdef bytes _TERMINATE = b"X\x00\x00\x00\x04"


cdef class Relay:

    def __cinit__(self, session, client_transport, backend_transport, TLSPump pump=None):
        self._session = session
        self._client_transport = client_transport
        self._backend_transport = backend_transport
        self._client_write = client_transport.write
        self._backend_write = backend_transport.write
        self._pump = pump
        self.client_stream = MessageScanner(True)
        self.backend_stream = MessageScanner(False)
        # the backend is handed over idle (its start-up or reset ended in ReadyForQuery 'I'),
        # so a client that leaves without a query leaves it idle too
        self.backend_stream.tx_status = b'I'

    cpdef from_client(self, bytes data):
        if self._pump is not None:
            try:
                data = self._pump.decrypt(data)
            except TLSError as exc:
                self._session.client_failed(exc)
                return
            if self._pump._outgoing is not None:
                self._client_write(self._pump.take_outgoing())
        if data:
            self.forward_client(data)
        if self._pump is not None and self._pump.peer_closed:
            self.client_eof()

    cpdef forward_client(self, bytes data):
        """Plaintext from the client to the backend, less any Terminate."""
        cdef Py_ssize_t cut
        cdef long long ddl = self.client_stream.database_ddl
        if self.client_done:
            return
        try:
            cut = self.client_stream.scan(data)
        except ProtocolViolation as exc:
            self._session.client_failed(exc)
            return
        if cut < 0:
            self._backend_write(data)
        elif cut:
            self._backend_write(data[:cut])
        if self.client_stream.database_ddl != ddl:
            self._session.database_ddl_sent()
        if cut < 0:
            return
        if self._answers_due():
            # as from PostgreSQL, the client gets its answers, then the backend (which
            # will not be kept) ends the session
            self._backend_write(_TERMINATE)
            self.client_done = self.input_ended = True
        else:
            # a pooled backend outlives the client: its Terminate stays here
            self._finish()

    cpdef bint client_eof(self):
        """The client half-closed (or sent close_notify): as PostgreSQL, the backend answers
        what it was sent, which the client may still read, and then the session ends (the
        backend, told of the end, is not kept). True: keep the transport open."""
        if self.client_done or self.input_ended:
            return False
        if not self._answers_due():
            self._finish()
            return False
        self.client_done = self.input_ended = True
        self._session.client_input_ended()
        return True

    cdef inline bint _answers_due(self):
        """Requests sent that PostgreSQL has not finished answering. (Without any, ending
        at once is what PostgreSQL's answer would be: a transaction left open is rolled
        back either way.)"""
        return self.client_stream.requests != self.backend_stream.readies

    cdef _finish(self):
        self.client_done = True
        self._session.client_finished()

    cpdef from_backend(self, bytes data):
        try:
            self.backend_stream.scan(data)
        except ProtocolViolation as exc:
            self._session.backend_failed(exc)
            return
        if self._pump is not None:
            try:
                data = self._pump.encrypt(data)
            except TLSError as exc:
                self._session.client_failed(exc)
                return
        self._client_write(data)

    cpdef bint backend_clean(self):
        """Provably idle, so it may serve another client after a reset (PgBouncer's rule):
        every message the client sent is covered by a request that has had its
        ReadyForQuery, the last of which said idle (no transaction open), and neither
        stream stops inside a message. Anything else is work in flight, and a backend
        with work in flight is closed, never reused."""
        return (not self.input_ended and self.client_stream.trailing == 0
                and self.client_stream.requests == self.backend_stream.readies
                and self.backend_stream.tx_status == b'I'
                and self.client_stream.at_boundary and self.backend_stream.at_boundary)

    @property
    def at_boundary(self):
        """Between two messages of what the client has been sent."""
        return self.backend_stream.at_boundary

    def client_protocol(self):
        return ClientSide(self)

    def backend_protocol(self):
        return BackendSide(self)


cdef class ClientSide:
    """asyncio protocol of the client transport while relaying."""

    def __cinit__(self, Relay relay):
        self._relay = relay

    def data_received(self, bytes data):
        self._relay.from_client(data)

    def eof_received(self):
        return self._relay.client_eof()

    def connection_lost(self, exc):
        self._relay._session.client_lost()

    def pause_writing(self):
        self._relay._backend_transport.pause_reading()

    def resume_writing(self):
        self._relay._backend_transport.resume_reading()


cdef class BackendSide:
    """asyncio protocol of the backend transport while relaying."""

    def __cinit__(self, Relay relay):
        self._relay = relay

    def data_received(self, bytes data):
        self._relay.from_backend(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self._relay._session.backend_lost()

    def pause_writing(self):
        self._relay._client_transport.pause_reading()

    def resume_writing(self):
        self._relay._client_transport.resume_reading()
