"""The teacher's top-k cache on disk (distill.data.teacher_cache): both codecs against the exact top-k
of fresh random logits, the shards a writer leaves (complete, resumable, refused when corrupt), and
the cached loss against the full one."""

import pytest
import torch
import torch.nn.functional as F

from distill.data.teacher_cache import CacheLayout, CacheWriter, TeacherCache, decode_block, encode_block, shard_path
from distill.errors import DistillError
from distill.losses import TopK, other_tokens_logp, topk_divergence
from distill.sections import CacheCodec


def random_topk(positions: int, vocab: int, k: int, seed: int, spread: float = 3.0) -> tuple[TopK, torch.Tensor]:
    """(TopK of log-softmax of random logits, the logits): peaked like a language model's."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(positions, vocab, generator=generator) * spread
    top = F.log_softmax(logits, -1).topk(k, dim=-1)
    return TopK(top.values, top.indices), logits


def layout(blocks: int, positions: int, k: int, vocab: int, codec: CacheCodec, shard_blocks: int) -> CacheLayout:
    return CacheLayout(blocks=blocks, positions=positions, k=k, vocab=vocab, codec=codec.value, shard_blocks=shard_blocks)


@pytest.mark.parametrize("vocab", [49152, 70000])  # uint16 gaps; uint32 above 65,536 tokens
def test_the_compact_codec_keeps_the_ids_and_the_log_probabilities_within_half_a_step(vocab):
    k, positions = 128, 64
    topk, _ = random_topk(positions, vocab, k, seed=vocab)
    shape = layout(1, positions, k, vocab, CacheCodec.COMPACT, 1)
    decoded = decode_block(encode_block(topk, CacheCodec.COMPACT, vocab), shape)
    ids, order = topk.index.sort(-1)
    assert torch.equal(decoded.index, ids), "every position's ids, in ascending order"
    step = -topk.logp.min(-1).values / 255
    error = (decoded.logp - topk.logp.gather(-1, order)).abs()
    assert bool((error <= step[:, None] * 0.51 + 1e-3).all()), float(error.max())
    assert torch.allclose(decoded.rest, other_tokens_logp(topk.logp), rtol=2e-3, atol=1e-4)


def test_the_exact_codec_is_bitwise_in_float16_and_int32():
    topk, _ = random_topk(32, 1000, 16, seed=1)
    shape = layout(1, 32, 16, 1000, CacheCodec.EXACT, 1)
    decoded = decode_block(encode_block(topk, CacheCodec.EXACT, 1000), shape)
    assert torch.equal(decoded.logp, topk.logp.half().float()) and torch.equal(decoded.index, topk.index)
    assert decoded.rest is None


def test_the_compact_cache_gives_the_divergence_of_the_exact_one_within_half_a_percent():
    """The loss distill computes from each codec, for a student near the teacher and one far from it."""
    vocab, k, positions = 8192, 128, 256
    topk, teacher_logits = random_topk(positions, vocab, k, seed=7)
    compact = decode_block(encode_block(topk, CacheCodec.COMPACT, vocab), layout(1, positions, k, vocab, CacheCodec.COMPACT, 1))
    exact = decode_block(encode_block(topk, CacheCodec.EXACT, vocab), layout(1, positions, k, vocab, CacheCodec.EXACT, 1))
    for noise in (0.5, 2.0):
        student = teacher_logits + noise * torch.randn(positions, vocab, generator=torch.Generator().manual_seed(3))
        for kind in ("forward_kl", "reverse_kl", "jsd"):
            loss_exact = float(topk_divergence(student, exact, kind).mean())
            loss_compact = float(topk_divergence(student, compact, kind).mean())
            assert loss_compact == pytest.approx(loss_exact, rel=5e-3), (noise, kind)


def write_cache(directory, codec: CacheCodec, blocks: int = 7, shard_blocks: int = 3):
    shape = layout(blocks, 16, 8, 500, codec, shard_blocks)
    tops = {block: random_topk(16, 500, 8, seed=block)[0] for block in range(blocks)}
    writer = CacheWriter(directory, shape)
    writer.start(True)
    for shard in range(shape.shards):
        writer.write_shard(shard, {block: tops[block] for block in shape.shard_range(shard)})
    return writer, tops


@pytest.mark.parametrize("codec", list(CacheCodec))
def test_shards_hold_their_blocks_and_a_reader_returns_any_blocks_in_order(tmp_path, codec):
    writer, tops = write_cache(tmp_path / "topk", codec)
    assert sorted(path.name for path in (tmp_path / "topk").glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert all(writer.complete(shard) for shard in range(3))
    cache = TeacherCache(tmp_path / "topk")
    cache.check(7, 16, 8)
    batch = cache.blocks(torch.tensor([6, 0, 4]))
    assert batch.logp.shape == batch.index.shape == (3, 16, 8)
    for row, block in enumerate([6, 0, 4]):
        ids, order = tops[block].index.sort(-1)
        assert torch.equal(batch.index[row].sort(-1).values, ids)
        assert torch.allclose(batch.logp[row].gather(-1, batch.index[row].argsort(-1)), tops[block].logp.gather(-1, order),
                              atol=0.05)


def test_a_resumed_writer_keeps_complete_shards_and_redoes_a_torn_one(tmp_path):
    directory = tmp_path / "topk"
    writer, _ = write_cache(directory, CacheCodec.COMPACT)
    torn = shard_path(directory, 1)
    torn.write_bytes(torn.read_bytes()[:100])  # as a disk full or a kill outside the atomic rename would leave it
    assert [writer.complete(shard) for shard in range(3)] == [True, False, True]
    shard_path(directory, 2).unlink()
    assert not writer.complete(2)


@pytest.mark.parametrize("codec", list(CacheCodec))
def test_a_changed_byte_in_a_block_is_found_by_its_checksum_as_it_is_read(tmp_path, codec):
    """The run's manifest records the shards by size alone (distill.run.checksums): a block's own
    CRC-32 finds bytes changed in place, in either codec, and names the shard."""
    directory = tmp_path / "topk"
    write_cache(directory, codec)
    shard = shard_path(directory, 2)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55  # inside the last block's tensors, the size kept
    shard.write_bytes(bytes(data))
    cache = TeacherCache(directory)
    assert cache.block(0).logp.shape == (16, 8), "the other shards read as written"
    with pytest.raises(DistillError, match="corrupt teacher cache shard .*shard-00002.safetensors"):
        cache.blocks([6])


def test_a_corrupt_or_missing_shard_and_another_layout_are_refused_in_one_line(tmp_path):
    directory = tmp_path / "topk"
    write_cache(directory, CacheCodec.COMPACT)
    cache = TeacherCache(directory)
    with pytest.raises(DistillError, match="holds 7 blocks of 16 positions at k=8, this run trains on 7 of 16 at k=4"):
        cache.check(7, 16, 4)
    shard = shard_path(directory, 1)
    data = bytearray(shard.read_bytes())
    data[-40:] = bytes(40)  # the end of the last block's compressed bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(DistillError, match="corrupt teacher cache shard .*shard-00001.safetensors"):
        cache.block(5)
    shard.unlink()
    with pytest.raises(DistillError, match="lacks 1 of its 3 shards"):
        cache.check(7, 16, 8)
    other = CacheWriter(directory, layout(7, 16, 8, 500, CacheCodec.EXACT, 3))
    with pytest.raises(DistillError, match="describes another cache"):
        other.start(True)
