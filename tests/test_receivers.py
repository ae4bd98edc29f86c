"""Several receiver processes on one port: concurrent associations spread over them,
every instance stored once, whichever process took its association; a dead receiver is
replaced; none outlives its node."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from collections import Counter

from tests.support.nodeproc import NodeProcess, alive, free_port, run_dicomnode, write_config
from tests.support.senders import DCMTK_ENV, ECHOSCU, STORESCU

STUDY = "brats-met-00110"  # two series, 310 instances


def receiver_pids(node: NodeProcess) -> dict[int, int]:
    """Receiver number -> pid of its latest start, from the node's log."""
    return {
        int(n): int(pid)
        for n, pid in re.findall(r"receiver (\d+) started \(pid (\d+)\)", node.log())
    }


def wait_until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def echo(port: int) -> int:
    return subprocess.run(
        [ECHOSCU, "-aec", "SYNTH", "127.0.0.1", str(port)], env=DCMTK_ENV, capture_output=True
    ).returncode


def test_three_receivers_share_the_port_and_store_each_instance_once(tmp_path, mr_brain):
    port = free_port()
    config = write_config(tmp_path, port, receivers=3)
    node = NodeProcess(config, port).start()
    try:
        node.wait_until_receiving(3)
        files = sorted((mr_brain / STUDY).rglob("*.dcm"))
        senders = [
            subprocess.Popen(
                [STORESCU, "-aec", "SYNTH", "-nh", "127.0.0.1", str(port), *map(str, files[i::4])],
                env=DCMTK_ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(4)
        ]
        assert [sender.wait(300) for sender in senders] == [0] * 4
        assert all(echo(port) == 0 for _ in range(8))

        status = node.status()
        assert sum(s["instances"] for s in status["series"]) == len(files)
        assert len(list((tmp_path / "spool").rglob("*.dcm"))) == len(files)
        # The four senders came at once: spread by load, no receiver took three of them
        # (as SO_REUSEPORT's hash of the peer address did) and more than one took some.
        takers = re.findall(r"(receiver-\d )?node.scp: association from STORESCU \(\S+\) accepted$",
                            node.log(), re.MULTILINE)  # fmt: skip
        spread = Counter(taker or "serve" for taker in takers)
        assert sum(spread.values()) == 4 and max(spread.values()) <= 2, spread
        # /metrics counts the C-STOREs of every receiver, not only those `serve` took.
        with urllib.request.urlopen(f"{node.http_url}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert f'dicomnode_instances_total{{status="success"}} {float(len(files))}' in metrics

        # A receiver that dies is replaced, and the port keeps answering meanwhile.
        pids = receiver_pids(node)
        os.kill(pids[2], signal.SIGKILL)
        wait_until(lambda: receiver_pids(node)[2] != pids[2])
        assert f"receiver 2 (pid {pids[2]}) exited with code -9; starting it again" in node.log()
        assert all(echo(port) == 0 for _ in range(4))

        # A second node on the same port is refused instead of sharing it.
        second = run_dicomnode("serve", "--config", str(config))
        assert second.returncode == 2
        assert f"node.port = {port}: 127.0.0.1:{port} is in use" in second.stderr

        # Killing the node kills its receivers, and a new node gets the port.
        pids = receiver_pids(node)
        node.kill()  # returns once the receivers are gone, within 10 s
        assert not any(alive(pid) for pid in pids.values())
        # The new node answers at once: the old receivers no longer hold the port. (While
        # they did, they took connections and dropped them as they died.)
        node = NodeProcess(config, port).start()
        assert echo(port) == 0
    finally:
        node.stop()
