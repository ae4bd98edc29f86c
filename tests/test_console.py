"""The console that `serve` runs: pages in a real browser (Debian's chromium), /metrics,
/health and the admin's actions over HTTP against a running node that received, synthesized
and delivered a study to a real Orthanc."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

from pydicom import dcmread
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from node.config import load_config
from node.console import ConsoleServer, build_app
from node.pages import PAGE_SIZE, Query, series_page
from pipeline.completion import CompletionSettings, complete_due_series
from pipeline.spool import Spool
from pipeline.state import audit
from pipeline.state.db import AuditEvent, open_database, utcnow
from tests.support.browser import headless_chromium
from tests.support.dicomgen import mr_series
from tests.support.models import make_registry
from tests.support.nodeproc import NodeProcess, free_port, run_dicomnode, write_config
from tests.support.peers import Orthanc
from tests.support.senders import send, storescu
from tests.test_end_to_end import NATIVE_T1, pacs_config
from tests.test_worker import receive

TOKEN = "console-test-token-0123"
SCREENSHOT = Path(__file__).parent.parent / "docs" / "console.png"


def get(
    url: str, token: str | None = None, data: dict | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(data).encode() if data is not None else None,
        headers=({"Authorization": f"Bearer {token}"} if token else {}) | (headers or {}),
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_console_of_a_node_that_delivered_a_study(tmp_path, mr_brain):
    registry = make_registry(tmp_path / "models")
    source = dcmread(sorted((mr_brain / NATIVE_T1).glob("*.dcm"))[0], stop_before_pixels=True)
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        port = free_port()
        http = f'\n[http]\nport = {free_port()}\nadmin_token = "{TOKEN}"\n'
        config = write_config(
            tmp_path / "node",
            port,
            extra=pacs_config(orthanc.dicom_port) + http,
            models=registry.root,
        )
        node = NodeProcess(config, port).start()
        try:
            assert storescu([mr_brain / NATIVE_T1], port).returncode == 0
            node.wait_for(
                lambda s: s["deliveries"] and s["deliveries"][0]["state"] == "sent", timeout=180
            )
            check_http(node.http_url, source)
            check_pages_in_a_browser(node.http_url, source, tmp_path)
        finally:
            node.stop()
    finally:
        orthanc.stop()
    rows = json.loads(run_dicomnode("audit", "--json", "--config", str(config)).stdout)
    by_console = [row for row in rows if row["origin"] == "http 127.0.0.1"]
    assert [row["detail"].split(":")[0] for row in by_console] == ["resend", "resend"]
    assert all(row["accession_number"] == source.AccessionNumber for row in by_console)


def check_http(url: str, source) -> None:
    status, body = get(f"{url}/health")
    assert (status, body) == (200, b"healthy\n")
    metrics = get(f"{url}/metrics")[1].decode()
    for line in (
        'dicomnode_instances_total{status="success"} 26.0',
        'dicomnode_series{state="routed"} 1.0',
        'dicomnode_jobs{state="done"} 1.0',
        'dicomnode_deliveries{destination="pacs",state="sent"} 1.0',
        "dicomnode_queue_depth 0.0",
        "dicomnode_synthesis_seconds_count 1.0",
        'dicomnode_model_active{model="t1-to-t2",version="v1"} 1.0',
    ):
        assert line in metrics, line
    spool = next(x for x in metrics.splitlines() if x.startswith("dicomnode_spool_bytes "))
    assert float(spool.split()[1]) > 26 * 100_000  # 26 slices of 512 x 512 x 2 bytes
    for which in ("source", "synthetic"):
        status, png = get(f"{url}/jobs/1/{which}.png")
        assert status == 200 and png.startswith(b"\x89PNG")
    # No patient name on any page unless the config allows it.
    name = str(source.PatientName).split("^")[0]
    for page in ("/", "/series", "/jobs", "/deliveries", "/audit"):
        status, html = get(url + page)
        assert status == 200 and name.encode() not in html, page
    assert source.AccessionNumber.encode() in get(f"{url}/series")[1]

    # Actions: refused without the token, done and audited with it.
    resend = {"action": "resend", "target": "1"}
    assert get(f"{url}/actions", data=resend)[0] == 403
    assert get(f"{url}/actions", token="wrong-token-0000000", data=resend)[0] == 403
    status, body = get(f"{url}/actions", token=TOKEN, data=resend)
    assert status == 200 and b"queued to be sent again to pacs" in body


def check_pages_in_a_browser(url: str, source, tmp_path: Path) -> None:
    with headless_chromium() as browser:
        browser.get(url + "/")
        assert "healthy" in browser.find_element(By.CLASS_NAME, "verdict").text
        processes = browser.find_element(By.TAG_NAME, "table").text
        assert "serve" in processes and "cpu" in processes and "alive" in processes
        browser.save_screenshot(str(tmp_path / "overview.png"))
        if not SCREENSHOT.exists():  # the README's picture; delete it to take a new one
            browser.save_screenshot(str(SCREENSHOT))

        # Searched by study UID, newest first: the job with its two thumbnails loaded.
        browser.get(f"{url}/jobs?q={source.StudyInstanceUID}")
        rows = browser.find_elements(By.CSS_SELECTOR, "table tr")
        assert len(rows) == 2 and "done" in rows[1].text and "t1-to-t2 v1" in rows[1].text
        images = browser.find_elements(By.CSS_SELECTOR, "img.thumb")
        assert len(images) == 2
        assert all(
            browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images
        )
        assert browser.find_elements(By.XPATH, "//button[text()='resend']") == []  # read-only

        browser.get(f"{url}/jobs?state=failed")
        assert "none" in browser.find_elements(By.CSS_SELECTOR, "table tr")[1].text

        # The token entered in the page unlocks the actions: a resend, done and shown.
        page = browser.find_element(By.TAG_NAME, "table")
        browser.find_element(By.NAME, "token").send_keys(TOKEN)
        browser.find_element(By.XPATH, "//button[text()='unlock actions']").click()
        WebDriverWait(browser, 30).until(expected_conditions.staleness_of(page))
        browser.get(f"{url}/jobs?q={source.AccessionNumber}")
        browser.find_element(By.XPATH, "//button[text()='resend']").click()
        shown = expected_conditions.presence_of_element_located((By.CLASS_NAME, "note"))
        note = WebDriverWait(browser, 30).until(shown).text
        assert note.startswith("job 1: series ") and note.endswith(
            "queued to be sent again to pacs"
        )


def test_patient_names_only_where_the_config_allows(tmp_path):
    sessions = open_database(f"sqlite:///{tmp_path}/node.sqlite")
    datasets = mr_series(2)
    for ds in datasets:
        ds.PatientName = "Doe^Jane"
    receive((sessions, tmp_path / "spool", None), datasets)
    spool = Spool(tmp_path / "spool")
    (hidden,) = series_page(sessions, Query(), spool, names=False)
    (shown,) = series_page(sessions, Query(), spool, names=True)
    assert hidden["patient_name"] is None and shown["patient_name"] == "Doe^Jane"


def test_health_is_503_with_the_reason_and_a_killed_node_is_seen_gone(tmp_path):
    """A node without a worker and a job queued: unhealthy, saying why; after a SIGKILL and
    a restart, the dead process is listed as gone beside the new one."""
    port = free_port()
    # No models: no worker in the process; and a spool that asks for more room than any disk.
    config = write_config(tmp_path, port, min_free_spool_mb=10**9)
    node = NodeProcess(config, port).start()
    try:
        assert [status for status, _ in send(mr_series(3), port)] == [0, 0, 0]
        node.wait_for(lambda s: s["jobs"])
        status, body = get(f"{node.http_url}/health")
        assert status == 503
        assert b"jobs: 1 queued and no live worker to run them" in body
        assert b"below node.min_free_spool_mb = 1000000000" in body
        assert b"no live worker" in get(f"{node.http_url}/jobs")[1]
        killed = node.process.pid
        node.kill()
        node.start()
        status = node.wait_for(lambda s: len(s["workers"]) == 2)
        liveness = {w["pid"]: w["liveness"] for w in status["workers"]}
        assert liveness == {killed: "gone", node.process.pid: "alive"}
        text = run_dicomnode("status", "--config", str(config)).stdout
        assert text.startswith("UNHEALTHY: spool: ") and "jobs: 1 queued" in text.splitlines()[0]
        assert " gone" in text
    finally:
        node.stop()


def test_an_incomplete_series_is_shown_with_its_reason_and_counted(tmp_path):
    """The states the safety features added (a series short of its announced count) on the
    console's pages and in /metrics."""
    config = load_config(write_config(tmp_path, free_port()))
    sessions = open_database(config.node.database)
    receive((sessions, config.node.storage, None), mr_series(5)[:3])  # announced 5, sent 3
    waited = CompletionSettings(quiet_seconds=10, incomplete_wait_seconds=60)
    (done,) = complete_due_series(
        sessions, config.routes, waited, now=utcnow() + timedelta(seconds=3600)
    )
    assert done.state == "incomplete"
    server = ConsoleServer(config, build_app(config, sessions))
    server.start()
    try:
        metrics = get(f"{server.url}/metrics")[1].decode()
        assert 'dicomnode_series{state="incomplete"} 1.0' in metrics
        assert 'dicomnode_jobs{state="failed"} 1.0' in metrics
        status, html = get(f"{server.url}/series?state=incomplete")
        assert status == 200 and b"3 of 5 announced instances" in html
        status, html = get(f"{server.url}/jobs?state=held")
        assert status == 200 and b"none" in html
    finally:
        server.stop()


