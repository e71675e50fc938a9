# cython: language_level=3, boundscheck=False, wraparound=False
"""The relay of transaction pooling (see _txrelay.pxd).

Every client message is framed here. Between transactions a client holds no backend:
its messages wait until the pool lends it one (session.need_backend()), and the backend
goes back (session.transaction_done()) at the ReadyForQuery that ends the transaction,
once every request sent to it has been answered. What makes that safe is the queue of
pending requests: each message sent to the backend that expects a response is pushed,
and each response is matched to the request at the head, as PostgreSQL answers them in
order (after an error, it skips to the next Sync, and so does the queue).

Protocol-level prepared statements are shared: a named Parse from any client is sent as
pgfast_<n>, one name per query text and parameter types, and a backend that lacks the
statement when a client Binds or Describes it gets the Parse first (its answer dropped,
ACT_SKIP). A Parse the backend already has, and a client's Close of a statement, are
answered here (ACT_FAKE) at the place the client expects the answer.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from pgfast._pump import TLSError
from pgfast.literals import dollar_quoted

cdef enum:
    ACT_FORWARD = 0
    ACT_SKIP = 1
    ACT_FAKE = 2
    ACT_SUBST = 3       # a request made to fail in its place: its error is replaced by pgfast's
    # client bytes waiting for a backend before pgfast stops reading from the client
    WAITING_LIMIT = 1 << 20
    # PostgreSQL's limits on a client message's length (SocketBackend, pq_getmessage)
    PQ_LARGE_MESSAGE_LIMIT = 0x3fffffff - 1
    PQ_SMALL_MESSAGE_LIMIT = 10000

# how the client's stream of messages ended (what is done once all before it is answered)
cdef enum:
    END_NONE = 0
    END_TERMINATE = 1   # Terminate: the client reads nothing more
    END_EOF = 2         # the end of its stream (EOF, TLS close_notify): it may still read
    END_SILENT = 3      # a message of an invalid length: PostgreSQL logs it and closes without a word
    END_FATAL = 4       # an unknown message type: PostgreSQL's FATAL
    # statements a backend keeps prepared; beyond, the least recently used is closed
    MAX_PREPARED = 256

PARSE_COMPLETE = b"1\0\0\0\x04"
# a request that fails without side effects (no statement is ever named so: pgfast's are
# pgfast_<digits>), standing in for one pgfast refuses with PostgreSQL's ERROR, so the
# backend skips to the next Sync and aborts the transaction exactly as PostgreSQL would
FAILING_DESCRIBE = b"D\0\0\0\x1eSpgfast_no_such_statement\0"
CLOSE_COMPLETE = b"3\0\0\0\x04"

# ParameterStatus names a client may change with SET and that pgfast carries from backend
# to backend (the client was told their values); changing any other setting pins the
# client to its backend.
TRACKED = ("application_name", "client_encoding", "DateStyle", "IntervalStyle", "TimeZone",
           "standard_conforming_strings", "default_transaction_read_only")
cdef frozenset _TRACKED_SET_NAMES = frozenset(
    [b"application_name", b"client_encoding", b"datestyle", b"intervalstyle", b"timezone", b"time",
     b"names", b"standard_conforming_strings", b"default_transaction_read_only"])


class ProtocolError(Exception):
    """A client message pgfast cannot relay in transaction pooling (PostgreSQL's SQLSTATE)."""

    def __init__(self, sqlstate, message):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


# --- the statements every client's names map to ---------------------------------------

cdef dict _server_names = {}     # Parse body (query text and parameter types) -> server-side name
cdef dict _bodies = {}           # server-side name -> Parse body
cdef dict _references = {}       # server-side name -> clients' names that refer to it
cdef unsigned long long _next_statement = 0


cdef bytes _statement_for(bytes body):
    global _next_statement
    name = _server_names.get(body)
    if name is None:
        _next_statement += 1
        name = f"pgfast_{_next_statement}".encode()
        _server_names[body] = name
        _bodies[name] = body
        _references[name] = 0
    _references[name] += 1
    return name


cdef _release_statement(bytes name):
    count = _references.get(name, 0) - 1
    if count > 0:
        _references[name] = count
        return
    # no client refers to it: a later Parse of the same text gets a new name, and
    # backends that still have this one close it as they evict
    _references.pop(name, None)
    body = _bodies.pop(name, None)
    if body is not None:
        _server_names.pop(body, None)


def statements_in_use():
    """(distinct statements, client references): for statistics and tests."""
    return len(_bodies), sum(_references.values())


# --- message helpers -----------------------------------------------------------------

cdef inline Py_ssize_t _max_length(unsigned char t) noexcept:
    """PostgreSQL's longest client message of type t; 0 for a type it does not know."""
    if t in b"QPBFdcf":
        return PQ_LARGE_MESSAGE_LIMIT
    if t in b"CDEHSX":
        return PQ_SMALL_MESSAGE_LIMIT
    return 0


cdef bytes _error(str sqlstate, str text):
    """An ErrorResponse of severity ERROR (the session goes on)."""
    fields = b"SERROR\0VERROR\0C" + sqlstate.encode() + b"\0M" + text.encode("utf-8", "replace") + b"\0\0"
    return _message(b'E', fields)


cdef inline uint32_t _be32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline bytes _message(char msg_type, bytes payload):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    out = PyBytes_FromStringAndSize(NULL, n + 5)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    p[0] = msg_type
    p[1] = ((n + 4) >> 24) & 0xff
    p[2] = ((n + 4) >> 16) & 0xff
    p[3] = ((n + 4) >> 8) & 0xff
    p[4] = (n + 4) & 0xff
    memcpy(p + 5, PyBytes_AS_STRING(payload), n)
    return out


cdef inline Py_ssize_t _cstring_end(bytes msg, Py_ssize_t start) except -2:
    """Index of the NUL ending the string at start (PostgreSQL: invalid string in message)."""
    cdef Py_ssize_t end = msg.find(b"\0", start)
    if end < 0:
        raise ProtocolError("08P01", "invalid string in message")
    return end


cdef inline void _extend(bytearray out, const char *p, Py_ssize_t n) except *:
    cdef Py_ssize_t size = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, size + n)
    memcpy(PyByteArray_AS_STRING(out) + size, p, n)


