"""Loading safetensors to a real GPU (marked ``gpu``; skipped where no CUDA device is usable):
torch tensors on the device, dtypes as stored (bf16 and fp8 too), equal to safetensors' own."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiopinned import PinnedPool, load_safetensors, stream_safetensors
from aiopinned.loader._reader import drop_page_cache

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")
pytestmark = [pytest.mark.gpu, pytest.mark.asyncio]


def checkpoint(tmp: Path) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "embed": torch.randn(1000, 77, generator=g).to(torch.bfloat16),
        "odd": torch.arange(3, dtype=torch.uint8),  # (puts what follows at unaligned offsets)
        "norm": torch.randn(77, generator=g, dtype=torch.float32),
        "fp8": torch.randn(64, 33, generator=g).to(torch.float8_e4m3fn),
        "half": torch.randn(5, 7, generator=g).to(torch.float16),
        "empty": torch.empty(0, 4),
        "ids": torch.arange(-50, 50, dtype=torch.int64),
        "big": torch.randn(2048, 1024, generator=g),  # 8 MiB: several chunks
    }
    st.save_file(dict(list(tensors.items())[:5]), tmp / "a.safetensors")
    st.save_file(dict(list(tensors.items())[5:]), tmp / "b.safetensors")
    return tensors


async def test_a_checkpoint_loads_to_the_gpu_equal_to_safetensors(tmp_path: Path) -> None:
    expected = checkpoint(tmp_path)
    for cold in (False, True):
        if cold:
            drop_page_cache([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
        got = await load_safetensors(tmp_path, "cuda", chunk_bytes=1 << 20, max_bytes=4 << 20)
        assert got.keys() == expected.keys()
        for name, want in expected.items():
            have = got[name]
            assert have.device.type == "cuda" and have.dtype == want.dtype, name
            assert have.shape == want.shape, name
            assert torch.equal(have.cpu().view(torch.uint8), want.view(torch.uint8)), name
        if cold:
            assert got.report.direct_bytes > 0
    ref = st.load_file(tmp_path / "b.safetensors", device="cuda")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


async def test_streamed_tensors_are_ready_when_yielded_and_the_pool_ends_quiet(
    tmp_path: Path,
) -> None:
    expected = checkpoint(tmp_path)
    async with PinnedPool("cuda", max_bytes=2 << 20) as pool:
        async for name, tensor in stream_safetensors(tmp_path, 0, pool=pool, chunk_bytes=1 << 20):
            # no synchronize: a yielded tensor's copies have ended
            assert torch.equal(tensor.cpu().view(torch.uint8), expected[name].view(torch.uint8))
        await pool.synchronize(None)
        s = pool.stats()
        assert s.active_bytes == 0 and s.peak_reserved_bytes <= 2 << 20
