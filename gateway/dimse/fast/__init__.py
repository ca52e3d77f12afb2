"""The "fast" DIMSE engine: the upper layer and DIMSE messages written for the gateway's data path.

One blocking socket per association, PDUs read with ``recv_into`` into a reusable buffer, PDVs
parsed with ``struct``, no thread per association and no data set decoding on the C-GET path
(docs/architecture.md, "DIMSE edge"). Modules:

pdu.py          PS3.8 upper layer PDUs (both roles) and the socket reader
commands.py     DIMSE command sets (PS3.7 §9.3, group 0000) and identifier encoding
association.py  requesting an association (TCP, DICOM TLS, A-ASSOCIATE, release/abort, failures) and
                the DIMSE messages over it (sending, reassembling fragments, timeouts)
operations.py   C-ECHO, C-FIND, C-GET, C-MOVE with the semantics of the pynetdicom engine
store.py        C-STORE SCU (STOW-RS to nodes with engine: fast)
acceptor.py     the storage SCP where C-MOVE sub-operations arrive (``gateway.scp_engine: fast``)
scp_negotiation.py  its answer to an A-ASSOCIATE-RQ (AE titles, contexts), pure
scp_association.py  one accepted association: C-ECHO, C-STORE into the arrival router, release/abort
"""
