"""The FAISS item index: exact and IVF search, deltas, versioned files, double buffering.
Real FAISS throughout."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from common.infra.settings_groups import IndexSettings
from publisher.index_store import (
    DeltaGapError,
    IndexCorruptError,
    IndexStore,
    IndexStoreError,
    VersionNotFoundError,
)
from publisher.item_index import DoubleBufferedIndex, ItemIndex, faiss_ids

DIM = 16
# Small corpora take the IVF path here; nprobe above nlist makes IVF search every list,
# so its results must equal brute force exactly.
EXHAUSTIVE_IVF = IndexSettings(exact_max_items=1000, ivf_nprobe=100_000)


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_vectors(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors around random unit centres; ``spread`` 0.9 puts them at cosine ~0.74."""
    rng = np.random.default_rng(seed)
    centres = unit_vectors(clusters, dim, seed + 1)
    x = centres[rng.integers(0, clusters, n)]
    x = x + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def names_of(n: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def brute_force(items: dict[str, np.ndarray], queries: np.ndarray, k: int) -> list[list[str]]:
    names = list(items)
    scores = queries @ np.stack([items[n] for n in names]).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[names[j] for j in row] for row in order]


def result_names(results: list[list[tuple[str, float]]]) -> list[list[str]]:
    return [[name for name, _ in row] for row in results]


def test_faiss_ids_are_stable_and_non_negative() -> None:
    ids = faiss_ids(["a", "b", "a"])
    assert ids.dtype == np.int64 and (ids >= 0).all()
    assert ids[0] == ids[2] != ids[1]


def test_exact_index_equals_brute_force() -> None:
    x = unit_vectors(5000)
    index = ItemIndex.build("v1", names_of(5000), x, IndexSettings())
    queries = unit_vectors(30, seed=1)
    results = index.search(queries, 10)
    assert isinstance(index.index, faiss.IndexIDMap2)
    expected = brute_force(dict(zip(names_of(5000), x, strict=True)), queries, 10)
    assert result_names(results) == expected
    np.testing.assert_allclose([s for _, s in results[0]],
                               np.sort(queries[0] @ x.T)[::-1][:10], rtol=1e-5)


def test_ivf_above_exact_max_items_keeps_recall_at_100() -> None:
    x = clustered_vectors(120_200, 32, clusters=500, spread=0.9, seed=0)
    items, queries = x[:120_000], x[120_000:]
    started = time.perf_counter()
    index = ItemIndex.build("v1", names_of(120_000), items, IndexSettings())
    print(f"IVF build of 120k x 32: {time.perf_counter() - started:.2f} s")
    assert isinstance(index.index, faiss.IndexIVFFlat)
    assert (index.index.nlist, index.index.nprobe) == (1024, 256)
    exact = faiss.IndexFlatIP(32)
    exact.add(items)
    _, truth = exact.search(queries, 100)
    found = result_names(index.search(queries, 100))
    recall = np.mean([len({f"item{j}" for j in t} & set(f)) / 100
                      for t, f in zip(truth, found, strict=True)])
    print(f"recall@100 at the default nprobe: {recall:.3f}")
    assert recall >= 0.95


