"""``msdseg web``: the bind-address policy, upload validation, the background job, and one real
browser session (Debian's chromium + chromedriver driven by Selenium) that goes from upload to
segmentation, paint, undo/redo, save and re-open.

The browser test starts ``python -m msdseg web SAMPLE --test-hook`` as a separate process (the real
command line, its own event loop and MRML scene) and reads the server's facts -- label counts and
digest, undo state, group visibility, the overlay in the slice views -- from the read-only JSON
endpoint that ``--test-hook`` adds.  Everything the user does goes through the page.

With ``MSDSEG_WEB_SCREENSHOTS=docs/images`` the browser test also writes the user guide's
screenshots (``web_*.png``).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
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
    with pytest.raises(InputError, match="cannot be read as an image"):
        receive_t1([{"name": "broken.nii.gz", "content": b"\x1f\x8b not really gzip"}], tmp_path / "b")
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


# ============================================================================ the browser session
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WebServer:
    """``python -m msdseg web`` in a child process, plus its test hook."""

    def __init__(self, sample: Path, outdir: Path, model: str, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.outdir = outdir
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "msdseg", "web", str(sample), "--port", str(self.port), "--test-hook",
               "-o", str(outdir), "--model", model, "--device", "cpu"]
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "msdseg-test/state", timeout=60) as response:
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


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, server: WebServer | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    detail = f"\nserver state: {server.state()}\n{server.tail()}" if server is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")


@pytest.fixture(scope="module")
def sample_t1(tmp_path_factory) -> Path:
    """The shipped MNI152 sample T1 resampled to 3 mm: a real head, small enough for seconds per run."""
    from msdseg.core.io import load_volume
    from msdseg.resources import sample_t1_path

    image = load_volume(sample_t1_path())
    size = [int(round(n * s / 3.0)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    smooth = sitk.SmoothingRecursiveGaussian(image, [1.2, 1.2, 1.2])  # anti-alias before the 3x step
    small = sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), (3.0, 3.0, 3.0),
                          image.GetDirection(), 0.0, sitk.sitkFloat32)
    path = tmp_path_factory.mktemp("web_sample") / "sample.nii.gz"
    sitk.WriteImage(small, str(path))
    return path


@pytest.fixture(scope="module")
def web_server(tmp_path_factory, sample_t1, untrained_model):
    pytest.importorskip("trame_slicer", reason="the 'web' extra (trame-slicer) is not installed")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    root = tmp_path_factory.mktemp("web")
    server = WebServer(sample_t1, root / "out", untrained_model, root / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(web_server, downloads, tmp_path_factory):
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
    """The few page interactions the test needs, found by the ``msd-*`` classes the app sets."""

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
        """Click the button that holds ``icon`` (trame-slicer's effect and undo buttons have no ids)."""
        icon_element = self.wait_css(f"{scope} .{icon}")
        icon_element.find_element(self.By.XPATH, "./ancestor::button").click()

    def tool(self, name: str) -> None:
        self.click(f".msd-tool-{name}")
        time.sleep(0.5)
        if not self.all(".v-navigation-drawer--active .msd-panel, .v-navigation-drawer--active .msd-editor-panel, "
                        ".v-navigation-drawer--active .msd-volumes"):
            self.click(f".msd-tool-{name}")  # the first click closed an open drawer

    def upload(self, field: str, path: Path) -> None:
        self.wait_css(f"{field} input[type=file]").send_keys(str(path))

    def text(self, css: str) -> str:
        elements = self.all(css)
        return elements[0].text if elements else ""

    def switch(self, css: str) -> None:
        self.click(f"{css} input")

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
        return [v for v in self.all("img.image-display-area") if v.size["width"] > 50]

    def paint_stroke(self) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        view = max(self.views(), key=lambda v: v.size["width"] * v.size["height"])  # the axial view
        actions = ActionChains(self.d, duration=50)
        actions.move_to_element_with_offset(view, -view.size["width"] // 5, 0).click_and_hold()
        for _ in range(16):
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


@pytest.mark.browser
def test_browser_segment_paint_undo_save_reopen(web_server, browser, downloads, sample_t1, tmp_path, tree):
    from msdseg.outputs.writers import read_seg_nrrd_labels

    server, page = web_server, Page(browser, web_server)
    started = time.monotonic()
    assert server.state()["input"] == "sample"  # INPUT given on the command line is open

    browser.get(server.url)
    page.wait_css(".msd-run", timeout=120)
    wait_for(lambda: "sample.nii.gz" in page.text(".msd-input-name"), 60, "the input name on the page", server)

    # --- uploads that are not images are refused with a message; the open case stays
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.upload(".msd-upload-t1", notes)
    wait_for(lambda: "not an image file" in page.text(".msd-error"), 60, "the rejection message", server)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08 this is not a NIfTI file")
    page.upload(".msd-upload-t1", broken)
    wait_for(lambda: "cannot be read as an image" in page.text(".msd-error"), 60, "the read error", server)
    assert server.state()["input"] == "sample"

    # --- a real upload through the file picker replaces the case
    upload = tmp_path / "upload_t1.nii.gz"
    shutil.copy(sample_t1, upload)
    page.upload(".msd-upload-t1", upload)
    wait_for(lambda: server.state()["input"] == "upload_t1", 60, "the uploaded T1", server)
    wait_for(lambda: "upload_t1.nii.gz" in page.text(".msd-input-name") and not page.all(".msd-error"), 30,
             "the page to show the new case", server)
    page.screenshot("open")

    # --- run and cancel, then run to the end (the default preset, progress shown)
    page.click(".msd-run")
    wait_for(lambda: server.state()["jobs_started"] == 1, 30, "the job to start", server)
    page.click(".msd-cancel")
    wait_for(lambda: server.state()["job"]["state"] == "cancelled", 120, "the cancellation", server)
    wait_for(lambda: "cancelled" in page.text(".msd-message"), 30, "'cancelled' on the page", server)
    assert server.state()["has_result"] is False

    page.click(".msd-run")
    wait_for(lambda: server.state()["jobs_started"] == 2, 30, "the second job to start", server)
    wait_for(lambda: page.all(".msd-progress"), 30, "the progress bar", server)
    wait_for(lambda: server.state()["job"]["state"] != "running", 240, "the segmentation", server)
    assert server.state()["job"]["state"] == "done", server.state()
    wait_for(lambda: "done in" in page.text(".msd-message"), 30, "'done in ... s' on the page", server)
    state = server.state()  # the page says "done in" once the result is in the scene
    assert state["has_result"] and state["volumes_rows"] == len(tree.nodes)
    assert state["uncertainty_node"] is not None
    assert page.all(".msd-untrained")  # the untrained-model warning is visible
    original = state["labels"]
    assert sum(original["counts"].values()) == int(np.prod(original["size"]))
    png = page.screenshot("result")
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

    # --- uncertainty overlay on and off
    page.switch(".msd-show-uncertainty")
    wait_for(lambda: server.state()["uncertainty_node"] in server.state()["foreground_volumes"], 30,
             "the uncertainty overlay", server)
    page.screenshot("uncertainty")
    page.switch(".msd-show-uncertainty")
    wait_for(lambda: server.state()["foreground_volumes"] == [""], 30, "the overlay hidden", server)

    # --- the volumes table
    page.tool("volumes")
    rows = page.wait_css(".msd-volumes-table tbody tr") and page.all(".msd-volumes-table tbody tr")
    assert len(rows) == len(tree.nodes)
    page.screenshot("volumes")

    # --- paint one stroke with the segment editor, then undo and redo
    page.tool("editor")
    page.click_icon(".msd-editor-panel", "mdi-brush")
    wait_for(lambda: "Paint" in (server.state()["active_effect"] or ""), 30, "the paint effect", server)
    page.paint_stroke()
    painted = wait_for(lambda: (lambda s: s["labels"] if s["labels"]["sha1"] != original["sha1"] else None)(
        server.state()), 30, "the stroke to change the segmentation", server)
    assert server.state()["can_undo"]
    cortex = "left_cerebral_cortex"  # the active segment: the first one
    wait_for(lambda: server.state()["volumes_ml"][cortex] != state["volumes_ml"][cortex], 30,
             "the volumes table to follow the edit", server)
    page.screenshot("editor")
    page.click_icon(".msd-undo-redo", "mdi-undo")
    wait_for(lambda: server.state()["labels"]["sha1"] == original["sha1"], 30, "undo to restore", server)
    assert server.state()["can_redo"]
    page.click_icon(".msd-undo-redo", "mdi-redo")
    wait_for(lambda: server.state()["labels"]["sha1"] == painted["sha1"], 30, "redo to repaint", server)

    # --- save (the edited result) in the output folder, in the input's geometry
    page.tool("segmentation")
    page.click(".msd-save")
    wait_for(lambda: "Saved" in page.text(".msd-saved"), 60, "the save message", server)
    out = server.outdir
    names = {"upload_t1.seg.nrrd", "upload_t1_labels.nii.gz", "upload_t1_volumes.csv", "upload_t1_uncertainty.nii.gz"}
    assert names <= {p.name for p in out.iterdir()}
    reference = sitk.ReadImage(str(sample_t1))
    for saved in (read_seg_nrrd_labels(out / "upload_t1.seg.nrrd"), sitk.ReadImage(str(out / "upload_t1_labels.nii.gz"))):
        assert saved.GetSize() == reference.GetSize()
        assert np.allclose(saved.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        assert np.allclose(saved.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        assert np.allclose(saved.GetDirection(), reference.GetDirection(), atol=1e-6)
        assert label_counts(saved) == painted["counts"]

    # --- download the .seg.nrrd through the browser: the same labels
    page.click(".msd-download-seg")
    downloaded = wait_for(lambda: [p for p in downloads.glob("*.seg.nrrd")], 60, "the download", server)[0]
    assert downloaded.name == "upload_t1.seg.nrrd"
    assert label_counts(read_seg_nrrd_labels(downloaded)) == painted["counts"]

    # --- re-open: first something else, then the saved .seg.nrrd gives back the edited labels
    page.upload(".msd-upload-result", out / "upload_t1_labels.nii.gz")
    wait_for(lambda: "opened upload_t1_labels.nii.gz" in page.text(".msd-message"), 60, "re-open (NIfTI)", server)
    assert server.state()["labels"]["sha1"] == painted["sha1"]
    page.upload(".msd-upload-result", out / "upload_t1.seg.nrrd")
    wait_for(lambda: "opened upload_t1.seg.nrrd" in page.text(".msd-message"), 60, "re-open (.seg.nrrd)", server)
    state = server.state()
    assert state["labels"]["sha1"] == painted["sha1"] and state["labels"]["counts"] == painted["counts"]
    assert not state["can_undo"] and not page.all(".msd-error")

    elapsed = time.monotonic() - started
    print(f"browser session: {elapsed:.0f} s")
    assert elapsed < 300
