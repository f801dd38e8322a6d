import pytest

from distill.errors import DistillError
from distill.runtime.dispatch import CrossoverTable


def test_table_from_timings_picks_the_fastest_path_and_dense_where_sparse_loses():
    timings = {"4096x4096": {
        1: {"dense": 10.0, "triton": 6.0, "cusparselt": 14.0},
        16: {"dense": 10.0, "triton": 6.5, "cusparselt": 12.0},
        256: {"dense": 20.0, "triton": 21.0, "cusparselt": 19.5},  # 1.03x: not worth it with min_gain 1.05
        2048: {"dense": 100.0, "triton": 150.0, "cusparselt": 70.0},
        8192: {"dense": 400.0, "triton": 600.0, "cusparselt": 270.0},
    }}
    table = CrossoverTable.from_timings("H100", timings, min_gain=1.05)
    assert table.shapes["4096x4096"] == [
        {"max_m": 16, "path": "triton"}, {"max_m": 256, "path": "dense"}, {"max_m": None, "path": "cusparselt"}]
    assert [table.choose(4096, 4096, m) for m in (1, 16, 17, 256, 257, 100000)] == \
        ["triton", "triton", "dense", "dense", "cusparselt", "cusparselt"]
    assert table.choose(1024, 4096, 1) == "dense", "an unmeasured shape stays dense"
    # a CPU takes the shipped default table where a GPU table says nothing for it
    assert [table.choose(4096, 4096, m, on_gpu=False) for m in (1, 16, 17)] == ["cpu_kernel", "cpu_kernel", "cpu_unpack"]


def test_table_round_trips_and_bad_tables_are_clear_errors(tmp_path):
    table = CrossoverTable("H100", {"8x32": [{"max_m": 4, "path": "triton"}, {"max_m": None, "path": "dense"}]})
    table.save(tmp_path / "t.json")
    assert CrossoverTable.load(tmp_path / "t.json") == table
    (tmp_path / "bad.json").write_text('{"shapes": {"8x32": [{"max_m": 4, "path": "magic"}]}}')
    with pytest.raises(DistillError, match="unknown path 'magic'"):
        CrossoverTable.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DistillError, match="not valid JSON"):
        CrossoverTable.load(tmp_path / "broken.json")
    with pytest.raises(DistillError, match="crossover table not found"):
        CrossoverTable.load(tmp_path / "none.json")


def test_triton_entries_carry_their_fastest_tiles_and_split_where_tiles_differ():
    timings = {"4096x4096": {m: {"dense": 10.0, "triton": 5.0, "cusparselt": 20.0} for m in (1, 4, 16, 64)}}
    tiles = {"4096x4096": {1: [16, 32, 128, 4, 3], 4: [16, 32, 128, 4, 3], 16: [16, 64, 128, 4, 4],
                           64: [32, 64, 128, 4, 3]}}
    table = CrossoverTable.from_timings("H100", timings, tiles=tiles)
    assert table.shapes["4096x4096"] == [
        {"max_m": 4, "path": "triton", "tiles": [16, 32, 128, 4, 3]},
        {"max_m": 16, "path": "triton", "tiles": [16, 64, 128, 4, 4]},
        {"max_m": None, "path": "triton", "tiles": [32, 64, 128, 4, 3]}]
    assert table.entry(4096, 4096, 10)["tiles"] == [16, 64, 128, 4, 4]
    assert table.entry(4096, 4096, 3, on_gpu=False)["path"] == "cpu_kernel"


def test_sparse_input_paths_are_chosen_at_decode_sizes_only_and_a_table_saying_otherwise_is_refused(tmp_path):
    timings = {"64x128": {1: {"dense": 10.0, "triton": 6.0, "sparse_input_24": 4.0},
                          16: {"dense": 10.0, "triton": 6.0, "sparse_input": 5.0},
                          64: {"dense": 10.0, "triton": 8.0, "sparse_input": 1.0}}}  # never at M > 16
    table = CrossoverTable.from_timings("H200", timings)
    assert [table.choose(64, 128, m) for m in (1, 16, 64)] == ["sparse_input_24", "sparse_input", "triton"]
    (tmp_path / "wide.json").write_text('{"shapes": {"64x128": [{"max_m": null, "path": "sparse_input"}]}}')
    with pytest.raises(DistillError, match="serves decode only"):
        CrossoverTable.load(tmp_path / "wide.json")


@pytest.mark.parametrize("path", ["sparse_input", "sparse_input_24"])
def test_a_2_4_projection_on_a_sparse_input_path_computes_the_dense_product(path):
    """Sparse24Linear through the dispatcher (CPU tensors take table paths in Triton's interpreter)."""
    import torch

    from conftest import random_2_4_weight
    from distill.runtime.linear import Sparse24Linear

    torch.manual_seed(11)
    weight, bias = random_2_4_weight(48, 64), torch.randn(48)
    layer = Sparse24Linear.from_dense(weight, bias, "probe", layout="gpu", table=CrossoverTable("cpu", {"48x64": [
        {"max_m": 16, "path": path}, {"max_m": None, "path": "dense"}]}))
    x = torch.randn(2, 3, 64)
    x[..., torch.rand(64) < 0.5] = 0
    expected = x.double() @ weight.double().T + bias.double()
    actual = layer(x)
    assert layer.kernel_path(x) == path
    assert float((actual.double() - expected).norm() / expected.norm()) < 1e-5
    assert layer.kernel_path(torch.randn(40, 64)) == "dense"
