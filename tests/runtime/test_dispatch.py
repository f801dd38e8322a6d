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
    assert table.choose(4096, 4096, 1, on_gpu=False) == "reference"


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
    assert table.entry(4096, 4096, 3, on_gpu=False) == {"path": "reference"}
