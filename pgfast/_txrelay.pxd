# The relay of transaction pooling: a client's messages, framed one by one, go to whatever
# backend the pool lends it for one transaction.
#
# Unlike the session relay, which passes bytes through, this one understands the
# messages it relays: it names each client's protocol-level prepared statements after
# what they are (one server-side name per query text and parameter types) so any backend
# can serve them, prepares them again on a backend that lacks them, answers what a
# backend must not see, and follows every response back to the request it answers, so a
# backend is returned to the pool exactly when all it was asked has been answered and
# its transaction is over.

from pgfast._pump cimport TLSPump


cdef struct Pending:
    # one request sent to the backend (or answered here) that expects a response
    unsigned char kind       # the client message type: P B D C E S Q F, or K (a Close sent here)
    unsigned char action     # ACT_FORWARD, ACT_SKIP (an injected request), ACT_FAKE (answered here)


cdef class TxRelay:
    cdef object _session              # client.ClientConnection: told about backends and endings
    cdef object _client_transport
    cdef object _client_write
    cdef TLSPump _pump
    cdef bytearray _client_buf        # client bytes not yet a whole message
    cdef list _waiting                # whole client messages waiting for a backend
    cdef Py_ssize_t _waiting_bytes
    cdef object _backend              # backend.BackendConnection, or None between transactions
    cdef object _backend_write
    cdef dict _backend_prepared       # server-side statement names prepared on that backend, oldest use first
    cdef dict _backend_params         # its ParameterStatus values
    cdef bytearray _server_buf        # backend bytes not yet a whole message
    cdef bytearray _out               # what goes to the client from this backend chunk

    cdef dict _statements             # client's statement name -> server-side name
    cdef list _parses                 # per pending Parse, in order: (client name or None, server name, added)
    cdef list _local_replies          # answers pgfast gives itself, in order, until their turn
    cdef list _substitutes            # ERRORs standing in for the backend's, per ACT_SUBST, in order
    cdef bint _unsynced               # extended-query messages sent since the last Sync/Query
    cdef int _ending                  # END_*: how the client's stream ended
    cdef object _ending_error
    cdef bint _backend_eof_sent       # the backend was told the client's stream ended
    cdef dict _params                 # ParameterStatus values the client has been told
    cdef dict _startup_params         # ... and those it started with (what DISCARD ALL goes back to)

    cdef Pending *_pending            # ring buffer of requests awaiting their response
    cdef Py_ssize_t _pending_cap
    cdef Py_ssize_t _pending_head
    cdef Py_ssize_t _pending_len
    cdef bint _failed                 # an error: the backend skips to the next Sync

    cdef readonly bint pinned         # session state was created: the backend stays with the client
    cdef readonly int tx_status       # of the last ReadyForQuery the client was sent
    cdef readonly bint client_done
    cdef readonly long long client_messages   # framed so far: tells one idle moment from the next
    cdef public str identity          # SQL giving a backend the client's identity (identity.py), or None

    cdef int _push(self, unsigned char kind, unsigned char action) except -1
    cdef _client_message(self, bytes msg)
    cdef bytes _translate(self, bytes msg)
    cdef bytes _translate_message(self, bytes msg)
    cdef _end_stream(self, int how, object why)
    cdef _check_ending(self)
    cdef _finish(self)
    cdef object _ensure_prepared(self, bytes client_name)
    cdef bytes _rewrite_name(self, bytes msg, Py_ssize_t name_at, bytes server_name)
    cdef bint _answer_locally(self, bytes msg) except -1
    cdef object _local_reply(self, bytes msg)
    cdef bint _drop_statements(self, bytes name)
    cdef bytes _make_room(self)
    cdef _flush_out(self)
    cdef _server_message(self, const unsigned char *p, Py_ssize_t n)
    cdef _complete_head(self, bint skipped)
    cdef _emit_fakes(self)
    cdef _send_to_client(self, bytes data)

    cpdef from_client(self, bytes data)
    cpdef feed(self, bytes data)
    cpdef client_eof(self)
    cpdef backend_closed(self)
    cpdef from_backend(self, bytes data)
    cpdef attach(self, backend)
    cpdef detach(self)