def test_the_audit_trail_is_paged_back_to_its_first_entry(tmp_path):
    """Every audit row stays reachable from the console, newest first, a page at a time."""
    config = load_config(write_config(tmp_path, free_port()))
    sessions = open_database(config.node.database)
    total = PAGE_SIZE * 4 + 3  # the console once showed the newest 4 pages only
    with sessions.begin() as session:
        for number in range(total):
            audit.record(session, AuditEvent.ADMIN_ACTION, "test", f"entry {number:04d}")
    server = ConsoleServer(config, build_app(config, sessions))
    server.start()
    try:
        shown, url = [], f"{server.url}/audit"
        while url:
            status, html = get(url)
            assert status == 200
            page = html.decode()
            shown += re.findall(r"entry (\d{4})", page)
            older = re.search(r'<a href="([^"]+)">older', page)
            url = server.url + older.group(1).replace("&amp;", "&") if older else None
        assert shown == [f"{number:04d}" for number in reversed(range(total))]
        status, html = get(f"{server.url}/audit?page=0")  # read as the first page
        assert status == 200 and "entry 0202" in html.decode()
    finally:
        server.stop()


def test_a_browsers_action_from_another_sites_page_is_refused(tmp_path):
    """The admin cookie is sent with any page's form: an action must come from the console."""
    http = f'\n[http]\nport = {free_port()}\nadmin_token = "{TOKEN}"\n'
    config = load_config(write_config(tmp_path, free_port(), extra=http))
    sessions = open_database(config.node.database)
    server = ConsoleServer(config, build_app(config, sessions))
    server.start()
    try:
        cookie = {"Cookie": f"dicomnode_admin={TOKEN}"}
        reprocess = {"action": "reprocess", "target": "1.2.3", "back": "/series"}
        for foreign in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/"}, {}):
            status, body = get(f"{server.url}/actions", data=reprocess, headers=cookie | foreign)
            assert (status, body) == (403, b"forbidden: not sent from this console's pages\n")
        own = {"Origin": server.url}
        status, body = get(f"{server.url}/actions", data=reprocess, headers=cookie | own)
        assert status == 200 and b"cannot reprocess" in body  # no such series: but it was heard
    finally:
        server.stop()