def test_the_build_sweeps_nprobe_to_the_fewest_lists_that_reach_the_target_recall(
        tmp_path: Path) -> None:
    s = IndexSettings(exact_max_items=1000, target_recall=0.95)
    x = clustered_vectors(20_400, DIM, clusters=200, spread=1.2, seed=3)
    items, tune, held_out = x[:20_000], x[20_000:20_200], x[20_200:]
    store = IndexStore(tmp_path, s)
    built = store.write_full("v1", names_of(20_000), items, tune)
    search = built.search_meta
    assert search["nprobe_from"] == "sweep" and search["nprobe"] == built.index.nprobe
    tried = [t["recall_at_100"] for t in search["tried"]]
    # The first value of the ladder that reaches the target, and no earlier one did.
    assert tried[-1] >= 0.95 and all(r < 0.95 for r in tried[:-1])
    assert search["nprobe"] < built.index.nlist // 4  # fewer than the old quarter rule
    exact = faiss.IndexFlatIP(DIM)
    exact.add(items)
    _, truth = exact.search(held_out, 100)
    found = result_names(built.search(held_out, 100))
    recall = np.mean([len({f"item{j}" for j in t} & set(f)) / 100
                      for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.93, "queries the sweep did not see find about as much"
    # Kept in meta.json: a reload (serving, the stream) searches as many lists, unless the
    # operator sets RECSTREAM_INDEX_IVF_NPROBE, which wins.
    loaded, _ = IndexStore(tmp_path, s).load("v1")
    assert loaded.index.nprobe == search["nprobe"] and loaded.search_meta == search
    forced, _ = IndexStore(tmp_path, IndexSettings(exact_max_items=1000, ivf_nprobe=7)).load("v1")
    assert forced.index.nprobe == 7 and forced.search_meta["nprobe_from"] == "setting"
    # Without queries to sweep with, the quarter rule stands.
    plain = ItemIndex.build("v2", names_of(20_000), items, s)
    assert plain.index.nprobe == plain.index.nlist // 4


@pytest.mark.parametrize("settings", [IndexSettings(), EXHAUSTIVE_IVF], ids=["flat", "ivf"])
def test_apply_replaces_moved_items_and_adds_new_ones(settings: IndexSettings) -> None:
    items = dict(zip(names_of(3000), unit_vectors(3000), strict=True))
    index = ItemIndex.build("v1", list(items), np.stack(list(items.values())), settings)
    moved, new = names_of(300), names_of(200, "new")
    delta = unit_vectors(500, seed=2)
    index.apply(moved + new, delta)
    index.apply(moved + new, delta)  # at-least-once delivery: a repeat changes nothing
    items.update(zip(moved + new, delta, strict=True))
    queries = np.concatenate([delta[:20], unit_vectors(20, seed=3)])
    results = result_names(index.search(queries, 20))
    assert len(index) == 3200 == len(index.names)
    assert results == brute_force(items, queries, 20)
    assert [row.count(name) for row, name in zip(results, moved[:20], strict=False)] == [1] * 20


@pytest.mark.parametrize("settings", [IndexSettings(), EXHAUSTIVE_IVF], ids=["flat", "ivf"])
def test_vectors_read_back_by_name_with_deltas_and_absent_items(
        settings: IndexSettings) -> None:
    names, x = names_of(2000), unit_vectors(2000)
    index = DoubleBufferedIndex(ItemIndex.build("v1", names, x, settings))
    moved = unit_vectors(2, seed=5)
    index.update([names[7], "new"], moved)
    index.update([names[7], "new"], moved)  # a repeated delta changes nothing
    found, got = index.vectors([names[3], "absent", names[7], "new", names[3]])
    assert found.tolist() == [True, False, True, True, True]
    assert np.array_equal(got, np.stack([x[3], np.zeros(DIM), moved[0], moved[1], x[3]]))
    assert index.vectors([])[0].shape == (0,)


def test_repeated_name_in_one_delta_keeps_the_last_vector() -> None:
    index = ItemIndex.build("v1", ["a", "b"], np.eye(2, dtype=np.float32), IndexSettings())
    index.apply(["a", "a"], np.array([[0.0, 1.0], [1.0, 0.0]], np.float32))
    assert len(index) == 2
    assert index.search(np.array([[1.0, 0.0]], np.float32), 2)[0][0] == ("a", 1.0)


def test_search_drops_missing_results_when_k_exceeds_items() -> None:
    index = ItemIndex.build("v1", ["a", "b"], np.eye(2, dtype=np.float32), EXHAUSTIVE_IVF)
    assert result_names(index.search(np.eye(2, dtype=np.float32), 5)) == [["a", "b"], ["b", "a"]]


@pytest.fixture
def store(tmp_path: Path) -> IndexStore:
    return IndexStore(tmp_path / "indexes", IndexSettings(snapshot_every_deltas=3))


def deltas(count: int, seed: int = 10) -> list[tuple[list[str], np.ndarray]]:
    """Each delta moves 50 existing items and adds 10 new ones."""
    return [(names_of(50) + names_of(10, f"new{i}-"), unit_vectors(60, seed=seed + i))
            for i in range(count)]


def same_results(a: ItemIndex, b: ItemIndex) -> bool:
    queries = unit_vectors(20, seed=99)
    return len(a) == len(b) and a.search(queries, 10) == b.search(queries, 10)


def test_load_applies_stored_deltas_like_memory(store: IndexStore) -> None:
    memory = store.write_full("v1", names_of(1000), unit_vectors(1000))
    for names, vectors in deltas(3):
        store.append_delta("v1", names, vectors)
        memory.apply(names, vectors)
    loaded, seq = store.load("v1")
    assert seq == 3 and loaded.version == "v1"
    assert same_results(loaded, memory)


def test_load_after_snapshot_and_more_deltas_equals_memory(store: IndexStore) -> None:
    memory = store.write_full("v1", names_of(1000), unit_vectors(1000))
    for names, vectors in deltas(5):
        seq = store.append_delta("v1", names, vectors)
        memory.apply(names, vectors)
        if store.snapshot_due("v1", seq):
            store.snapshot(memory, seq)
    loaded, seq = store.load("v1")
    assert seq == 5 and [s for s, _, _ in store.deltas_since("v1", 3)] == [4, 5]
    assert same_results(loaded, memory)


def test_sequence_numbers_survive_a_restart(store: IndexStore) -> None:
    store.write_full("v1", names_of(100), unit_vectors(100))
    store.append_delta("v1", *deltas(1)[0])
    restarted = IndexStore(store.root, store.s)
    assert restarted.append_delta("v1", *deltas(1)[0]) == 2


def test_reader_behind_two_snapshots_gets_a_gap_error(store: IndexStore) -> None:
    memory = store.write_full("v1", names_of(100), unit_vectors(100))
    for names, vectors in deltas(4):
        seq = store.append_delta("v1", names, vectors)
        memory.apply(names, vectors)
        if seq in (2, 4):
            store.snapshot(memory, seq)
    assert [s for s, _, _ in store.deltas_since("v1", 2)] == [3, 4]  # one generation kept
    with pytest.raises(DeltaGapError, match="load the version again"):
        store.deltas_since("v1", 1)
    assert not (store.root / "v1" / "index.faiss").exists()


def test_corrupt_index_file_is_refused(store: IndexStore) -> None:
    store.write_full("v1", names_of(100), unit_vectors(100))
    path = store.root / "v1" / "index.faiss"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="index.faiss does not match its checksum") as err:
        store.load("v1")
    assert isinstance(err.value, IndexStoreError)


def test_crashed_staging_dir_is_invisible_and_harmless(store: IndexStore) -> None:
    memory = store.write_full("v1", names_of(100), unit_vectors(100))
    staging = store.root / f".staging-v2-{'0' * 32}"
    staging.mkdir()
    (staging / "index.faiss").write_bytes(b"half")
    (store.root / "v3").mkdir()  # a directory without meta.json is not a version either
    assert store.versions() == ["v1"]
    assert same_results(store.load("v1")[0], memory)
    store.write_full("v2", names_of(10), unit_vectors(10))
    assert store.versions() == ["v1", "v2"] and not staging.exists()


def test_write_full_replaces_an_existing_version(store: IndexStore) -> None:
    store.write_full("v1", names_of(100), unit_vectors(100))
    store.append_delta("v1", *deltas(1)[0])
    rewritten = store.write_full("v1", names_of(50, "other"), unit_vectors(50, seed=5))
    loaded, seq = store.load("v1")
    assert seq == 0 and same_results(loaded, rewritten)
    assert store.append_delta("v1", *deltas(1)[0]) == 1


def test_missing_version_says_which_exist(store: IndexStore) -> None:
    store.write_full("v1", names_of(10), unit_vectors(10))
    with pytest.raises(VersionNotFoundError, match=r"'v9'.*\['v1'\]"):
        store.load("v9")


def test_remove_deletes_a_version(store: IndexStore) -> None:
    store.write_full("v1", names_of(10), unit_vectors(10))
    store.remove("v1")
    assert store.versions() == [] and not store.exists("v1")
    with pytest.raises(VersionNotFoundError):
        store.remove("v1")


def probe_vector(state: int) -> np.ndarray:
    """A vector whose score against the first axis identifies the update that wrote it."""
    c = 0.95 + 0.0009 * state
    v = np.zeros(DIM, np.float32)
    v[:2] = c, np.sqrt(1 - c * c)
    return v


def test_loads_during_snapshots_see_a_consistent_state(store: IndexStore) -> None:
    memory = store.write_full("v1", names_of(200) + ["probe"],
                              np.vstack([unit_vectors(200), probe_vector(0)]))
    query = np.eye(1, DIM, dtype=np.float32)
    done, seen = threading.Event(), []

    def write() -> None:
        for state in range(1, 31):
            seq = store.append_delta("v1", ["probe"], probe_vector(state)[None])
            memory.apply(["probe"], probe_vector(state)[None])
            store.snapshot(memory, seq)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    while not done.is_set():
        loaded, seq = store.load("v1")
        seen.append((seq, loaded.search(query, 1)[0][0]))
    writer.join()
    assert len(seen) > 1
    assert all(top == ("probe", float(probe_vector(seq)[0])) for seq, top in seen)


def test_double_buffered_searches_see_whole_updates_while_updating() -> None:
    names = names_of(20_000) + ["probe"]
    served = DoubleBufferedIndex(
        ItemIndex.build("v1", names, np.vstack([unit_vectors(20_000), probe_vector(0)]),
                        IndexSettings()))
    query = np.eye(1, DIM, dtype=np.float32)
    valid = {float(probe_vector(state)[0]): state for state in range(51)}
    done, errors = threading.Event(), []
    seen: list[list[int]] = [[] for _ in range(4)]

    def search(log: list[int]) -> None:
        try:
            while not done.is_set():
                name, score = served.search(query, 5)[0][0]
                assert name == "probe" and score in valid
                log.append(valid[score])
        except Exception as exc:  # reported to the test thread
            errors.append(exc)

    searchers = [threading.Thread(target=search, args=(log,)) for log in seen]
    for t in searchers:
        t.start()
    for state in range(1, 51):
        moved = names_of(20, prefix="item")
        served.update(moved + ["probe"],
                      np.vstack([unit_vectors(20, seed=state), probe_vector(state)]), seq=state)
    done.set()
    for t in searchers:
        t.join(timeout=10)
    assert errors == [] and all(log for log in seen)
    assert all(log == sorted(log) for log in seen)  # never back to an older state
    assert served.seq == 50
    first, second = served.replicas
    assert first.names == second.names and same_results(first, second)
    assert served.search(query, 1)[0][0] == ("probe", float(probe_vector(50)[0]))