def query_message(str sql):
    return _message(b'Q', sql.encode() + b"\0")


def parse_message(bytes name, bytes body):
    return _message(b'P', name + b"\0" + body)


def close_statement_message(bytes name):
    return _message(b'C', b"S" + name + b"\0")


def ready_for_query(int status):
    return b"Z\0\0\0\x05" + bytes((status,))


def command_complete(bytes tag):
    return _message(b'C', tag + b"\0")


def parameter_status(bytes name, bytes value):
    return _message(b'S', name + b"\0" + value + b"\0")


# --- reading SQL just far enough ---------------------------------------------------

cdef inline bint _is_space(unsigned char c) noexcept:
    return c == b' ' or c == b'\t' or c == b'\n' or c == b'\r' or c == b'\f' or c == b'\v'


cdef inline bint _is_word(unsigned char c) noexcept:
    return (c | 0x20) >= b'a' and (c | 0x20) <= b'z' or c == b'_' or (c >= b'0' and c <= b'9') or c >= 0x80


cdef Py_ssize_t _skip_blank(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Past white space and comments."""
    while i < n:
        if _is_space(p[i]):
            i += 1
        elif p[i] == b'-' and i + 1 < n and p[i + 1] == b'-':
            while i < n and p[i] != b'\n':
                i += 1
        elif p[i] == b'/' and i + 1 < n and p[i + 1] == b'*':
            i += 2
            while i + 1 < n and not (p[i] == b'*' and p[i + 1] == b'/'):
                i += 1
            i += 2
        else:
            return i
    return n


cdef bytes _word(const unsigned char *p, Py_ssize_t *at, Py_ssize_t n):
    """The next word, lower case (b'' if none), and *at past it."""
    cdef Py_ssize_t i = _skip_blank(p, at[0], n)
    cdef Py_ssize_t start = i
    while i < n and _is_word(p[i]):
        i += 1
    at[0] = i
    return bytes(p[start:i]).lower()


cdef bint _statement_keeps_session_state(const unsigned char *p, Py_ssize_t n):
    """Whether one SQL statement leaves state in the session beyond the transaction and
    beyond what pgfast carries (see the README's list)."""
    cdef Py_ssize_t at = 0
    first = _word(p, &at, n)
    if first == b"set":
        second = _word(p, &at, n)
        if second in (b"local", b"transaction", b"constraints"):
            return False
        if second == b"session":
            second = _word(p, &at, n)    # SET SESSION name / SESSION AUTHORIZATION / CHARACTERISTICS
            if second in (b"authorization", b"characteristics"):
                return True
        return second not in _TRACKED_SET_NAMES
    if first in (b"listen", b"prepare", b"load"):
        return True
    if first == b"create":
        second = _word(p, &at, n)
        if second in (b"global", b"local"):
            second = _word(p, &at, n)
        return second in (b"temp", b"temporary")
    if first == b"declare":
        return b" hold" in bytes(p[:n]).lower().replace(b"\n", b" ").replace(b"\t", b" ")
    return False


cdef bint _is_database_ddl(bytes sql):
    """CREATE/ALTER/DROP DATABASE: it refuses while other sessions use the database (or
    the template), so idle pooled backends must leave."""
    cdef Py_ssize_t at = 0
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(sql)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(sql)
    if _word(p, &at, n) not in (b"drop", b"alter", b"create"):
        return False
    return _word(p, &at, n) == b"database"


cdef bint _keeps_session_state(bytes sql):
    """Any statement of sql (split at semicolons outside quotes) that keeps session
    state, or a session-level advisory lock anywhere in it."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(sql)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(sql)
    cdef Py_ssize_t start = 0, i = 0
    cdef unsigned char quote = 0
    lowered = sql.lower()
    if b"advisory_lock" in lowered and (b"pg_advisory_lock" in lowered or b"pg_try_advisory_lock" in lowered):
        return True
    while i <= n:
        if i == n or (quote == 0 and p[i] == b';'):
            if _statement_keeps_session_state(p + start, i - start):
                return True
            start = i + 1
        elif quote == 0 and (p[i] == b"'" or p[i] == b'"'):
            quote = p[i]
        elif quote != 0 and p[i] == quote:
            quote = 0
        i += 1
    return False


cdef object _local_command(bytes sql):
    """DEALLOCATE [PREPARE] name|ALL and DISCARD ALL, which pgfast answers itself:
    (tag, statement name or None for all), or None."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(sql)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(sql)
    cdef Py_ssize_t at = 0, i
    first = _word(p, &at, n)
    if first == b"discard":
        if _word(p, &at, n) != b"all":
            return None
        tag, name = b"DISCARD ALL", None
    elif first == b"deallocate":
        i = _skip_blank(p, at, n)
        if i < n and p[i] == b'"':
            end = sql.find(b'"', i + 1)
            if end < 0:
                return None
            name = sql[i + 1:end]
            at = end + 1
        else:
            name = _word(p, &at, n)
            if name == b"prepare":
                i = _skip_blank(p, at, n)
                if i < n and p[i] == b'"':
                    end = sql.find(b'"', i + 1)
                    if end < 0:
                        return None
                    name = sql[i + 1:end]
                    at = end + 1
                else:
                    name = _word(p, &at, n)
            if not name:
                return None
            if name == b"all":
                name = None
        tag = b"DEALLOCATE" if name is not None else b"DEALLOCATE ALL"
    else:
        return None
    i = _skip_blank(p, at, n)
    while i < n and (p[i] == b';' or _is_space(p[i])):
        i += 1
    return (tag, name) if i == n else None


# --- the relay -------------------------------------------------------------------------

cdef class TxRelay:

    def __cinit__(self, session, client_transport, TLSPump pump, dict params):
        self._session = session
        self._client_transport = client_transport
        self._client_write = client_transport.write
        self._pump = pump
        self._client_buf = bytearray()
        self._waiting = []
        self._waiting_bytes = 0
        self._backend = None
        self._server_buf = bytearray()
        self._out = bytearray()
        self._statements = {}
        self._parses = []
        self._local_replies = []
        self._substitutes = []
        self._unsynced = False
        self._ending = END_NONE
        self._ending_error = None
        self._backend_eof_sent = False
        self._params = dict(params)
        self._startup_params = dict(params)
        self._pending_cap = 64
        self._pending = <Pending *>malloc(self._pending_cap * sizeof(Pending))
        if self._pending is NULL:
            raise MemoryError()
        self._pending_head = 0
        self._pending_len = 0
        self._failed = False
        self.pinned = False
        self.tx_status = b'I'
        self.client_done = False
        self.client_messages = 0
        self.identity = None

    def __dealloc__(self):
        free(self._pending)

    def set_session(self, session):
        self._session = session

    def close(self):
        """The session is over: nothing more is relayed, and its statements are no one's."""
        self.client_done = True
        for server_name in self._statements.values():
            _release_statement(server_name)
        self._statements.clear()

    @property
    def has_backend(self):
        return self._backend is not None

    @property
    def pending(self):
        return self._pending_len

    @property
    def params(self):
        return self._params

    @property
    def at_boundary(self):
        """Between two messages of what the client has been sent."""
        return PyByteArray_GET_SIZE(self._server_buf) == 0

    @property
    def in_transaction(self):
        """The backend's transaction is not over: a transaction block, or extended-query
        messages sent since the last Sync (an implicit transaction the next Sync, anyone's,
        would commit)."""
        return self.tx_status != b'I' or self._unsynced

    def backend_clean(self):
        """The backend may serve another client: nothing asked of it is unanswered and its
        transaction is over (and it was never pinned with session state)."""
        return (self._backend is not None and self._pending_len == 0 and not self.in_transaction
                and not self._backend_eof_sent and PyByteArray_GET_SIZE(self._server_buf) == 0)

    # --- requests awaiting responses ----------------------------------------------------

    cdef int _push(self, unsigned char kind, unsigned char action) except -1:
        cdef Py_ssize_t i
        cdef Pending *grown
        if self._pending_len == self._pending_cap:
            grown = <Pending *>malloc(2 * self._pending_cap * sizeof(Pending))
            if grown is NULL:
                raise MemoryError()
            for i in range(self._pending_len):
                grown[i] = self._pending[(self._pending_head + i) % self._pending_cap]
            free(self._pending)
            self._pending = grown
            self._pending_head = 0
            self._pending_cap *= 2
        self._pending[(self._pending_head + self._pending_len) % self._pending_cap] = Pending(kind, action)
        self._pending_len += 1
        return 0

    cdef _complete_head(self, bint ok):
        """The request at the head has been answered (ok) or failed or been skipped."""
        cdef Pending head = self._pending[self._pending_head]
        self._pending_head = (self._pending_head + 1) % self._pending_cap
        self._pending_len -= 1
        if head.kind == b'P':
            client_name, server_name, added = self._parses.pop(0)
            if not ok:
                # PostgreSQL never prepared it: neither has the backend nor the client
                if added and self._backend_prepared is not None:
                    self._backend_prepared.pop(server_name, None)
                if client_name is not None and self._statements.get(client_name) == server_name:
                    del self._statements[client_name]
                    _release_statement(server_name)

    cdef _emit_fakes(self):
        """Answers pgfast gives itself, now that they are at the head."""
        cdef Pending head
        while self._pending_len and self._pending[self._pending_head].action == ACT_FAKE:
            head = self._pending[self._pending_head]
            if head.kind == b'P':
                self._out += PARSE_COMPLETE
            elif head.kind == b'C':
                self._out += CLOSE_COMPLETE
            elif head.kind == b'q':
                self._out += self._local_replies.pop(0)
                self._out += ready_for_query(self.tx_status)
            self._complete_head(True)

    # --- client to backend ----------------------------------------------------------------

    cpdef from_client(self, bytes data):
        if self._pump is not None:
            try:
                data = self._pump.decrypt(data)
            except TLSError as exc:
                self._session.client_failed(exc)
                return
            if self._pump._outgoing is not None:
                self._client_write(self._pump.take_outgoing())
        self.feed(data)
        if self._pump is not None and self._pump.peer_closed:
            self.client_eof()

    cpdef client_eof(self):
        """The client sends nothing more (EOF, TLS close_notify): as PostgreSQL, what it
        sent before is still answered."""
        if self._ending == END_NONE and not self.client_done:
            self._end_stream(END_EOF, None)
            self._check_ending()

    cpdef feed(self, bytes data):
        """Plaintext from the client, framed as PostgreSQL's SocketBackend frames it: the
        type first, then the length within that type's limit."""
        cdef Py_ssize_t size, pos = 0
        cdef uint32_t length
        cdef Py_ssize_t limit
        cdef unsigned char t
        cdef const unsigned char *p
        if self.client_done or self._ending != END_NONE:
            return
        self._client_buf += data
        size = PyByteArray_GET_SIZE(self._client_buf)
        p = <const unsigned char *>PyByteArray_AS_STRING(self._client_buf)
        out = []
        while size - pos >= 1 and self._ending == END_NONE and not self.client_done:
            t = p[pos]
            limit = _max_length(t)
            if limit == 0:
                self._end_stream(END_FATAL, ProtocolError("08P01", f"invalid frontend message type {t}"))
                break
            if size - pos < 5:
                break
            length = _be32(p + pos + 1)
            if length < 4 or length > limit:
                self._end_stream(END_SILENT, "invalid message length")
                break
            if size - pos < 1 + <Py_ssize_t>length:
                break
            pos += 1 + length
            self.client_messages += 1
            if t == b'X':
                self._end_stream(END_TERMINATE, None)
                break
            msg = PyBytes_FromStringAndSize(<const char *>p + pos - 1 - length, 1 + length)
            if self._backend is not None:
                out.append(self._translate(msg))
            else:
                self._client_message(msg)
        if self._ending != END_NONE:
            del self._client_buf[:]
        else:
            del self._client_buf[:pos]
        if out and self._backend is not None:
            self._backend_write(b"".join(out))
        self._check_ending()

    cdef _end_stream(self, int how, object why):
        """Nothing after this point of the client's stream is read (PostgreSQL never reads
        past it); what came before is answered first (_check_ending)."""
        self._ending = how
        self._ending_error = why
        self._client_transport.pause_reading()

    cdef _check_ending(self):
        """The end, once what the client sent before it has reached the backend and, unless
        the client reads nothing more (Terminate), been answered. Answers still due come
        as PostgreSQL would give them: the backend is told the stream ends there (EOF), so
        it answers everything it can and leaves (an open transaction rolled back, a COPY
        cut short failed); the end follows when it has gone (backend_closed)."""
        if self._ending == END_NONE or self.client_done:
            return
        if self._backend is None and self._waiting:
            return          # waiting for a backend to serve what came before
        if self._backend is not None and (self._pending_len or self._backend_eof_sent) and \
                self._ending != END_TERMINATE:
            # a backend told of the end leaves; it is never lent again
            if not self._backend_eof_sent:
                self._backend_eof_sent = True
                self._backend.end_input()
            return
        self._finish()

    cpdef backend_closed(self):
        if self._backend_eof_sent and not self.client_done:
            self._session.backend_ended()
            self._finish()
        else:
            self._session.backend_lost()

    cdef _finish(self):
        self.client_done = True
        if self._ending == END_TERMINATE or self._ending == END_EOF:
            self._session.client_finished()
        elif self._ending == END_SILENT:
            self._session.client_violated(self._ending_error)
        else:
            self._session.protocol_failed(self._ending_error)

    cdef _client_message(self, bytes msg):
        """A whole client message while no backend is lent to the client."""
        if not self._waiting and self._answer_locally(msg):
            return
        self._waiting.append(msg)
        self._waiting_bytes += PyBytes_GET_SIZE(msg)
        if len(self._waiting) == 1:
            self._session.need_backend()
        elif self._waiting_bytes > WAITING_LIMIT:
            self._client_transport.pause_reading()

    cdef bint _answer_locally(self, bytes msg) except -1:
        """A client Query pgfast answers without a backend, with nothing else pending."""
        reply = self._local_reply(msg)
        if reply is None:
            return False
        self._send_to_client(reply + ready_for_query(self.tx_status))
        return True

    cdef object _local_reply(self, bytes msg):
        """The answer (less its ReadyForQuery) to a Query pgfast answers itself, having
        done what it asks: DEALLOCATE and DISCARD ALL act on the statements and settings
        pgfast keeps for the client, not on whatever backend serves it. None: for a
        backend (a pinned session's, a name pgfast does not know, DISCARD ALL inside a
        transaction block, where PostgreSQL's own error is the answer)."""
        if msg[0] != b'Q' or self.pinned:
            return None
        command = _local_command(msg[5:len(msg) - 1])
        if command is None:
            return None
        tag, name = command
        if tag == b"DISCARD ALL":
            if self.tx_status != b'I':
                return None
            self._drop_statements(None)
            reply = [parameter_status(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                     for k, v in self._startup_params.items() if self._params.get(k) != v]
            self._params = dict(self._startup_params)
            # the backend (if any) keeps what it was set to; attach() sets it again when needed
            return b"".join(reply) + command_complete(tag)
        if not self._drop_statements(name):
            return None
        return command_complete(tag)

    cdef bint _drop_statements(self, bytes name):
        """DEALLOCATE name (False if pgfast does not know it), or every statement (None)."""
        if name is None:
            for server_name in self._statements.values():
                _release_statement(server_name)
            self._statements.clear()
            return True
        server_name = self._statements.pop(name, None)
        if server_name is None:
            return False
        _release_statement(server_name)
        return True

    cdef bytes _translate(self, bytes msg):
        """What to send to the backend for one client message, pushing what it expects
        back. A message pgfast refuses gets PostgreSQL's ERROR at its place, and the backend
        fails there too (FAILING_DESCRIBE): it skips to the next Sync and aborts the
        transaction as PostgreSQL would."""
        cdef unsigned char t = msg[0]
        try:
            out = self._translate_message(msg)
        except ProtocolError as exc:
            self._substitutes.append(_error(exc.sqlstate, exc.message))
            self._push(b'D', ACT_SUBST)
            self._unsynced = True
            return FAILING_DESCRIBE
        if out:
            self._unsynced = not (t == b'S' or t == b'Q' or t == b'F')
        return out

    cdef bytes _translate_message(self, bytes msg):
        cdef unsigned char t = msg[0]
        cdef Py_ssize_t end, name_end
        cdef bytes name, server_name, before
        if t == b'B':
            portal_end = _cstring_end(msg, 5)
            name_end = _cstring_end(msg, portal_end + 1)
            name = msg[portal_end + 1:name_end]
            if not name:
                self._push(b'B', ACT_FORWARD)
                return msg
            before = self._ensure_prepared(name)     # its Parse goes, and is answered, first
            self._push(b'B', ACT_FORWARD)
            if before is None:
                return msg           # a name the client never prepared: PostgreSQL's own error
            return before + self._rewrite_name(msg, portal_end + 1, self._statements[name])
        if t == b'E':
            self._push(b'E', ACT_FORWARD)
            return msg
        if t == b'S':
            self._push(b'S', ACT_FORWARD)
            return msg
        if t == b'P':
            name_end = _cstring_end(msg, 5)
            name = msg[5:name_end]
            body = msg[name_end + 1:]
            sql = body[:_cstring_end(body, 0)]
            if not self.pinned and _keeps_session_state(sql):
                self.pinned = True
            if _is_database_ddl(sql):
                self._session.database_ddl_sent()
            if not name:
                self._parses.append((None, None, False))
                self._push(b'P', ACT_FORWARD)
                return msg
            if name in self._statements:
                raise ProtocolError("42P05", f'prepared statement "{name.decode("utf-8", "replace")}" already exists')
            server_name = _statement_for(body)
            self._statements[name] = server_name
            if server_name in self._backend_prepared:
                self._parses.append((name, server_name, False))
                self._push(b'P', ACT_FAKE)
                self._emit_fakes()
                self._flush_out()
                return b""
            before = self._make_room()
            self._backend_prepared[server_name] = None
            self._parses.append((name, server_name, True))
            self._push(b'P', ACT_FORWARD)
            return before + parse_message(server_name, body)
        if t == b'D' or t == b'C':
            if len(msg) < 7:
                raise ProtocolError("08P01", "no data left in message")
            if msg[5] not in b"SP":
                raise ProtocolError("08P01", f"invalid {'DESCRIBE' if t == b'D' else 'CLOSE'} message subtype "
                                             f"{msg[5]}")
            name_end = _cstring_end(msg, 6)
            name = msg[6:name_end]
            if msg[5] == ord("P") or not name:
                self._push(t, ACT_FORWARD)
                return msg
            if t == b'C':
                server_name = self._statements.pop(name, None)
                if server_name is not None:
                    _release_statement(server_name)
                self._push(b'C', ACT_FAKE)      # PostgreSQL closes a missing name quietly too
                self._emit_fakes()
                self._flush_out()
                return b""
            before = self._ensure_prepared(name)
            self._push(b'D', ACT_FORWARD)
            if before is None:
                return msg
            return before + self._rewrite_name(msg, 6, self._statements[name])
        if t == b'Q':
            reply = self._local_reply(msg)
            if reply is not None:
                self._local_replies.append(reply)
                self._push(b'q', ACT_FAKE)
                self._emit_fakes()
                self._flush_out()
                return b""
            sql = msg[5:len(msg) - 1]
            if not self.pinned and _keeps_session_state(sql):
                self.pinned = True
            if _is_database_ddl(sql):
                self._session.database_ddl_sent()
            self._push(b'Q', ACT_FORWARD)
            return msg
        if t == b'F':
            self._push(b'F', ACT_FORWARD)
            return msg
        # Flush, CopyData, CopyDone, CopyFail: no response of their own
        return msg

    cdef _flush_out(self):
        if PyByteArray_GET_SIZE(self._out):
            data = bytes(self._out)
            del self._out[:]
            self._send_to_client(data)

    cdef object _ensure_prepared(self, bytes client_name):
        """A Parse to send first if the backend lacks the statement the client names; None
        for a name the client has not prepared, which goes to the backend as it is, so the
        client gets PostgreSQL's own error (and its transaction PostgreSQL's treatment)."""
        server_name = self._statements.get(client_name)
        if server_name is None:
            if client_name.startswith(b"pgfast_"):
                # it could name another client's statement on this backend
                raise ProtocolError("26000", f'prepared statement "{client_name.decode("utf-8", "replace")}" '
                                             "does not exist")
            return None
        if server_name in self._backend_prepared:
            # most recently used last: the oldest is the first to be closed
            del self._backend_prepared[server_name]
            self._backend_prepared[server_name] = None
            return b""
        before = self._make_room()
        self._backend_prepared[server_name] = None
        self._parses.append((None, server_name, True))
        self._push(b'P', ACT_SKIP)
        return before + parse_message(server_name, _bodies[server_name])

    cdef bytes _make_room(self):
        """Close the oldest statements while the backend has too many prepared."""
        out = []
        while len(self._backend_prepared) >= MAX_PREPARED:
            oldest = next(iter(self._backend_prepared))
            del self._backend_prepared[oldest]
            self._push(b'K', ACT_SKIP)
            out.append(close_statement_message(oldest))
        return b"".join(out)

    cdef bytes _rewrite_name(self, bytes msg, Py_ssize_t name_at, bytes server_name):
        """msg with the NUL-terminated name at name_at replaced by server_name."""
        name_end = _cstring_end(msg, name_at)
        return _message(msg[0], msg[5:name_at] + server_name + msg[name_end:])

    # --- backend to client -------------------------------------------------------------

    cpdef from_backend(self, bytes data):
        cdef Py_ssize_t size, pos = 0
        cdef uint32_t length
        cdef const unsigned char *p
        self._server_buf += data
        size = PyByteArray_GET_SIZE(self._server_buf)
        p = <const unsigned char *>PyByteArray_AS_STRING(self._server_buf)
        while size - pos >= 5:
            length = _be32(p + pos + 1)
            if length < 4:
                self._session.backend_failed(ProtocolError("08P01", "invalid message length"))
                return
            if size - pos < 1 + <Py_ssize_t>length:
                break
            self._server_message(p + pos, 1 + length)
            pos += 1 + length
        if pos == size:
            del self._server_buf[:]
        else:
            del self._server_buf[:pos]
        self._flush_out()
        if self._backend is not None and self._pending_len == 0 and not self._backend_eof_sent:
            if not self.in_transaction and not self.pinned and PyByteArray_GET_SIZE(self._server_buf) == 0:
                self._session.transaction_done()
            elif self.in_transaction:
                self._session.idle_in_transaction()
        self._check_ending()

    cdef _server_message(self, const unsigned char *p, Py_ssize_t n):
        cdef unsigned char t = p[0]
        cdef unsigned char kind
        cdef unsigned char action
        cdef bint forward
        if t == b'S':
            name, value, _ = bytes(p[5:n]).split(b"\0", 2)
            self._backend_params[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
            if self._pending_len and self._pending[self._pending_head].action == ACT_SKIP:
                return          # a setting pgfast restored: the client knows it already
            self._params[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
            _extend(self._out, <const char *>p, n)
            return
        if t == b'N' or t == b'A' or self._pending_len == 0:
            # notices and notifications belong to no request; anything else unasked is
            # PostgreSQL ending the session, which the client must see
            _extend(self._out, <const char *>p, n)
            return
        kind = self._pending[self._pending_head].kind
        action = self._pending[self._pending_head].action
        forward = action == ACT_FORWARD or (t == b'E' and kind == b'P')
        if action == ACT_SUBST and t == b'E':
            self._out += self._substitutes.pop(0)
        elif forward:
            _extend(self._out, <const char *>p, n)
        if t == b'Z':
            self.tx_status = p[5]
            self._failed = False
            # the request a ReadyForQuery ends: skip past what an error made PostgreSQL skip
            while self._pending_len and self._pending[self._pending_head].kind not in b"SQFq":
                self._complete_head(False)
            if self._pending_len:
                self._complete_head(True)
        elif t == b'E':
            if kind in b"QFS":
                return              # inside a request that ends at ReadyForQuery
            self._complete_head(False)
            # PostgreSQL now skips every message up to the next Sync
            while self._pending_len and self._pending[self._pending_head].kind != b'S':
                self._complete_head(False)
            self._failed = True
        elif (t == b'1' and kind == b'P') or (t == b'2' and kind == b'B') or \
                (t == b'3' and (kind == b'C' or kind == b'K')) or \
                ((t == b'T' or t == b'n') and kind == b'D') or \
                ((t == b'C' or t == b'I' or t == b's') and kind == b'E'):
            self._complete_head(True)
        self._emit_fakes()

    cdef _send_to_client(self, bytes data):
        if self._pump is not None:
            try:
                data = self._pump.encrypt(data)
            except TLSError as exc:
                self._session.client_failed(exc)
                return
        self._client_write(data)

    # --- lending and returning backends -------------------------------------------------

    cpdef attach(self, backend):
        """The pool lends this backend for the client's next transaction."""
        self._backend = backend
        self._backend_write = backend.transport.write
        self._backend_prepared = backend.prepared
        self._backend_params = backend.parameters
        backend.serve(BackendSide(self))
        out = []
        settings = [f"SET {name} TO {dollar_quoted(self._params[name])}"
                    for name in TRACKED if name in self._params and self._backend_params.get(name) != self._params[name]]
        if settings:
            self._push(b'Q', ACT_SKIP)
            out.append(query_message("; ".join(settings)))
        if self.identity is not None and backend.identity != self.identity:
            # re-asserted whenever the backend last served another client (or was reset); a
            # message of its own, so the tracked settings never depend on it
            self._push(b'Q', ACT_SKIP)
            out.append(query_message(self.identity))
            backend.identity = self.identity
        waiting, self._waiting = self._waiting, []
        paused = self._waiting_bytes > WAITING_LIMIT
        self._waiting_bytes = 0
        for msg in waiting:
            out.append(self._translate(msg))
        if out:
            self._backend_write(b"".join(out))
        if paused and self._ending == END_NONE:
            self._client_transport.resume_reading()
        self._check_ending()

    cpdef detach(self):
        """Hand the backend back (the session gives it to the pool)."""
        backend, self._backend = self._backend, None
        self._backend_write = None
        self._backend_prepared = None
        self._backend_params = None
        self._pending_head = 0
        self._pending_len = 0
        self._unsynced = False
        del self._parses[:]
        del self._substitutes[:]
        return backend

    def client_protocol(self):
        return ClientSide(self)


cdef class ClientSide:
    """asyncio protocol of the client transport under transaction pooling."""
    cdef TxRelay _relay

    def __cinit__(self, TxRelay relay):
        self._relay = relay

    def data_received(self, bytes data):
        self._relay.from_client(data)

    def eof_received(self):
        self._relay.client_eof()
        return True         # a half-closed client still reads the answers to what it sent

    def connection_lost(self, exc):
        self._relay._session.client_lost()

    def pause_writing(self):
        self._relay._session.pause_backend()

    def resume_writing(self):
        self._relay._session.resume_backend()


cdef class BackendSide:
    """asyncio protocol of a backend transport while it is lent to this client."""
    cdef TxRelay _relay

    def __cinit__(self, TxRelay relay):
        self._relay = relay

    def data_received(self, bytes data):
        self._relay.from_backend(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self._relay.backend_closed()

    def pause_writing(self):
        self._relay._client_transport.pause_reading()

    def resume_writing(self):
        self._relay._client_transport.resume_reading()


def keeps_session_state(bytes sql):
    """Whether sql pins a client to its backend (for tests and the README's list)."""
    return _keeps_session_state(sql)


def local_command(bytes sql):
    """(tag, name) of a DEALLOCATE/DISCARD ALL pgfast answers itself, or None."""
    return _local_command(sql)
