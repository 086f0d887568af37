"""``msdseg web`` safeguards that are plain Python: the Origin allow-list and the one-browser lock
(checked through a real in-process aiohttp server and real WebSocket handshakes), uploads in
slices with a size cap kept apart per connection, detached headers, download names, versioned
saving, and reading uploads off the event loop.

The same safeguards are checked against the real ``msdseg web`` process in ``test_web.py``.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from msdseg.core.errors import InputError

pytestmark = pytest.mark.unit


def _t1(size=(40, 48, 40), spacing=(4.0, 4.0, 4.0)) -> sitk.Image:
    from conftest import make_image, phantom_fn

    return make_image(size, spacing, np.eye(3), fn=phantom_fn)


# ============================================================================ origins
def test_origins_are_normalised_and_bad_ones_named():
    from msdseg_web.access import normalise_origin

    assert normalise_origin("HTTP://LocalHost:8080/") == "http://localhost:8080"
    assert normalise_origin("http://example.org:80") == "http://example.org"
    assert normalise_origin("https://[::1]:9000") == "https://[::1]:9000"
    for bad in ("example.org", "ftp://x:1", "http://x:1/path", "http://x:port", "http://u:p@x:1"):
        with pytest.raises(InputError, match="--allow-origin"):
            normalise_origin(bad)


def test_only_the_served_origins_are_allowed():
    from msdseg_web.access import OriginPolicy, served_origins

    policy = OriginPolicy(served_origins("127.0.0.1", 8080, ["http://workstation:9000"]))
    for origin in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080", "http://workstation:9000"):
        assert policy.allows(origin), origin
    # another port, another host, a rebinding name, https, nothing, garbage
    for origin in ("http://127.0.0.1:8081", "http://evil.example:8080", "http://127.0.0.1.nip.io:8080",
                   "https://127.0.0.1:8080", None, "", "null", "http://127.0.0.1:8080/x"):
        assert not policy.allows(origin), origin
    remote = OriginPolicy(served_origins("10.1.2.3", 8080))
    assert remote.allows("http://10.1.2.3:8080") and not remote.allows("http://127.0.0.1:8080")


# ============================================================================ the one-browser lock
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lock_serves_one_browser_and_frees_when_it_leaves():
    from msdseg_web.access import BrowserLock

    clock = Clock()
    lock = BrowserLock(claim_seconds=30, clock=clock)
    first = lock.page(None)
    assert first and lock.page(None) is None  # a second browser loads the page moments later
    assert lock.page(first) == first  # the same browser reloads
    assert not lock.connect(None) and not lock.connect("forged")  # a WebSocket needs an issued token
    assert lock.connect(first) and lock.connect(first)  # two tabs of the same browser
    clock.now += 3600
    assert lock.page(None) is None  # still connected, however long
    assert not lock.disconnect() and lock.page(None) is None
    assert lock.disconnect()  # the last tab closed: free at once
    second = lock.page(None)
    assert second and second != first and lock.connect(second)
    assert not lock.connect(first)  # the earlier owner's token no longer opens it


def test_a_page_load_without_websocket_holds_the_app_only_briefly():
    from msdseg_web.access import BrowserLock

    clock = Clock()
    lock = BrowserLock(claim_seconds=30, clock=clock)
    assert lock.page(None)
    clock.now += 29
    assert lock.page(None) is None
    clock.now += 2
    assert lock.page(None)


@pytest.fixture
def guarded_server():
    """A real aiohttp server with the app's middleware in front of an echo WebSocket and a page."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from msdseg_web.access import BrowserLock, OriginPolicy, cookie_name, middleware, served_origins

    async def page(_request):
        return web.Response(text="<html>app</html>", content_type="text/html")

    async def websocket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    def build(port: int):
        lock = BrowserLock()
        freed: list[bool] = []
        app = web.Application(middlewares=[middleware(OriginPolicy(served_origins("127.0.0.1", port)), lock,
                                                      ["/ws"], cookie_name(port), on_free=lambda: freed.append(True))])
        app.router.add_get("/index.html", page)
        app.router.add_get("/ws", websocket)
        return app, lock, freed

    return build, TestServer


