"""Request images: formats recognised by content and read as `healthgpt.io` reads files, limits checked from the
headers, paths and non-data URIs refused, remote URLs fetched only when the server allows them."""

from __future__ import annotations

import base64
import functools
import gzip
import http.server
import threading
from pathlib import Path

import numpy as np
import openai
import pytest
from _serving import MODEL, image_question, png_bytes, thread_server
from PIL import Image
from pydicom.data import get_testdata_file

from healthgpt.io import load_image, save_nifti
from healthgpt.serving.images import ImageRejected, data_uri_bytes, decode_image
from healthgpt.serving.server import ServerOptions, create_app

CT = Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module")
def nifti(tmp_path_factory) -> Path:
    values = np.random.default_rng(0).normal(40, 300, (6, 20, 16)).astype(np.float32)
    return save_nifti(values, tmp_path_factory.mktemp("nifti") / "ct.nii.gz", np.eye(4))


def test_dicom_and_nifti_bytes_read_as_their_files(nifti):
    assert decode_image(CT.read_bytes(), max_pixels=10**6).tobytes() == load_image(CT).to_pil().tobytes()
    expected = load_image(nifti).to_pil().tobytes()
    assert decode_image(nifti.read_bytes(), max_pixels=10**6).tobytes() == expected
    assert decode_image(gzip.decompress(nifti.read_bytes()), max_pixels=10**6).tobytes() == expected


def test_a_png_is_shown_as_it_is():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    assert decode_image(png_bytes(image), max_pixels=40 * 40).tobytes() == image.tobytes()  # its padded square


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (CT.read_bytes(), "would need 16384 pixels .*, more than the server's limit of 10000"),
        (png_bytes(Image.new("L", (200, 100))), "would need 40000 pixels"),  # 20000, padded to 200 x 200
        (png_bytes(Image.new("L", (20000, 1))), "would need 400000000 pixels"),
        (b"", "is empty"),
        (b"GIF89a" + bytes(20), "is not a PNG, JPEG, DICOM or NIfTI image"),
        (CT.read_bytes()[:400], "unreadable header"),
        (gzip.compress(b"not a nifti" * 40), "unreadable header"),
    ],
    ids=[
        "dicom-limit",
        "png-limit",
        "png-padded-square",
        "empty",
        "truncated-gif",
        "truncated-dicom",
        "gzip-not-nifti",
    ],
)
def test_unreadable_or_oversized_images_are_refused_with_the_reason(data, message):
    with pytest.raises(ImageRejected, match=message):
        decode_image(data, max_pixels=10_000, name="image 1")


@pytest.mark.parametrize("url", ["file:///etc/hostname", "/etc/hostname", "C:\\scan.png", "ftp://host/x.png"])
def test_only_data_uris_are_read_from_a_request(url):
    with pytest.raises(ImageRejected, match="never reads files"):
        data_uri_bytes(url, "image")
    with pytest.raises(ImageRejected, match="base64 data: URI"):
        data_uri_bytes("data:image/png,rawbytes", "image")
    assert data_uri_bytes("data:image/png;base64," + base64.b64encode(b"abc").decode(), "image") == b"abc"


def test_remote_images_are_fetched_when_allowed(nano, tmp_path):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    (tmp_path / "ct.png").write_bytes(png_bytes(image))
    (tmp_path / "big.png").write_bytes(bytes(3_000_000))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    site = f"http://127.0.0.1:{files.server_address[1]}"
    options = ServerOptions(allow_remote_images=True, remote_image_hosts=("127.0.0.1",), max_body_bytes=2_000_000)
    app = create_app(nano, options)
    try:
        with thread_server(app) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
            reply = client.chat.completions.create(
                model=MODEL, messages=image_question(f"{site}/ct.png", "What?"), max_tokens=4
            )
            assert reply.choices[0].message.content == nano.ask(image, "What?", max_new_tokens=4)
            for path, message in [("missing.png", "answered HTTP 404"), ("big.png", "larger than the server's limit")]:
                with pytest.raises(openai.BadRequestError, match=message):
                    client.chat.completions.create(
                        model=MODEL, messages=image_question(f"{site}/{path}", "What?"), max_tokens=4
                    )
            unlisted = f"http://localhost:{files.server_address[1]}/ct.png"  # the same server, by a name not listed
            with pytest.raises(openai.BadRequestError, match="does not fetch images from that host"):
                client.chat.completions.create(model=MODEL, messages=image_question(unlisted, "What?"), max_tokens=4)
            with pytest.raises(openai.BadRequestError, match="never reads files"):
                client.chat.completions.create(model=MODEL, messages=image_question("file:///etc/hostname", "What?"))
    finally:
        files.shutdown()
