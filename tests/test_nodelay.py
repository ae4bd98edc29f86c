"""The node's own sockets send each PDU at once (TCP_NODELAY), not after Nagle's delay."""

import socket
import time

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from node.config import NodeSettings
from node.scp import StorageSCP, set_tcp_nodelay
from pipeline.state.db import open_database
from tests.support.nodeproc import free_port


def nodelay(assoc) -> int:
    return assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_accepted_and_requested_sockets_have_tcp_nodelay(tmp_path):
    settings = NodeSettings(host="127.0.0.1", port=free_port())
    scp = StorageSCP(settings, open_database(f"sqlite:///{tmp_path}/n.sqlite"), tmp_path)
    scp.start()
    try:
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(Verification)
        # The same handler node.scu binds for the node's outgoing associations.
        assoc = ae.associate(
            "127.0.0.1",
            scp.port,
            ae_title="SYNTH",
            evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
        )
        assert assoc.is_established
        deadline = time.monotonic() + 5
        while not scp._ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)
        (accepted,) = scp._ae.active_associations
        assert nodelay(accepted) != 0
        assert nodelay(assoc) != 0
        assoc.release()
    finally:
        scp.stop()