def test_websocket_from_a_foreign_origin_is_refused_and_one_browser_holds_the_app(guarded_server, unused_tcp_port):
    import aiohttp

    build, TestServer = guarded_server

    async def scenario() -> None:
        port = unused_tcp_port
        app, lock, freed = build(port)
        server = TestServer(app, host="127.0.0.1", port=port)
        await server.start_server()
        base, own = f"http://127.0.0.1:{port}", {"Origin": f"http://127.0.0.1:{port}"}
        try:
            jar = aiohttp.CookieJar(unsafe=True)  # keep cookies for an IP address, as browsers do
            async with aiohttp.ClientSession(cookie_jar=jar) as owner, aiohttp.ClientSession() as other:
                for headers in ({"Origin": "http://evil.example"}, {"Origin": f"http://localhost:{port + 1}"}, {}):
                    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                        await other.ws_connect(f"{base}/ws", headers=headers)
                    assert refused.value.status == 403, headers
                async with owner.get(f"{base}/index.html") as response:
                    assert response.status == 200 and "app" in await response.text()
                async with owner.ws_connect(f"{base}/ws", headers=own) as ws:
                    await ws.send_str("ping")
                    assert (await ws.receive()).data == "ping"
                    async with other.get(f"{base}/index.html") as response:
                        assert response.status == 423 and "in use" in await response.text()
                    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                        await other.ws_connect(f"{base}/ws", headers=own)  # the right origin, not the owner
                    assert refused.value.status == 423
                await asyncio.sleep(0.1)
                assert freed == [True] and lock.connections == 0
                async with other.get(f"{base}/index.html") as response:
                    assert response.status == 200  # the first browser left: the next one may use the app
        finally:
            await server.close()

    asyncio.run(scenario())


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ============================================================================ uploads in slices
def test_upload_slices_are_kept_apart_per_connection(tmp_path):
    from msdseg_web.transfer import UploadReceiver

    receiver = UploadReceiver(tmp_path, max_bytes=100)
    receiver.begin("a", "u1", [{"name": "../t1.nii", "size": 6}])
    receiver.begin("b", "u1", [{"name": "t1.nii", "size": 4}])  # same upload id, another connection
    receiver.add("a", "u1", 0, 0, b"abc")
    receiver.add("b", "u1", 0, 0, b"wxyz")
    with pytest.raises(InputError, match="not started by this browser"):
        receiver.add("c", "u1", 0, 0, b"x")
    receiver.add("a", "u1", 0, 3, b"def")
    folder_a, (path_a,) = receiver.finish("a", "u1")
    folder_b, (path_b,) = receiver.finish("b", "u1")
    assert path_a.read_bytes() == b"abcdef" and path_b.read_bytes() == b"wxyz"
    assert folder_a != folder_b and path_a.name == "t1.nii" and folder_a.parent == tmp_path


def test_upload_cap_counts_every_unfinished_upload_of_a_connection(tmp_path):
    from msdseg_web.transfer import UploadReceiver

    receiver = UploadReceiver(tmp_path, max_bytes=10 * 2**20)
    with pytest.raises(InputError, match=r"upload too large: 11 MB, the limit is 10 MB \(msdseg web --max-upload-mb\)"):
        receiver.begin("a", "big", [{"name": "x.nii", "size": 11 * 2**20}])
    receiver.begin("a", "u1", [{"name": "x.nhdr", "size": 1000}, {"name": "x.raw", "size": 6 * 2**20}])
    with pytest.raises(InputError, match="upload too large"):
        receiver.begin("a", "u2", [{"name": "y.nii", "size": 5 * 2**20}])  # 6 MB still pending
    receiver.begin("b", "u2", [{"name": "y.nii", "size": 5 * 2**20}])  # another connection has its own cap
    assert receiver.pending_bytes("a") == 1000 + 6 * 2**20 and not list(tmp_path.glob("*/y.nii"))


