# The relay: bytes between one client and one backend once authentication is done.
#
# The transports' protocols are these Cython objects, so a chunk goes from the event
# loop through the TLS pump to the other socket without running Python code; the
# Python session object is called only when a side ends.

from pgfast._framing cimport MessageScanner
from pgfast._pump cimport TLSPump


cdef class Relay:
    cdef object _client_transport
    cdef object _backend_transport
    cdef object _client_write         # bound transport.write, looked up once
    cdef object _backend_write
    cdef TLSPump _pump                # None for a client without TLS
    cdef object _session              # told when a side ends: see client.ClientConnection
    cdef readonly MessageScanner client_stream
    cdef readonly MessageScanner backend_stream
    cdef readonly bint client_done    # Terminate or close_notify seen: nothing more to relay
    cdef readonly bint input_ended    # the client left with work in flight: the backend was told

    cpdef from_client(self, bytes data)
    cpdef forward_client(self, bytes data)
    cpdef bint client_eof(self)
    cdef _finish(self)
    cdef bint _answers_due(self)
    cpdef from_backend(self, bytes data)
    cpdef bint backend_clean(self)


cdef class ClientSide:
    cdef Relay _relay


cdef class BackendSide:
    cdef Relay _relay
