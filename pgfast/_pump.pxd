# The interface of the TLS pump: ciphertext in, plaintext out and back, over the SSL*
# and memory BIOs of one pyOpenSSL Connection.
#
# A pump is made only from a pyOpenSSL Connection (TLSPump.new, or pump_for() from
# Python), never from raw addresses, and the OpenSSL functions it calls are resolved
# once, when this module is imported, from the library cryptography ships: nothing
# outside this module can point it at other memory or other code.

cdef enum PumpState:
    PUMP_OPEN = 0
    PUMP_PEER_CLOSED = 1    # close_notify received: nothing more will be decrypted
    PUMP_FAILED = 2         # a fatal TLS error: the connection must be dropped


cdef class TLSPump:
    """Drives the handshake and the data phase by calling OpenSSL directly, so no
    Python object exists per record; the pyOpenSSL Connection (kept alive here)
    holds the context's callbacks and answers questions about the session."""
    cdef void *_ssl
    cdef void *_into_ssl     # memory BIO: ciphertext received from the peer
    cdef void *_from_ssl     # memory BIO: ciphertext to send to the peer
    cdef object _owner       # the pyOpenSSL Connection that owns the pointers
    cdef PumpState _state
    cdef bytes _outgoing     # records made while decrypting, not yet taken

    @staticmethod
    cdef TLSPump new(object connection)

    cdef int _feed(self, const char *data, Py_ssize_t size) except -1
    cdef Py_ssize_t _read_plaintext(self, Py_ssize_t filled) except -1
    cdef Py_ssize_t _drain_into(self, Py_ssize_t filled) except -1
    cdef _raise_tls_error(self, int ret)
    cpdef bint handshake(self, bytes ciphertext) except -1
    cpdef bytes decrypt(self, bytes ciphertext)
    cpdef bytes encrypt(self, bytes plaintext)
    cpdef bytes close_notify(self)
    cpdef bytes pending_ciphertext(self)
    cpdef bytes take_outgoing(self)