def test_an_upload_that_breaks_the_rules_is_dropped_with_its_files(tmp_path):
    from msdseg_web.transfer import UploadReceiver

    receiver = UploadReceiver(tmp_path, max_bytes=100)
    cases = {
        "larger than announced": lambda: receiver.add("a", "u", 0, 0, b"0123456789"),
        "out of order": lambda: receiver.add("a", "u", 0, 4, b"x"),
        "no file number 3": lambda: receiver.add("a", "u", 3, 0, b"x"),
        "did not arrive in full": lambda: (receiver.add("a", "u", 0, 0, b"ab"), receiver.finish("a", "u")),
    }
    for message, action in cases.items():
        receiver.begin("a", "u", [{"name": "x.nii", "size": 4}])
        with pytest.raises(InputError, match=message):
            action()
        assert receiver.pending_bytes("a") == 0 and not list(tmp_path.iterdir()), message
    with pytest.raises(InputError, match="same name"):
        receiver.begin("a", "u", [{"name": "a/x.nii", "size": 1}, {"name": "b/x.nii", "size": 1}])
    with pytest.raises(InputError, match="too many files"):
        receiver.begin("a", "u", [{"name": f"{i}.raw", "size": 1} for i in range(9)])


def test_an_incoming_message_cannot_exceed_the_cap():
    """wslink would accept one 4 GB message after hello; the cap refuses it before allocating."""
    import msgpack
    import wslink.protocol
    from wslink.chunking import UnChunker, generate_chunks

    from msdseg_web.transfer import cap_websocket_messages

    original = wslink.protocol.UnChunker
    try:
        cap_websocket_messages(1 << 20)
        unchunker = wslink.protocol.UnChunker()
        unchunker.set_max_message_size(4 * 1024**3)  # what wslink does after a valid hello
        small = msgpack.packb({"id": "1", "method": "x", "args": [b"a" * 1000]})
        assert [unchunker.process_chunk(c) for c in generate_chunks(small, 0)][-1]["id"] == "1"
        large = msgpack.packb({"id": "2", "args": [b"a" * (2 << 20)]})
        with pytest.raises(ValueError, match="exceeds the allocation limit"):
            unchunker.process_chunk(next(generate_chunks(large, 64 * 1024)))
        assert issubclass(wslink.protocol.UnChunker, UnChunker)
    finally:
        wslink.protocol.UnChunker = original


# ============================================================================ detached headers
def _write(image: sitk.Image, path: Path) -> list[Path]:
    sitk.WriteImage(image, str(path))
    return sorted(p for p in path.parent.iterdir())


