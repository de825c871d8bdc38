"""Image I/O (atomic writes, PNG text chunks, loading errors) and the tiled first stage in pipelines.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers_models import randomize_
from helpers_png import write_png, write_png_header
from PIL import Image
from tiny_models import tiny_first_stage

from latentgen import pipelines
from latentgen.autoencoder import build_autoencoder
from latentgen.errors import InputError
from latentgen.images import atomic_path, load_image, read_png_text, save_png, slugify, to_pil, to_tensor


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "x.png"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists() and list((tmp_path / "sub").iterdir()) == []
    save_png(Image.new("RGB", (4, 4)), target, text={"parameters": "p", "latentgen": '{"seed": 1}'})
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(InputError, match="--overwrite"):
        save_png(Image.new("RGB", (4, 4)), target)
    assert read_png_text(target) == {"parameters": "p", "latentgen": '{"seed": 1}'}


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_load_image_errors_and_roundtrip(tmp_path):
    with pytest.raises(InputError, match="no such image"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(tmp_path / "junk.png")
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    x = to_tensor(load_image(tmp_path / "rgba.png"))
    alpha = a[..., 3:] / 255.0
    ref = np.round(a[..., :3] * alpha + 255 * (1 - alpha))  # composited over white
    assert x.shape == (1, 3, 5, 7)
    assert np.abs(np.asarray(to_pil(x[0])).astype(int) - ref).max() <= 1
    assert slugify("A Red, circle!") == "a-red-circle" and slugify("!!!") == "untitled"


# ------------------------------------------------------------------------------ hostile and unusual images


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257, 1000, 32896], [40000, 65279, 65535, 128]], dtype=np.uint16)  # 32896 = mid-grey 128
    im = load_image(write_png(tmp_path / "g16.png", v), mode="RGB")
    ref = np.round(v / 257.0).astype(np.uint8)  # 8-bit = round(v · 255 / 65535)
    got = np.asarray(im)
    assert got.shape == (2, 4, 3) and all(np.array_equal(got[..., c], ref) for c in range(3))
    assert got[0, 3, 0] == 128
    assert np.array_equal(np.asarray(load_image(tmp_path / "g16.png", mode="L")), ref)  # masks too


def test_16_bit_rgb_png_within_one_level(tmp_path):
    v = np.random.default_rng(1).integers(0, 65536, (3, 5, 3)).astype(np.uint16)
    got = np.asarray(load_image(write_png(tmp_path / "rgb48.png", v))).astype(int)
    assert np.abs(got - np.round(v / 257.0)).max() <= 1


# EXIF orientation (EXIF 2.3, tag 0x0112): how the stored pixels are turned to show the image upright.
ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180°
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed (mirror + 270° clockwise)
    6: lambda a: np.rot90(a, -1),  # rotate 90° clockwise to show
    7: lambda a: np.rot90(a, -1)[::-1],  # transverse (mirror + 90° clockwise)
    8: lambda a: np.rot90(a, 1),  # rotate 90° counter-clockwise to show
}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_is_applied(tmp_path, orientation):
    a = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif)
    assert np.array_equal(np.asarray(load_image(tmp_path / "o.png")), ORIENTED[orientation](a))


def test_exif_rotated_jpeg_has_the_shape_viewers_show(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 32), (200, 30, 30)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (32, 64)


def test_decompression_bomb_is_one_clear_error(tmp_path):
    from latentgen.validation import MAX_IMAGE_PIXELS

    bomb = write_png_header(tmp_path / "bomb.png", 30000, 30000)
    for read in (load_image, read_png_text):
        with pytest.raises(InputError, match=rf"image too large: 30000x30000, the limit is {MAX_IMAGE_PIXELS} pixels"):
            read(bomb)
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path)


def test_write_errors_become_output_errors_and_leave_nothing(tmp_path):
    import errno

    from latentgen.errors import OutputError

    target = tmp_path / "x.png"
    with pytest.raises(OutputError, match="cannot write .*x.png: No space left on device") as e:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.fatal and list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError) as e:
        with atomic_path(target):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    assert not e.value.fatal and list(tmp_path.iterdir()) == []
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="is a directory: give an output file name"):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "d", overwrite=True)
    assert list((tmp_path / "d").iterdir()) == []


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return randomize_(build_autoencoder(tiny_first_stage()), 5).eval()


def test_tiled_decode_is_close_to_whole_and_seamless(vae):
    z = torch.randn(1, 4, 48, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = vae.decode_latent(z)
        tiled = pipelines.decode_latents(vae, z, tile=24, overlap=8)
        same = pipelines.decode_latents(vae, z, tile=64)  # one tile = the whole latent
    assert torch.equal(same, whole)
    err = (tiled - whole).abs()
    # random weights: the attention of each tile sees only that tile, so tiles differ slightly; measured ~0.05
    assert err.mean() < 0.1 and err.max() < 1.0, (err.mean(), err.max())
    # seamless: no jump across tile seams larger than the image's own neighbour differences
    row_jump = (tiled[..., 1:, :] - tiled[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    assert row_jump.max() < 3 * row_jump.median()


def test_shared_norm_stats_with_the_whole_input_as_preview_is_plain_group_norm(vae):
    z = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = vae.decode_latent(z)
        with pipelines.shared_norm_stats(vae.decode_latent, vae, z):
            fixed = vae.decode_latent(z)
            patched = sum("forward" in m.__dict__ for m in vae.modules())
        shifted = vae.decode_latent(z * 3)
        with pipelines.shared_norm_stats(vae.decode_latent, vae, z):
            fixed_shifted = vae.decode_latent(z * 3)
    assert patched > 0 and not any("forward" in m.__dict__ for m in vae.modules())  # restored after the block
    torch.testing.assert_close(fixed, plain, rtol=1e-5, atol=1e-5)
    assert (fixed_shifted - shifted).abs().max() > 0.05  # the recorded statistics are used, not the input's


@pytest.fixture(scope="module")
def default_ae():
    from latentgen.loading.bundle import load_model

    return load_model("default").first_stage


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = (((t.clamp(-1, 1) + 1) * 127.5).round() for t in (a, b))
    return float(10 * torch.log10(255**2 / ((a - b) ** 2).mean()))


def test_tiles_share_group_norm_statistics_of_the_whole_image(default_ae):
    """The shipped (trained) autoencoder, a 256² shapes scene, 64-pixel tiles: tiles with their own GroupNorm
    statistics come out with the wrong colours (15 dB against the whole decode, measured); with the shared
    statistics of a subsampled preview they match it (49 dB), in both directions."""
    from latentgen.autoencoder import DiagonalGaussian
    from latentgen.data import shapes_sample

    fs, f = default_ae, default_ae.config.factor
    img = to_tensor(shapes_sample(0, 256)[0]) * 2 - 1
    with torch.no_grad():
        z = pipelines.encode_latents(fs, img, tile=0)
        whole = pipelines.decode_latents(fs, z, tile=0)
        own = pipelines.blend_tiles(fs.decode_latent, z, 16, 4, 1, f)
        shared = pipelines.decode_latents(fs, z, tile=16, overlap=4)
        z_own = DiagonalGaussian(pipelines.blend_tiles(lambda p: fs.encode(p).moments, img, 16, 4, f, 1)).mode()
        z_shared = pipelines.encode_latents(fs, img, tile=16, overlap=4)
        dec_own, dec_shared = (pipelines.decode_latents(fs, q, tile=0) for q in (z_own, z_shared))
    db = {
        name: _psnr(img, whole)
        for name, img in (("own", own), ("shared", shared), ("enc own", dec_own), ("enc shared", dec_shared))
    }
    assert db["own"] < 25 and db["shared"] > 40 and db["enc own"] < 35 and db["enc shared"] > 40, db


def test_tiled_encode_mode_and_sample(vae):
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x).mode()
        tiled = pipelines.encode_latents(vae, x, tile=16, overlap=4)
        g = [torch.Generator().manual_seed(s) for s in (3, 4)]
        sampled = pipelines.encode_latents(vae, x, g, tile=0)
        ref = torch.cat(
            [vae.encode_latent(x[i : i + 1], torch.Generator().manual_seed(s), True) for i, s in enumerate((3, 4))]
        )
    assert tiled.shape == whole.shape and (tiled - whole).abs().mean() < 0.1
    assert (sampled - ref).abs().max() < 1e-4  # batched vs single-image convolutions


def test_decode_falls_back_to_tiles_when_out_of_memory(vae, monkeypatch):
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    real, sizes = vae.decode_latent, []

    def limited(latent):
        sizes.append(tuple(latent.shape[-2:]))
        if max(latent.shape[-2:]) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(latent)

    monkeypatch.setattr(vae, "decode_latent", limited)
    with torch.no_grad():
        img = pipelines.decode_latents(vae, z)
        with pipelines.shared_norm_stats(real, vae, z[..., ::2, ::2]):  # the preview fits a 16-pixel tile
            expected = pipelines.blend_tiles(real, z, 16, 4, 1, 2)
    assert sizes[0] == (32, 32) and set(sizes[1:]) == {(16, 16)}
    assert torch.equal(img, expected)
    monkeypatch.setattr(vae, "decode_latent", lambda latent: (_ for _ in ()).throw(RuntimeError("not enough memory")))
    with pytest.raises(InputError, match="out of memory"):
        pipelines.decode_latents(vae, z)
    monkeypatch.setattr(vae, "decode_latent", lambda latent: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not retried
        pipelines.decode_latents(vae, z)
