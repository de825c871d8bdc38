"""loading.mapped_pages: a memory-mapped checkpoint's pages dropped from the resident set keep their values (a
page written to is kept), and a txt2img run leaves the model file's mapping nearly non-resident, with the same
image."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import random_model

from latentgen import pipelines
from latentgen.loading.bundle import load_model
from latentgen.loading.mapped_pages import drop_mapped_pages, file_mappings
from latentgen.loading.safetensors import read_safetensors
from latentgen.pipelines import Settings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and madvise")


def resident(path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    spans = set(file_mappings(path))
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(a, 16) for a in head.split("-"))
                inside = (start, end) in spans
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def test_dropped_pages_keep_their_values_and_written_pages_are_kept(tmp_path):
    path = tmp_path / "w.safetensors"
    want = torch.randn(4096, 2048, generator=torch.Generator().manual_seed(0)).half()  # 16 MiB
    save_file({"w": want}, str(path))
    t = read_safetensors(path)[0]["w"]
    assert torch.equal(t, want) and resident(path) >= want.nbytes  # every page read in
    t[5, :] = 7.0  # copy-on-write: this page is now private memory
    assert drop_mapped_pages(path) > 0
    assert resident(path) < want.nbytes // 8
    assert torch.equal(t[5], torch.full((2048,), 7.0, dtype=torch.half))  # the written page is kept
    assert torch.equal(t[:5], want[:5]) and torch.equal(t[6:], want[6:])  # the others read back from the file
    assert drop_mapped_pages(tmp_path / "missing.safetensors") == 0 and drop_mapped_pages(None) == 0


def test_txt2img_leaves_the_model_file_mostly_non_resident_with_the_same_image(tmp_path, monkeypatch):
    """--low-memory (weights kept as stored, memory-mapped): after txt2img the text encoder's and the UNet's pages
    are no longer resident, and the image equals the one made without dropping them."""
    src = random_model("sd1", tmp_path / "sd1.safetensors")
    b32 = load_model(str(src))
    path = tmp_path / "half.safetensors"
    from latentgen.loading.bundle import save_model

    save_model(path, b32.config, b32.unet.half(), b32.first_stage.half(), b32.cond.half())
    st = Settings(steps=2, sampler="euler")
    bundle = load_model(str(path), low_memory=True)
    run = lambda: pipelines.txt2img(bundle, ["a cat"], ["blurry"], [3], 32, 32, st)  # noqa: E731
    size = os.path.getsize(path)
    img = run()
    decoder = sum(
        p.nbytes for m in (bundle.first_stage.decoder, bundle.first_stage.post_quant_conv) for p in m.parameters()
    )
    assert resident(path) < decoder + size // 10  # the decoder's pages, read last
    monkeypatch.setattr(pipelines, "drop_mapped_pages", lambda path: 0)
    assert torch.equal(run(), img)
    assert resident(path) > size // 2  # without dropping, the UNet's and the text encoder's pages stay


def test_low_memory_unet_holds_only_the_running_blocks_pages(tmp_path, monkeypatch):
    """--low-memory: each UNet block's memory-mapped pages are handed back once it has run, so while the UNet runs
    the file's resident pages stay near one block's weights (not the whole UNet's); the output is unchanged, and a
    second call maps the pages again."""
    import dataclasses

    from tiny_models import tiny_config

    from latentgen.loading import mapped_pages
    from latentgen.loading.bundle import build_modules, save_model

    cfg = tiny_config("sd1")
    cfg.unet = dataclasses.replace(cfg.unet, model_channels=192)  # blocks of MBs: edge pages are a small part
    torch.manual_seed(0)
    unet, fs, cond = build_modules(cfg)
    path = tmp_path / "half.safetensors"
    save_model(path, cfg, unet.half(), fs.half(), cond.half())
    bundle = load_model(str(path), low_memory=True)
    unet = bundle.unet
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    block_bytes = [sum(p.nbytes for p in b.parameters()) for b in blocks]
    unet_bytes = sum(p.nbytes for p in unet.parameters())
    outside = unet_bytes - sum(block_bytes)  # time embedding, first and last layers: they run outside the blocks
    seen, drop = [], mapped_pages.drop_module_pages
    monkeypatch.setattr(mapped_pages, "drop_module_pages", lambda m, p: (seen.append(resident(path)), drop(m, p))[1])
    drop_mapped_pages(path)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, ctx = torch.tensor([500, 500]), torch.randn(2, 77, bundle.config.unet.context_dim)
    with torch.no_grad():
        out = unet(x, t, ctx)
        seen_first = list(seen)
        again = unet(x, t, ctx)
    bound = max(block_bytes) + outside + len(blocks) * (128 << 10)  # + what fault-around maps in at block edges
    assert len(seen_first) == len(blocks) and len(seen) == 2 * len(blocks)
    assert max(seen) <= bound < 0.6 * unet_bytes
    assert torch.equal(out, again)
    monkeypatch.setattr(mapped_pages, "drop_module_pages", lambda m, p: 0)
    with torch.no_grad():
        kept = unet(x, t, ctx)
    assert torch.equal(out, kept)
    assert resident(path) > unet_bytes // 2  # without handing back, the whole UNet's pages stay resident