def _rewrite_data_line(header: Path, new_value: str) -> None:
    lines = header.read_text(encoding="latin-1").split("\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(("data file:", "elementdatafile")):
            lines[i] = line.split(":" if ":" in line else "=")[0] + (": " if ":" in line else " = ") + new_value
    header.write_text("\n".join(lines), encoding="latin-1")


@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
def test_a_detached_header_opens_only_with_its_own_uploaded_data_file(tmp_path, suffix):
    from msdseg_web.uploads import read_t1

    folder = tmp_path / "upload"
    folder.mkdir()
    files = _write(_t1(), folder / f"t1{suffix}")
    header = folder / f"t1{suffix}"
    data = [p for p in files if p != header]
    assert len(data) == 1
    path, image = read_t1(files)  # header and data file uploaded together
    assert path == header and image.GetSize() == (40, 48, 40)

    with pytest.raises(InputError, match=f"t1{suffix}: its data file '{data[0].name}' was not uploaded with it"):
        read_t1([header])
    for hostile in ("/proc/self/environ", "/dev/zero", "../t1.raw", f"sub/{data[0].name}"):
        _rewrite_data_line(header, hostile)
        with pytest.raises(InputError, match="was not uploaded with it") as refused:
            read_t1(files)
        assert "\n" not in str(refused.value)
    _rewrite_data_line(header, "LIST")
    with pytest.raises(InputError, match="several files"):
        read_t1(files)


def test_attached_headers_that_point_elsewhere_are_refused(tmp_path):
    """A .nrrd or .mha may name a data file too: ITK would read it instead of the attached voxels."""
    from msdseg_web.uploads import read_t1

    for name, hostile in (("x.nrrd", "/etc/passwd"), ("x.mha", "/dev/zero")):
        folder = tmp_path / name
        folder.mkdir()
        path = folder / name
        sitk.WriteImage(_t1(), str(path))
        assert read_t1([path])[1].GetSize() == (40, 48, 40)  # the attached data is fine
        if name.endswith(".nrrd"):  # a NRRD header line before the blank line that ends the header
            header, _, data = path.read_bytes().partition(b"\n\n")
            path.write_bytes(header + f"\ndata file: {hostile}".encode() + b"\n\n" + data)
        else:
            _rewrite_data_line(path, hostile)
        with pytest.raises(InputError, match=f"its data file '{hostile}' was not uploaded with it"):
            read_t1([path])


# ============================================================================ downloads and saving
def test_downloads_are_named_kinds_and_saved_files_stay_in_the_output_folder(tmp_path):
    from msdseg_web.results import check_download_kind, saved_file

    assert [check_download_kind(k) for k in ("segmentation", "labels", "volumes")]
    for bad in ("../etc/passwd", "/etc/passwd", "labels/../../x", ""):
        with pytest.raises(InputError, match="unknown download"):
            check_download_kind(bad)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_volumes.csv").write_text("x")
    (tmp_path / "secret.txt").write_text("secret")
    (out / "link.csv").symlink_to(tmp_path / "secret.txt")
    (out / "folder").mkdir()
    assert saved_file(out, "a_volumes.csv") == (out / "a_volumes.csv").resolve()
    for bad in ("../secret.txt", "/etc/passwd", "link.csv", "folder", "..", ".", "", "x\\..\\secret.txt", "missing"):
        with pytest.raises(InputError):
            saved_file(out, bad)


def test_saving_never_replaces_an_earlier_result(tmp_path, tree):
    from msdseg_web.results import save_result

    labels = sitk.Image(8, 8, 8, sitk.sitkUInt16)
    labels[2, 2, 2] = 17
    first = save_result(labels, None, tree, tmp_path, "case")
    before = first["segmentation"].read_bytes()
    labels[3, 3, 3] = 53
    second = save_result(labels, None, tree, tmp_path, "case")
    (tmp_path / "other_provenance.json").write_text("{}")  # a command-line run's record also counts
    third = save_result(labels, None, tree, tmp_path, "other")
    assert first["segmentation"].name == "case.seg.nrrd" and second["segmentation"].name == "case_v2.seg.nrrd"
    assert third["labels"].name == "other_v2_labels.nii.gz"
    assert first["segmentation"].read_bytes() == before


# ============================================================================ off the event loop
def test_reading_an_upload_leaves_the_event_loop_free(tmp_path):
    """While a 1 mm T1 is decompressed and checked, the loop keeps serving (ticks every 10 ms).

    A read done on the loop would stop the ticker for the whole read; in a thread the longest
    pause stays well below one read's duration.
    """
    from msdseg_web.transfer import in_thread
    from msdseg_web.uploads import read_t1

    path = tmp_path / "t1.nii.gz"
    sitk.WriteImage(_t1((192, 224, 192), (1.0, 1.0, 1.0)), str(path), useCompression=True)

    async def scenario() -> tuple[list[float], float]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        reads = []
        while sum(reads) < 0.6:
            start = time.perf_counter()
            await in_thread(read_t1, [path])
            reads.append(time.perf_counter() - start)
        done.set()
        await task
        return reads, max(gaps)

    reads, longest_gap = asyncio.run(scenario())
    one_read = float(np.median(reads))
    assert one_read > 0.08, reads  # a read long enough to notice ...
    assert longest_gap < one_read / 2, (reads, longest_gap)  # ... and the loop never waited for one


# ============================================================================ review and editing logic
def test_orientation_letters_and_slice_position_follow_the_view_matrix():
    from msdseg_web.views import orientation_letters, ras_letter, slice_position

    axial = np.array([[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 22.0], [0, 0, 0, 1]], float)  # Slicer's default
    coronal = np.array([[-1, 0, 0, 0], [0, 0, 1, -18.0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    assert orientation_letters(axial) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert orientation_letters(coronal) == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert slice_position(axial) == "S 22.0 mm" and slice_position(coronal) == "P 18.0 mm"
    flipped = axial.copy()
    flipped[:3, 0] *= -1  # a neurological view: the letters swap with it
    assert orientation_letters(flipped)["left"] == "L"
    assert ras_letter([0.2, -0.9, 0.3]) == "P"  # an oblique axis is named by its largest component


def test_cursor_probe_reads_the_voxel_under_a_ras_point():
    from msdseg_web.readout import ProbeArrays, probe

    t1 = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # (k, j, i)
    labels = np.zeros((2, 3, 4), np.uint16)
    labels[1, 2, 3] = 17
    arrays = ProbeArrays(np.eye(4), t1, labels, np.full((2, 3, 4), 0.25, np.float32))
    out = probe(arrays, [3.2, 1.9, 1.0], {17: "Left hippocampus"})
    assert out == {"position": "R 3.2, A 1.9, S 1.0 mm", "voxel": "3, 2, 1", "intensity": "23",
                   "label": "Left hippocampus", "uncertainty": "0.25"}
    assert probe(arrays, [0, 0, 0], {})["label"] == "background"
    assert probe(arrays, [-1, 0, 0], {}) is None  # outside the volume


def test_uncertainty_threshold_separates_the_floor_from_the_unsure_voxels():
    from msdseg_web.overlay import MIN_THRESHOLD, display_range, otsu_threshold

    rng = np.random.default_rng(0)
    floor = rng.normal(0.05, 0.01, 90_000).clip(0.001, None)  # air and the inside of structures
    unsure = rng.normal(0.45, 0.08, 10_000).clip(0, 1)  # borders
    values = np.concatenate([floor, unsure])
    threshold = otsu_threshold(values)
    assert 0.1 < threshold < 0.35 and np.mean(floor >= threshold) < 0.001 and np.mean(unsure >= threshold) > 0.99
    lower, upper = display_range(values)
    assert lower == pytest.approx(otsu_threshold(values[values > 0])) and upper > lower
    assert display_range(np.full(100, 0.001))[0] == MIN_THRESHOLD  # a near-perfect map is not stretched
    assert display_range(np.zeros(10)) == (MIN_THRESHOLD, 1.0)


def test_volume_rows_pair_left_and_right_with_an_asymmetry_index(tree):
    from msdseg.core.volumes import aggregate_volumes
    from msdseg_web.volume_table import asymmetry_index, volume_rows

    leaves = {leaf.id: 1.0 for leaf in tree.leaves}
    leaves.update(left_thalamus=7.3512, right_thalamus=6.6488)
    rows = volume_rows(aggregate_volumes(leaves, tree), tree)
    thalamus = next(r for r in rows if r["id"] == "left_thalamus")
    assert thalamus["name"] == "Thalamus" and thalamus["twin"] == "right_thalamus"
    assert (thalamus["left"], thalamus["right"], thalamus["ai"]) == ("7.4", "6.6", "+10.0")  # display rounding
    assert asymmetry_index(0.0, 0.0) is None and asymmetry_index(1.0, 3.0) == pytest.approx(-100.0)
    ids = [r["id"] for r in rows]
    assert ids[-1] == "brain" and "csf" in ids and not any(i.startswith("right_") for i in ids)
    assert all(r["colour"].startswith("#") and len(r["colour"]) == 7 for r in rows)


def test_a_restoring_erase_gives_erased_voxels_their_earlier_label():
    from msdseg_web.erase import restore_targets

    reference = np.array([[3, 3, 10, 10, 0]])  # cortex, cortex, thalamus, thalamus, background
    now = np.array([[3, 3, 3, 3, 3]])  # a cortex stroke painted over all five
    stroke = np.array([[True, True, True, False, True]])
    targets = restore_targets(stroke, now == 3, reference, active_value=3)
    assert list(targets) == [10] and targets[10].tolist() == [[False, False, True, False, False]]
    # voxels the result gave to cortex, and background, stay erased; the unstroked one stays cortex


def test_time_left_waits_for_a_rate_then_scales_the_time_so_far():
    from msdseg_web.worker import time_left

    assert time_left(0.01, 2.0) == "estimating the time left"
    assert time_left(0.5, 20.0) == "about 20 s left"
    assert time_left(0.1, 30.0) == "about 4 min left"
