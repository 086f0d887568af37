"""``msdseg web``: the bind-address policy, upload validation, the background job; the real
server's WebSocket guard (Origin, one browser, message size) driven by a real WebSocket client;
and one real browser session (Debian's chromium + chromedriver driven by Selenium) with the
shipped model on the shipped 1 mm sample, from upload to segmentation, review, editing, saving
and re-opening.

The server is ``python -m msdseg web SAMPLE --test-hook`` in a separate process (the real command
line, its own event loop and MRML scene); the tests read the server's facts -- label digests and
what an edit changed, undo state, group visibility, the overlay's threshold, the brush -- from the
read-only JSON endpoint that ``--test-hook`` adds.  Everything the user does goes through the page.

The browser test runs the ``fast`` preset to keep CI short.  With
``MSDSEG_WEB_SCREENSHOTS=docs/images`` it runs the default preset instead and writes the user
guide's screenshots (``web_*.png``).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import SimpleITK as sitk

from msdseg.core.errors import Cancelled, InputError

pytestmark = pytest.mark.unit

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOTS = os.environ.get("MSDSEG_WEB_SCREENSHOTS")
WINDOW = (1440, 900)
#: The test's upload cap (MB): above the sample's size, below the oversized file the test offers.
UPLOAD_CAP_MB = 48


# ============================================================================ host policy
def test_loopback_names_and_addresses():
    from msdseg_web.hosts import is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org", "10.0.0.1"):
        assert not is_loopback(host), host


def test_remote_bind_needs_the_flag_and_warns():
    from msdseg_web.hosts import check_bind_address

    assert check_bind_address("127.0.0.1", 8080, allow_remote=False) is None
    with pytest.raises(InputError, match="--allow-remote"):
        check_bind_address("0.0.0.0", 8080, allow_remote=False)
    warning = check_bind_address("0.0.0.0", 8080, allow_remote=True)
    assert warning is not None and "WARNING" in warning and "8080" in warning


def test_cli_refuses_remote_host_without_flag(capsys):
    """The refusal is immediate (before VTK, Slicer or torch are imported) and one line."""
    from msdseg.cli.main import main

    assert main(["web", "--host", "0.0.0.0", "--port", "8999"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msdseg: error: refusing to listen on 0.0.0.0") and "\n" not in err


def test_remote_bind_prints_the_warning_before_serving(monkeypatch, capsys, tmp_path):
    """With --allow-remote the server starts and the warning is on stderr (app stubbed out)."""
    import types

    from msdseg_web import server

    started: dict[str, Any] = {}

    class FakeApp:
        def __init__(self, options):
            self.server = types.SimpleNamespace(start=lambda **kw: started.update(kw))

        def close(self):
            started["closed"] = True

    fake = types.ModuleType("msdseg_web.app")
    fake.AppOptions = lambda **kw: kw  # type: ignore[attr-defined]
    fake.MsdsegWebApp = FakeApp  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "msdseg_web.app", fake)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(server, "configure_environment", lambda: None)  # keep this process's environment
    options = server.WebOptions(host="0.0.0.0", port=9123, allow_remote=True, output=str(tmp_path))
    assert server.run(options) == 0
    assert "WARNING" in capsys.readouterr().err
    assert started["host"] == "0.0.0.0" and started["port"] == 9123 and started["closed"]


# ============================================================================ uploads
def _nifti_bytes(image: sitk.Image, tmp: Path) -> bytes:
    path = tmp / "x.nii.gz"
    sitk.WriteImage(image, str(path))
    return path.read_bytes()


def _small_t1() -> sitk.Image:
    from conftest import make_image, phantom_fn

    return make_image((40, 48, 40), (4.0, 4.0, 4.0), np.eye(3), fn=phantom_fn)


def test_upload_names_cannot_leave_the_folder(tmp_path):
    from msdseg_web.uploads import safe_file_name, write_uploads

    assert safe_file_name("../../etc/passwd") == "passwd"
    assert safe_file_name("C:\\Users\\x\\t1 scan.nii.gz") == "t1_scan.nii.gz"
    assert safe_file_name(".hidden") == "hidden"
    assert safe_file_name("") == "upload"
    folder = tmp_path / "up"
    written = write_uploads([{"name": "../../evil.nii.gz", "content": [b"ab", b"cd"]}], folder)
    assert written == [folder / "evil.nii.gz"] and written[0].read_bytes() == b"abcd"
    assert not (tmp_path / "evil.nii.gz").exists()


def test_uploads_that_are_not_images_are_rejected_with_a_message(tmp_path):
    from msdseg_web.uploads import receive_t1

    with pytest.raises(InputError, match="not an image file"):
        receive_t1([{"name": "notes.txt", "content": b"hello"}], tmp_path / "a")
    with pytest.raises(InputError, match=r"^broken\.nii\.gz: ") as refused:  # named by its own name only
        receive_t1([{"name": "broken.nii.gz", "content": b"\x1f\x8b not really gzip"}], tmp_path / "b")
    assert "\n" not in str(refused.value) and str(tmp_path) not in str(refused.value)
    flat = sitk.GetImageFromArray(np.random.rand(32, 32).astype(np.float32))
    with pytest.raises(InputError, match="3-D"):
        receive_t1([{"name": "flat.nii.gz", "content": _nifti_bytes(flat, tmp_path)}], tmp_path / "c")
    with pytest.raises(InputError, match="no file"):
        receive_t1([], tmp_path / "d")


def test_a_valid_upload_is_read_as_float32(tmp_path):
    from msdseg_web.uploads import receive_t1

    path, image = receive_t1([{"name": "t1.nii.gz", "content": _nifti_bytes(_small_t1(), tmp_path)}], tmp_path / "u")
    assert path.name == "t1.nii.gz" and image.GetSize() == (40, 48, 40)
    assert image.GetPixelID() == sitk.sitkFloat32


# ============================================================================ background job
def _fake_segmenter(steps: int, fail: Exception | None = None) -> Callable:
    def segment(image, settings, progress, cancel):
        for i in range(steps):
            if cancel():
                raise Cancelled("cancelled")
            progress(i / steps, f"step {i}")
            time.sleep(0.01)
        if fail is not None:
            raise fail
        return "result"
    return segment


def test_job_reports_progress_and_finishes():
    from msdseg.core.settings import SegmentSettings
    from msdseg_web.worker import DONE, SegmentationJob

    job = SegmentationJob(_small_t1(), SegmentSettings(), segmenter=_fake_segmenter(20))
    job.start()
    status = job.join(10)
    assert status.state == DONE and status.finished and status.progress == 1.0 and job.result == "result"


def test_job_cancels_between_steps():
    from msdseg.core.settings import SegmentSettings
    from msdseg_web.worker import CANCELLED, SegmentationJob

    job = SegmentationJob(_small_t1(), SegmentSettings(), segmenter=_fake_segmenter(100_000))
    job.start()
    time.sleep(0.05)
    job.cancel()
    status = job.join(10)
    assert status.state == CANCELLED and job.result is None


def test_job_failure_becomes_one_line():
    from msdseg.core.settings import SegmentSettings
    from msdseg_web.worker import FAILED, SegmentationJob

    job = SegmentationJob(_small_t1(), SegmentSettings(), segmenter=_fake_segmenter(2, RuntimeError("boom\nmore")))
    job.start()
    status = job.join(10)
    assert status.state == FAILED and status.error == "RuntimeError: boom"


# ============================================================================ the real server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WebServer:
    """``python -m msdseg web`` in a child process, plus its test hook."""

    def __init__(self, sample: Path, outdir: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.origin = f"http://127.0.0.1:{self.port}"
        self.outdir = outdir
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "msdseg", "web", str(sample), "--port", str(self.port), "--test-hook",
               "-o", str(outdir), "--device", "cpu", "--max-upload-mb", str(UPLOAD_CAP_MB)]
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)

    def state(self, labels: bool = False) -> dict[str, Any]:
        query = "?labels=1" if labels else ""
        with urllib.request.urlopen(self.url + "msdseg-test/state" + query, timeout=120) as response:
            return json.loads(response.read())

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"msdseg web exited ({self.process.returncode}):\n{self.tail()}")
            try:
                return self.state()
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"msdseg web did not answer within {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(line for line in text if "WindowResizeEvent" not in line)[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self._log_file.close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, server: WebServer | None = None,
             every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    detail = f"\nserver state: {server.state()}\n{server.tail()}" if server is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")


@pytest.fixture(scope="module")
def sample_t1() -> Path:
    """The shipped 1 mm MNI152 sample: the demo scan the user guide shows."""
    from msdseg.resources import sample_t1_path

    return sample_t1_path()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory, sample_t1):
    pytest.importorskip("trame_slicer", reason="the 'web' extra (trame-slicer) is not installed")
    root = tmp_path_factory.mktemp("web")
    server = WebServer(sample_t1, root / "out", root / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


async def _hello(ws) -> dict[str, Any]:
    """wslink's handshake (its public default secret), as trame's client sends it."""
    import msgpack
    from wslink.chunking import generate_chunks

    hello = {"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello", "args": [{"secret": "wslink-secret"}],
             "kwargs": {}}
    for chunk in generate_chunks(msgpack.packb(hello), 0):
        await ws.send_bytes(chunk)
    reply = await ws.receive(timeout=30)
    return msgpack.unpackb(reply.data[12:])


@pytest.mark.integration
def test_the_server_accepts_its_own_origin_only_and_one_browser(web_server):
    """Real WebSocket handshakes against ``msdseg web``: a page on another origin cannot drive it,
    and while one browser holds the app a second one gets the "in use" page and no WebSocket."""
    import asyncio

    import aiohttp

    base, ws_url = web_server.origin, web_server.origin + "/ws"

    async def scenario() -> None:
        jar = aiohttp.CookieJar(unsafe=True)  # keep cookies for 127.0.0.1, as browsers do
        async with aiohttp.ClientSession(cookie_jar=jar) as owner, aiohttp.ClientSession() as other:
            for origin in ("http://evil.example", f"http://127.0.0.1:{web_server.port + 1}",
                           f"http://attacker.test:{web_server.port}", None):
                headers = {"Origin": origin} if origin else {}
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await other.ws_connect(ws_url, headers=headers)
                assert refused.value.status == 403, origin
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await other.ws_connect(ws_url, headers={"Origin": base})  # the right origin, no page loaded
            assert refused.value.status == 423

            async with owner.get(base + "/index.html") as page:
                assert page.status == 200
            async with owner.ws_connect(ws_url, headers={"Origin": base}) as ws:
                assert (await _hello(ws))["result"]["clientID"]
                assert web_server.state()["browser_connections"] == 1
                async with other.get(base + "/index.html") as page:
                    assert page.status == 423 and "in use" in await page.text()
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await other.ws_connect(ws_url, headers={"Origin": base})
                assert refused.value.status == 423
            await asyncio.sleep(0.5)
            assert web_server.state()["browser_connections"] == 0
            async with other.get(base + "/", allow_redirects=False) as page:
                assert page.status in (301, 302)  # free again (a plain "/" does not take the app)

    asyncio.run(scenario())


@pytest.mark.integration
def test_the_server_ends_a_connection_that_sends_an_oversized_message(web_server):
    """wslink would assemble one message of up to 4 GB; the app caps messages at 32 MiB."""
    import asyncio

    import aiohttp
    import msgpack
    from wslink.chunking import generate_chunks

    base = web_server.origin

    async def scenario() -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
            async with client.get(base + "/index.html") as page:
                assert page.status == 200
            async with client.ws_connect(base + "/ws", headers={"Origin": base}) as ws:
                assert (await _hello(ws))["result"]["clientID"]
                huge = msgpack.packb({"wslink": "1.0", "id": "rpc:c0:1", "method": "trame.trigger",
                                      "args": ["x", [b"\0" * (40 * 2**20)], {}], "kwargs": {}})
                await ws.send_bytes(next(generate_chunks(huge, 1 << 20)))  # only the first 1 MB
                closing = await ws.receive(timeout=30)
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                        aiohttp.WSMsgType.CLOSING), closing
        await asyncio.sleep(0.5)
        assert web_server.state()["browser_connections"] == 0

    asyncio.run(scenario())


@pytest.mark.integration
def test_the_server_serves_no_file_outside_its_own_folders(web_server):
    """Path tricks in URLs return nothing from the disk (no /etc/passwd, no results by path)."""
    import http.client

    for path in ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/trame_slicer_2.0.0/../../etc/passwd",
                 "/msdseg_web/..%2f..%2f..%2f..%2fetc/passwd", "//etc/passwd", "/" + str(web_server.outdir)):
        connection = http.client.HTTPConnection("127.0.0.1", web_server.port, timeout=30)
        connection.request("GET", path)  # sent as written: no client-side normalisation
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert response.status in (301, 302, 400, 403, 404), (path, response.status)
        assert b"root:" not in body, path


# ============================================================================ the browser session
@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(web_server, downloads, tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev/web extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium_profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    # the window size includes no browser chrome in headless mode, but pin the viewport anyway
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The page interactions the test needs, found by the ``msd-*`` classes the app sets."""

    def __init__(self, driver, server: WebServer):
        from selenium.webdriver.common.by import By

        self.d, self.server, self.By = driver, server, By

    def find(self, css: str):
        return self.d.find_element(self.By.CSS_SELECTOR, css)

    def all(self, css: str) -> list:
        return self.d.find_elements(self.By.CSS_SELECTOR, css)

    def wait_css(self, css: str, timeout: float = 60):
        return wait_for(lambda: (self.all(css) or [None])[0], timeout, css, self.server)

    def click(self, css: str) -> None:
        element = self.wait_css(css)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        element.click()

    def click_icon(self, scope: str, icon: str) -> None:
        """Click the button that holds ``icon`` (trame-slicer's effect buttons have no ids)."""
        icon_element = self.wait_css(f"{scope} .{icon}")
        icon_element.find_element(self.By.XPATH, "./ancestor::button").click()

    def tool(self, name: str) -> None:
        self.click(f".msd-tool-{name}")
        time.sleep(0.5)
        if not self.all(".v-navigation-drawer--active .msd-panel, .v-navigation-drawer--active .msd-editor-panel, "
                        ".v-navigation-drawer--active .msd-volumes"):
            self.click(f".msd-tool-{name}")  # the first click closed an open drawer

    def upload(self, field: str, *paths: Path) -> None:
        self.wait_css(f"{field} input[type=file]").send_keys("\n".join(str(p) for p in paths))

    def text(self, css: str) -> str:
        texts = self.texts(css)
        return texts[0] if texts else ""

    def texts(self, css: str) -> list[str]:
        """Visible texts read in one go in the page (the list may re-render between two reads)."""
        return self.d.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText.trim());", css)

    def switch(self, css: str) -> None:
        self.click(f"{css} input")

    def choose(self, field_css: str, option_text: str) -> None:
        """Pick an item of a Vuetify select by its visible text."""
        self.click(f"{field_css} .v-field")
        option = wait_for(lambda: [o for o in self.all(".v-overlay--active .v-list-item")
                                   if o.text.startswith(option_text)], 30, f"the option {option_text}", self.server)[0]
        option.click()

    def screenshot(self, name: str) -> bytes:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.d).move_to_element_with_offset(self.find(".v-app-bar"), 0, 0).perform()  # no tooltip
        time.sleep(1.0)  # let the views finish their last render
        png = self.d.get_screenshot_as_png()
        if SCREENSHOTS:  # for the user guide: 256 colours keep the files small
            from PIL import Image

            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            image = Image.open(io.BytesIO(png)).convert("RGB").quantize(256)
            image.save(Path(SCREENSHOTS) / f"web_{name}.png", optimize=True)
        return png

    def views(self) -> list:
        """The rendered view images (an image still loading has no size to move the mouse to)."""
        return [v for v in self.all("img.image-display-area") if v.size["width"] > 50
                and self.d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0;", v)]

    def axial_view(self):
        views = wait_for(self.views, 60, "the slice views to render", self.server)
        return max(views, key=lambda v: v.size["width"] * v.size["height"])

    def hover(self, dx: int, dy: int) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        view = self.axial_view()
        ActionChains(self.d).move_to_element_with_offset(view, dx, dy).perform()
        time.sleep(0.2)
        ActionChains(self.d).move_to_element_with_offset(view, dx + 1, dy).perform()

    def stroke(self) -> None:
        """One horizontal drag across the middle of the axial view."""
        from selenium.webdriver.common.action_chains import ActionChains

        view = self.axial_view()
        actions = ActionChains(self.d, duration=50)
        actions.move_to_element_with_offset(view, -view.size["width"] // 8, 0).click_and_hold()
        for _ in range(10):
            actions.move_by_offset(view.size["width"] // 40, 0).pause(0.05)
        actions.release().perform()


def label_counts(labels: sitk.Image) -> dict[str, int]:
    counts = np.bincount(sitk.GetArrayFromImage(labels).ravel().astype(np.int64))
    return {str(v): int(counts[v]) for v in np.flatnonzero(counts)}


def assert_not_blank(png: bytes, box: tuple[int, int, int, int] | None = None) -> None:
    """The page shows content: many distinct colours and real contrast, not a loading screen."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    if box is not None:
        image = image.crop(box)
    array = np.asarray(image)
    colours = len(np.unique(array.reshape(-1, 3), axis=0))
    assert colours > 500 and float(array.std()) > 20.0, (colours, float(array.std()))


def _detached_pair(folder: Path) -> tuple[Path, Path]:
    from conftest import make_image, phantom_fn

    folder.mkdir()
    header = folder / "phantom.nhdr"
    sitk.WriteImage(make_image((40, 48, 40), (4.0, 4.0, 4.0), np.eye(3), fn=phantom_fn), str(header))
    (data,) = [p for p in folder.iterdir() if p != header]
    return header, data


@pytest.mark.browser
def test_browser_review_edit_save_reopen(web_server, browser, downloads, sample_t1, tmp_path, tree):
    from msdseg.core.volumes import read_volumes_csv
    from msdseg.outputs.writers import read_seg_nrrd_labels

    server, page = web_server, Page(browser, web_server)
    started = time.monotonic()
    assert server.state()["input"] == "mni152_t1"  # INPUT given on the command line is open

    browser.get(server.url)
    page.wait_css(".msd-run", timeout=120)
    wait_for(lambda: "mni152_t1.nii.gz" in page.text(".msd-input-name"), 60, "the input name on the page", server)
    assert page.text(".msd-panel .v-select").find("balanced") >= 0  # the one default preset of every front end

    # --- one browser at a time: another browser gets the "in use" page
    with pytest.raises(urllib.error.HTTPError) as in_use:
        urllib.request.urlopen(server.url + "index.html", timeout=30)
    assert in_use.value.code == 423 and b"in use" in in_use.value.read()

    # --- every slice view names itself, its orientation and its position
    overlays = wait_for(lambda: [t for t in page.texts(".msd-view-overlay") if "mm" in t], 30, "view overlays", server)
    by_name = {text.split("\n")[0]: text.split("\n")[1:] for text in overlays}
    assert by_name["Axial"][:4] == ["R", "L", "A", "P"]  # left, right, top, bottom: radiological, as Slicer
    assert by_name["Coronal"][:4] == ["R", "L", "S", "I"]
    assert set(by_name["Sagittal"][:4]) == {"A", "P", "S", "I"}
    for lines in by_name.values():
        assert re.fullmatch(r"[RLAPSI] \d+\.\d mm", lines[4]), lines

    # --- the cursor readout follows the mouse
    page.hover(0, 0)
    wait_for(lambda: "T1 " in page.text(".msd-cursor") and " mm" in page.text(".msd-cursor"), 30, "readout", server)

    # --- uploads: refused with one line each, the open case stays
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.upload(".msd-upload-t1", notes)
    wait_for(lambda: "not an image file" in page.text(".msd-error"), 60, "the rejection message", server)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08 this is not a NIfTI file")
    page.upload(".msd-upload-t1", broken)
    wait_for(lambda: page.text(".msd-error").startswith("broken.nii.gz: "), 60, "the read error", server)
    big = tmp_path / "big.nii"
    with open(big, "wb") as handle:  # sparse: costs no disk
        handle.truncate((UPLOAD_CAP_MB + 8) * 2**20)
    page.upload(".msd-upload-t1", big)
    wait_for(lambda: "upload too large" in page.text(".msd-error"), 60, "the size cap", server)
    assert f"limit is {UPLOAD_CAP_MB} MB" in page.text(".msd-error")
    header, data = _detached_pair(tmp_path / "detached")
    page.upload(".msd-upload-t1", header)  # a detached header without its data file
    wait_for(lambda: "was not uploaded with it" in page.text(".msd-error"), 60, "the header refusal", server)
    assert server.state()["input"] == "mni152_t1"
    page.upload(".msd-upload-t1", header, data)  # ... and with it
    wait_for(lambda: server.state()["input"] == "phantom", 60, "the detached-header T1", server)

    # --- a real upload through the file picker replaces the case
    upload = tmp_path / "upload_t1.nii.gz"
    shutil.copy(sample_t1, upload)
    page.upload(".msd-upload-t1", upload)
    wait_for(lambda: server.state()["input"] == "upload_t1", 120, "the uploaded T1", server)
    wait_for(lambda: "upload_t1.nii.gz" in page.text(".msd-input-name") and not page.all(".msd-error"), 30,
             "the page to show the new case", server)
    page.screenshot("open")

    # --- run and cancel, then run to the end with progress and a time estimate
    preset = "balanced" if SCREENSHOTS else "fast"
    page.choose(".msd-panel .v-select", preset)
    page.click(".msd-run")
    wait_for(lambda: server.state()["jobs_started"] == 1, 30, "the job to start", server)
    page.click(".msd-cancel")
    wait_for(lambda: server.state()["job"]["state"] == "cancelled", 120, "the cancellation", server)
    wait_for(lambda: "cancelled" in page.text(".msd-message"), 30, "'cancelled' on the page", server)
    assert server.state()["has_result"] is False

    page.click(".msd-run")
    wait_for(lambda: server.state()["jobs_started"] == 2, 30, "the second job to start", server)
    wait_for(lambda: " left" in page.text(".msd-eta"), 120, "an estimate of the time left", server)
    wait_for(lambda: server.state()["job"]["state"] != "running", 600, "the segmentation", server, every=1.0)
    assert server.state()["job"]["state"] == "done", server.state()
    wait_for(lambda: "done in" in page.text(".msd-message"), 60, "'done in ... s' on the page", server)
    state = server.state(labels=True)
    assert state["has_result"] and state["uncertainty_node"] is not None and state["error"] == ""
    assert not page.all(".msd-untrained")  # the shipped, trained model
    original = state["labels"]
    assert sum(original["counts"].values()) == int(np.prod(original["size"]))
    names = {leaf.name for leaf in tree.leaves}
    page.hover(page.axial_view().size["width"] // 12, 0)  # on the left lateral ventricle of the sample
    wait_for(lambda: any(n in page.text(".msd-cursor") for n in names) and "uncertainty" in page.text(".msd-cursor"),
             30, "a structure name and the uncertainty under the mouse", server)
    png = page.screenshot("result")  # the readout stays with the last position under the mouse
    assert_not_blank(png)
    view = page.views()[0]
    x, y, w, h = (int(view.location["x"]), int(view.location["y"]), view.size["width"], view.size["height"])
    assert_not_blank(png, (x, y, x + w, y + h))

    # --- hemisphere groups: hide and show the whole left hemisphere
    page.switch(".msd-group-left_hemisphere")
    wait_for(lambda: server.state()["groups"].get("left_hemisphere") is False, 30, "left hidden", server)
    assert server.state()["groups"]["right_hemisphere"] is True
    page.screenshot("groups")
    page.switch(".msd-group-left_hemisphere")
    wait_for(lambda: server.state()["groups"].get("left_hemisphere") is True, 30, "left shown", server)

    # --- uncertainty overlay: a threshold from the map itself, a colour bar, air left transparent
    threshold = state["uncertainty_threshold"]
    assert threshold is not None and 0.02 < threshold < 0.9
    page.switch(".msd-show-uncertainty")
    wait_for(lambda: server.state()["uncertainty_node"] in server.state()["foreground_volumes"], 30,
             "the uncertainty overlay", server)
    assert page.all(".msd-colorbar") and page.text(".msd-colorbar-low") == f"{round(threshold, 3):g}"
    page.screenshot("uncertainty")
    page.switch(".msd-show-uncertainty")
    wait_for(lambda: server.state()["foreground_volumes"] == [""], 30, "the overlay hidden", server)

    # --- the volumes table: pairs with swatches and asymmetry, rounded; CSV at full precision
    page.tool("volumes")
    rows = page.wait_css(".msd-volumes-table tbody tr") and page.all(".msd-volumes-table tbody tr")
    pairs = page.all(".msd-volumes-table .msd-row-paired")
    assert len(pairs) == len([n for n in tree.nodes if n.id.startswith("left_")]) + 0 and len(rows) > len(pairs)
    assert len(page.all(".msd-volumes-table .msd-swatch")) == 2 * len(pairs) + len(rows) - len(pairs)
    assert all(re.fullmatch(r"[+-]\d+\.\d", t) for t in page.texts(".msd-volumes-table .msd-ai"))
    assert all(re.fullmatch(r"\d+\.\d", t.strip()) for t in page.texts(".msd-volumes-table .msd-left"))
    page.click(".msd-download-volumes")
    csv_file = wait_for(lambda: list(downloads.glob("*_volumes.csv")), 60, "the CSV download", server)[0]
    assert csv_file.name == "upload_t1_volumes.csv"
    assert read_volumes_csv(csv_file) == server.state()["volumes_ml"]  # not rounded
    page.screenshot("volumes")

    # --- the editor: grouped list with full names, select by colour, delete behind a confirmation
    page.tool("editor")
    groups = page.texts(".msd-group-header")
    assert [g.split(" (")[0] for g in groups] == ["Left hemisphere", "Right hemisphere", "Midline"]
    assert [g.split("(")[1].rstrip(")") for g in groups] == ["14", "14", "4"]
    for name in page.all(".msd-segment-name"):
        assert browser.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth + 1;", name)
    thalamus = [r for r in page.all(".msd-segment-row") if r.text == "Left thalamus"][0]
    thalamus.find_element(page.By.CSS_SELECTOR, ".msd-swatch").click()
    wait_for(lambda: "Left thalamus" in page.text(".msd-segment-row.msd-active"), 30, "selection by colour", server)
    csf = [r for r in page.all(".msd-segment-row") if r.text == "CSF"][0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", csf)
    csf.find_element(page.By.CSS_SELECTOR, ".msd-segment-delete").click()
    wait_for(lambda: "Delete CSF?" in page.text(".msd-delete-dialog"), 30, "the confirmation", server)
    page.click(".msd-delete-cancel")
    time.sleep(1.0)
    assert "CSF" in page.texts(".msd-segment-name") and not server.state()["can_undo"]
    csf = [r for r in page.all(".msd-segment-row") if r.text == "CSF"][0]
    csf.find_element(page.By.CSS_SELECTOR, ".msd-segment-delete").click()
    page.click(".msd-delete-confirm")
    wait_for(lambda: "CSF" not in page.texts(".msd-segment-name"), 30, "CSF deleted", server)
    page.click(".msd-undo")
    wait_for(lambda: "CSF" in page.texts(".msd-segment-name"), 30, "undo brings CSF back", server)
    wait_for(lambda: server.state(labels=True)["labels"]["sha1"] == original["sha1"], 60, "the labels back", server)
    first = [r for r in page.all(".msd-segment-row") if r.text == "Left cerebral cortex"][0]
    first.click()
    wait_for(lambda: "Left cerebral cortex" in page.text(".msd-segment-row.msd-active"), 30, "cortex selected", server)

    # --- paint at default settings: a 2-D brush in mm changes one axial slice only
    page.click_icon(".msd-editor-panel", "mdi-brush")
    wait_for(lambda: "Paint" in (server.state()["active_effect"] or ""), 30, "the paint effect", server)
    assert server.state()["brush"] == {"sphere": False, "mode": "Absolute", "diameter": 3.0}
    assert "3 mm" in page.text(".msd-brush-info") and "2-D" in page.text(".msd-brush-info")
    page.stroke()
    painted = wait_for(lambda: (lambda s: s if s["labels"]["sha1"] != original["sha1"] else None)(
        server.state(labels=True)), 60, "the stroke to change the segmentation", server, every=1.0)
    edits = painted["edits"]
    assert edits["changed"] > 0 and edits["to"] == {"3": edits["changed"]}  # all became left cortex (aseg 3)
    assert edits["distinct_k_j_i"][0] == 1, edits  # one axial slice (k) only
    wait_for(lambda: server.state()["volumes_ml"]["left_cerebral_cortex"] != state["volumes_ml"]["left_cerebral_cortex"],
             30, "the volumes to follow the edit", server)
    page.screenshot("editor")
    page.tool("volumes")
    wait_for(lambda: f"{edits['changed']} voxels differ" in page.text(".msd-edited"), 30, "the table's edit mark", server)
    page.tool("editor")

    # --- erase the same stroke: the voxels get their earlier labels back (not background)
    page.click_icon(".msd-editor-panel", "mdi-eraser")
    wait_for(lambda: "Erase" in (server.state()["active_effect"] or ""), 30, "the erase effect", server)
    wait_for(lambda: "result's label" in page.text(".msd-erase-mode .v-btn--active").lower(), 30,
             "the default erase mode: give back the result's label", server)
    page.stroke()
    erased = wait_for(lambda: (lambda s: s if s["labels"]["sha1"] != painted["labels"]["sha1"] else None)(
        server.state(labels=True)), 60, "the erase stroke", server, every=1.0)
    assert set(erased["edits"]["from"]) <= {"3"} and set(erased["edits"]["to"]) <= {"0"}, erased["edits"]
    assert erased["edits"]["changed"] < edits["changed"]  # everything that was not cortex is back

    # --- undo (an obvious button) takes both strokes back, redo repaints
    page.click(".msd-undo")
    wait_for(lambda: server.state(labels=True)["labels"]["sha1"] == painted["labels"]["sha1"], 60, "undo 1", server)
    page.click(".msd-undo")
    wait_for(lambda: server.state(labels=True)["labels"]["sha1"] == original["sha1"], 60, "undo 2", server)
    page.click(".msd-redo")
    wait_for(lambda: server.state(labels=True)["labels"]["sha1"] == painted["labels"]["sha1"], 60, "redo", server)

    # --- save: the edited result in the output folder, in the input's geometry; never replaced
    page.tool("segmentation")
    page.click(".msd-save")
    wait_for(lambda: "Saved" in page.text(".msd-saved"), 120, "the save message", server)
    out = server.outdir
    names = {"upload_t1.seg.nrrd", "upload_t1_labels.nii.gz", "upload_t1_volumes.csv", "upload_t1_uncertainty.nii.gz"}
    assert names <= {p.name for p in out.iterdir()}
    first_bytes = (out / "upload_t1.seg.nrrd").read_bytes()
    reference = sitk.ReadImage(str(sample_t1))
    for saved in (read_seg_nrrd_labels(out / "upload_t1.seg.nrrd"), sitk.ReadImage(str(out / "upload_t1_labels.nii.gz"))):
        assert saved.GetSize() == reference.GetSize()
        assert np.allclose(saved.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        assert np.allclose(saved.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        assert np.allclose(saved.GetDirection(), reference.GetDirection(), atol=1e-6)
        assert label_counts(saved) == painted["labels"]["counts"]
    t1 = sitk.GetArrayFromImage(reference)
    uncertainty = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "upload_t1_uncertainty.nii.gz")))
    air = t1 <= 0.02 * t1.max()  # outside the head of the demo scan
    shown = float(np.mean(uncertainty[air] >= threshold))
    assert air.mean() > 0.3 and shown < 0.01, (air.mean(), shown)  # the overlay leaves air transparent
    print(f"overlay threshold {threshold:.3f}: {100 * shown:.2f} % of air voxels shown")
    page.click(".msd-save")
    wait_for(lambda: "upload_t1_v2.seg.nrrd" in page.text(".msd-saved"), 120, "the versioned save", server)
    assert "nothing was replaced" in page.text(".msd-saved")
    assert (out / "upload_t1.seg.nrrd").read_bytes() == first_bytes
    saved_csv = [b for b in page.all(".msd-saved-file") if b.text == "upload_t1_v2_volumes.csv"][0]
    saved_csv.click()  # a saved file, read back by its name inside the output folder
    fetched = wait_for(lambda: list(downloads.glob("upload_t1_v2_volumes.csv")), 60, "the saved CSV", server)[0]
    assert fetched.read_bytes() == (out / "upload_t1_v2_volumes.csv").read_bytes()

    # --- download the .seg.nrrd through the browser: the same labels
    page.click(".msd-download-seg")
    downloaded = wait_for(lambda: [p for p in downloads.glob("*.seg.nrrd")], 60, "the download", server)[0]
    assert downloaded.name == "upload_t1.seg.nrrd"
    assert label_counts(read_seg_nrrd_labels(downloaded)) == painted["labels"]["counts"]

    # --- re-open: first the NIfTI, then the saved .seg.nrrd gives back the edited labels
    page.upload(".msd-upload-result", out / "upload_t1_labels.nii.gz")
    wait_for(lambda: "opened upload_t1_labels.nii.gz" in page.text(".msd-message"), 120, "re-open (NIfTI)", server)
    assert server.state(labels=True)["labels"]["sha1"] == painted["labels"]["sha1"]
    page.upload(".msd-upload-result", out / "upload_t1.seg.nrrd")
    wait_for(lambda: "opened upload_t1.seg.nrrd" in page.text(".msd-message"), 120, "re-open (.seg.nrrd)", server)
    state = server.state(labels=True)
    assert state["labels"]["sha1"] == painted["labels"]["sha1"] and state["labels"]["counts"] == painted["labels"]["counts"]
    assert not state["can_undo"] and not page.all(".msd-error")

    elapsed = time.monotonic() - started
    print(f"browser session: {elapsed:.0f} s")
    assert elapsed < 480
