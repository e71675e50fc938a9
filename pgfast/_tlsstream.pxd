# TLS between pgfast and an upstream PostgreSQL, under the backend's protocol.
#
# A backend over TLS is handed to BackendConnection and to the relays as this transport:
# they write plaintext and receive plaintext as from a Unix socket, and the records go
# through the same Cython pump (pgfast._pump) as the clients' do, without Python code
# per record.

from pgfast._pump cimport TLSPump


cdef class TLSTransport:
    cdef object _raw                  # the TCP transport
    cdef object _raw_write
    cdef TLSPump _pump
    cdef object _protocol             # the backend's protocol of the moment
    cdef object _data_received        # its bound data_received, looked up once per protocol
    cdef bint _closing
    cdef object _failure              # the TLSError that ended it, for connection_lost

    cdef _fail(self, exc)
    cdef _received(self, bytes ciphertext)
