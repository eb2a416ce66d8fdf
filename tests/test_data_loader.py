"""common.data on real shard files: format checks, sample order, world-size independence (in one
process and in a real 2-process gloo group), exact resume, dynamic expansion, validation windows."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lz4.frame
import numpy as np
import pytest
import torch
from runs import REPO, SRC, env

from common.data import DatasetIndex, ShardedTrainLoader, ValReader
from common.errors import UserError
from common.shards import LLAMA3_LAYOUT, read_meta, read_shard, read_shard_header, write_meta, write_shard

torch.set_num_threads(1)

T = 16  # block size for the hand-made datasets
SEED = 1234


def make_dataset(directory: Path, train: tuple[int, ...] = (1500, 1100, 1700), val: tuple[int, ...] = (900,),
                 compress: bool = True, meta: bool = True, seed: int = 0, prefix: str = "") -> Path:
    """Shards of random tokens (so every window is unique) plus a meta.json like prepare_data's."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for split, sizes in (("val", val), ("train", train)):
        for i, n in enumerate(sizes):
            name = f"{prefix}{split}_{i:06d}.bin" + (".lz4" if compress else "")
            entry = write_shard(directory / name, rng.integers(0, 50257, n, dtype=np.uint16))
            entries.append({**entry, "split": split})
    if meta:
        write_meta(directory, {"format_version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256,
                               "source": "test", "shards": entries, "complete": True,
                               "expected_train_tokens": sum(train)})
    return directory


def add_train_shard(directory: Path, tokens: int, seed: int) -> str:
    """Append a shard the way a still-running prepare_data.py does: file first, then meta.json."""
    meta = read_meta(directory)
    number = sum(e["split"] == "train" for e in meta["shards"])
    tokens_arr = np.random.default_rng(seed).integers(0, 50257, tokens, dtype=np.uint16)
    entry = write_shard(directory / f"train_{number:06d}.bin.lz4", tokens_arr)
    meta["shards"].append({**entry, "split": "train"})
    write_meta(directory, meta)
    return entry["file"]


def all_windows(directory: Path, block: int = T) -> Counter:
    """Every train window (block + 1 tokens, stride block) of the directory, as bytes."""
    out: Counter = Counter()
    for shard in DatasetIndex.open(directory).train_shards:
        tokens = np.asarray(read_shard(directory / shard.file), dtype=np.int64)
        for w in range(shard.windows(block)):
            out[tokens[w * block: w * block + block + 1].tobytes()] += 1
    return out


def global_steps(data_dir: Path, batch: int, accum: int, world: int, steps: int, block: int = T,
                 state: dict | None = None, seed: int = SEED) -> tuple[list[np.ndarray], list[dict]]:
    """Simulated ranks in one process: each step's samples in (micro-step, rank) order, and the states."""
    loaders = [ShardedTrainLoader(data_dir, block_size=block, micro_batch_size=batch, grad_accum_steps=accum,
                                  rank=r, world_size=world, seed=seed) for r in range(world)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        rows = []
        for _m in range(accum):
            for loader in loaders:
                x, y = loader.next_batch()
                assert x.shape == (batch, block) and x.dtype == torch.int64
                assert torch.equal(x[:, 1:], y[:, :-1])
                rows.append(torch.cat([x, y[:, -1:]], dim=1))
        out.append(torch.cat(rows).numpy())
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    return out, states


def window_keys(step_arrays: list[np.ndarray]) -> list[bytes]:
    return [row.tobytes() for arr in step_arrays for row in arr.astype(np.int64)]


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "tiny")


# ----------------------------------------------------------------------------- format


def test_shard_round_trip_and_header_checks(tmp_path: Path) -> None:
    tokens = np.random.default_rng(1).integers(0, 65535, 5000, dtype=np.uint16)
    for name in ("a.bin", "a.bin.lz4"):
        entry = write_shard(tmp_path / name, tokens)
        assert entry["tokens"] == 5000 and read_shard_header(tmp_path / name).tokens == 5000
        assert np.array_equal(read_shard(tmp_path / name), tokens)
    assert write_shard(tmp_path / "b.bin", tokens)["tokens_sha256"] == entry["tokens_sha256"]
    raw = (tmp_path / "a.bin").read_bytes()
    assert lz4.frame.decompress((tmp_path / "a.bin.lz4").read_bytes()) == raw
    assert not list(tmp_path.glob(".*"))  # no temporaries left behind

    cases = {
        "short.bin": raw[:-2],  # one token missing
        "tiny.bin": raw[:100],  # not even a header
        "foreign.bin": b"\x7fELF" + raw[4:],
        "v2.bin": raw[:4] + np.int32(2).tobytes() + raw[8:],
        "cut.bin.lz4": lz4.frame.compress(raw, store_size=True)[:-200],
        "junk.bin.lz4": b"not an lz4 frame at all",
    }
    messages = {"short.bin": "truncated", "tiny.bin": "truncated", "foreign.bin": "not a token shard",
                "v2.bin": "version 2", "cut.bin.lz4": "truncated or corrupt", "junk.bin.lz4": "LZ4"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as err:
            read_shard(tmp_path / name)
        assert name in str(err.value) and messages[name] in str(err.value), str(err.value)


def test_uint32_shards_in_llama3_layout(tmp_path: Path) -> None:
    tokens = np.random.default_rng(2).integers(0, 200_000, 5000).astype(np.uint32)
    with pytest.raises(ValueError, match="do not fit the gpt-2 shard format"):
        write_shard(tmp_path / "narrow.bin", tokens)  # never wrapped into 16 bits
    for name in ("w.bin", "w.bin.lz4"):
        entry = write_shard(tmp_path / name, tokens, LLAMA3_LAYOUT)
        header = read_shard_header(tmp_path / name)
        assert (header.tokens, header.layout) == (5000, LLAMA3_LAYOUT)
        assert read_shard(tmp_path / name).dtype == np.uint32
        assert np.array_equal(read_shard(tmp_path / name), tokens)
    raw = (tmp_path / "w.bin").read_bytes()
    assert np.frombuffer(raw[:12], dtype="<i4").tolist() == [20240801, 7, 5000] and len(raw) == 1024 + 4 * 5000
    assert entry["tokens_sha256"] == write_shard(tmp_path / "again.bin", tokens, LLAMA3_LAYOUT)["tokens_sha256"]
    (tmp_path / "short.bin").write_bytes(raw[:-4])
    with pytest.raises(UserError, match="short.bin: truncated or corrupt shard"):
        read_shard(tmp_path / "short.bin")
    (tmp_path / "v1.bin").write_bytes(raw[:4] + np.int32(1).tobytes() + raw[8:])
    with pytest.raises(UserError, match="version 1 is not supported for magic 20240801"):
        read_shard(tmp_path / "v1.bin")


def test_index_reads_meta_and_expected_tokens(prepared_copy: Path) -> None:
    index = DatasetIndex.open(prepared_copy)
    meta = json.loads((prepared_copy / "meta.json").read_text())
    assert (index.tokenizer_name, index.vocab_size, index.eot_token) == ("gpt2", 50257, 50256)
    assert index.train_tokens() == sum(e["tokens"] for e in meta["shards"] if e["split"] == "train")
    assert index.expected_train_tokens() == meta["expected_train_tokens"] == index.train_tokens()
    assert index.complete
    # While prepare_data.py still runs, meta.json's estimate sizes the schedule.
    meta.update(expected_train_tokens=10_000_000, complete=False)
    write_meta(prepared_copy, meta)
    index = DatasetIndex.open(prepared_copy)
    assert index.expected_train_tokens() == 10_000_000 and not index.complete


def test_damaged_shards_are_named(prepared_copy: Path, tmp_path: Path) -> None:
    # A truncated lz4 shard is named when it is opened, or at the latest when it is read (the
    # cheap header check at open decompresses only the first block).
    for path in prepared_copy.glob("train_*.bin.lz4"):
        path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(UserError, match=r"train_00000\d\.bin\.lz4: truncated or corrupt"):
        with ShardedTrainLoader(prepared_copy, block_size=32, micro_batch_size=4) as loader:
            loader.next_batch()

    plain = make_dataset(tmp_path / "plain", compress=False)
    shard = plain / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match="train_000001.bin: truncated or corrupt"):
        DatasetIndex.open(plain)
    shard.write_bytes(b"GIF89a" + bytes(2000))
    with pytest.raises(UserError, match="train_000001.bin: not a token shard"):
        DatasetIndex.open(plain)
    shard.unlink()
    with pytest.raises(UserError, match="train_000001.bin: listed in .*meta.json but missing"):
        DatasetIndex.open(plain)
    with pytest.raises(UserError, match="not found; prepare it with"):
        DatasetIndex.open(tmp_path / "nowhere")


def test_llmc_directory_without_meta_loads(tmp_path: Path) -> None:
    d = make_dataset(tmp_path / "fineweb", compress=False, meta=False, prefix="fineweb_")
    (d / "README.md").write_text("not a shard")
    index = DatasetIndex.open(d)
    assert (index.tokenizer_name, index.vocab_size, index.eot_token) == ("gpt2", 50257, 50256)
    assert [s.file for s in index.train_shards] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    assert index.train_tokens() == 1500 + 1100 + 1700 == index.expected_train_tokens()
    assert index.val_tokens() == 900
    steps, states = global_steps(d, batch=4, accum=1, world=1, steps=3)
    assert Counter(window_keys(steps)) <= all_windows(d)
    assert states[0]["shards"][0]["file"] == "fineweb_train_000000.bin"
    assert len(ValReader(d, block_size=T, micro_batch_size=4)) == (900 - 1) // T // 4
    # tiny_shakespeare_train.bin / _val.bin style names (no number) too
    other = make_dataset(tmp_path / "shakespeare", train=(700,), val=(300,), compress=False, meta=False)
    (other / "train_000000.bin").rename(other / "tiny_shakespeare_train.bin")
    (other / "val_000000.bin").rename(other / "tiny_shakespeare_val.bin")
    index = DatasetIndex.open(other)
    assert [s.split for s in index.shards] == ["train", "val"] and index.train_tokens() == 700


# ----------------------------------------------------------------------------- sample order


def test_every_window_once_per_epoch_in_a_seeded_order(tiny: Path) -> None:
    expected = all_windows(tiny)
    n = sum(expected.values())
    loader = ShardedTrainLoader(tiny, block_size=T, micro_batch_size=5, seed=SEED)
    assert loader.samples_per_epoch == n and loader.epoch == 0
    served: list[bytes] = []
    epochs = []
    while len(served) < 2 * n + 5:
        x, y = loader.next_batch()
        served += [r.tobytes() for r in torch.cat([x, y[:, -1:]], 1).numpy()]
        epochs.append(loader.epoch)
    loader.close()
    first, second = served[:n], served[n:2 * n]
    assert Counter(first) == expected and Counter(second) == expected
    assert first != second  # reshuffled per epoch
    assert epochs == [(5 * i + 4) // n for i in range(len(epochs))]  # the epoch of each batch's last window
    # Shuffled, and by the seed: another seed gives another order, the same seed the same one.
    assert first != [k for k, _ in sorted(expected.items())]
    again, _ = global_steps(tiny, batch=5, accum=1, world=1, steps=3)
    other, _ = global_steps(tiny, batch=5, accum=1, world=1, steps=3, seed=SEED + 1)
    assert window_keys(again) == served[:15] and window_keys(other) != served[:15]


@pytest.mark.parametrize("batch,accum,world", [(4, 1, 2), (2, 2, 2), (1, 8, 1), (8, 1, 1), (2, 1, 4)])
def test_global_batches_do_not_depend_on_world_size(tiny: Path, batch: int, accum: int, world: int) -> None:
    steps = 75  # G = 8 windows per step: more than two epochs of 267 windows
    reference, ref_states = global_steps(tiny, batch=4, accum=2, world=1, steps=steps)
    split, states = global_steps(tiny, batch=batch, accum=accum, world=world, steps=steps)
    assert all(np.array_equal(a, b) for a, b in zip(reference, split))
    assert all(s == ref_states[0] for s in states)  # one world-size-free state on every rank
    assert ref_states[0]["epoch"] == 2 and ref_states[0]["position"] == 75 * 8 - 2 * 267


def test_world_size_independence_on_prepared_data(prepared_data: Path) -> None:
    one, _ = global_steps(prepared_data, batch=4, accum=2, world=1, steps=6, block=32)
    two, _ = global_steps(prepared_data, batch=4, accum=1, world=2, steps=6, block=32)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert Counter(window_keys(one)) <= all_windows(prepared_data, block=32)


def test_real_two_process_gloo_group_serves_the_same_global_batches(tiny: Path, tmp_path: Path) -> None:
    steps, resume_at = 40, 17  # crosses an epoch boundary (267 windows) after the resume
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "loader_dist_helper.py"), str(tiny), str(tmp_path), "--steps", str(steps),
           "--batch", "4", "--accum", "1", "--block", str(T), "--seed", str(SEED), "--resume_at", str(resume_at)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reference, ref_states = global_steps(tiny, batch=4, accum=2, world=1, steps=steps)
    for s in range(steps):
        dumped = torch.cat([ranks[0]["batches"][s][0], ranks[1]["batches"][s][0]]).numpy()
        assert np.array_equal(dumped, reference[s]), f"step {s} differs"
    assert ranks[0]["state"] == ranks[1]["state"] == ref_states[0]
    assert ranks[0]["epochs"][-1] == 1 and ranks[0]["epochs"][0] == 0


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("k", [0, 5, 33, 34, 40])
def test_restored_loader_continues_exactly(tiny: Path, k: int) -> None:
    total = 60
    reference, _ = global_steps(tiny, batch=4, accum=2, world=1, steps=total)
    _, states = global_steps(tiny, batch=4, accum=2, world=1, steps=k)
    path = tiny.parent / "state.pt"
    torch.save(states[0], path)
    state = torch.load(path, weights_only=True)  # what the checkpointer does
    assert state["position"] + 267 * state["epoch"] == 8 * k
    for batch, accum, world in ((4, 2, 1), (2, 1, 4)):  # also resumed with another world size
        rest, _ = global_steps(tiny, batch=batch, accum=accum, world=world, steps=total - k, state=state)
        assert all(np.array_equal(a, b) for a, b in zip(reference[k:], rest))


def test_state_counts_served_batches_not_prefetched(tiny: Path) -> None:
    loader = ShardedTrainLoader(tiny, block_size=T, micro_batch_size=2, grad_accum_steps=3, prefetch=6)
    for _ in range(3):
        loader.next_batch()
    time.sleep(0.3)  # let the prefetch thread run ahead
    state = loader.state_dict()
    assert state["position"] == 6 and state["epoch"] == 0
    loader.next_batch()
    with pytest.raises(RuntimeError, match="step boundary"):
        loader.state_dict()
    loader.close()


def test_foreign_state_is_refused(tiny: Path, tmp_path: Path) -> None:
    _, states = global_steps(tiny, batch=4, accum=1, world=1, steps=3)
    state = states[0]
    # Same file names and token counts, other contents.
    lookalike = make_dataset(tmp_path / "lookalike", seed=99)
    with ShardedTrainLoader(lookalike, block_size=T, micro_batch_size=4) as loader:
        with pytest.raises(UserError, match="another dataset.*other contents"):
            loader.load_state_dict(state)
    smaller = make_dataset(tmp_path / "smaller", train=(1500, 1000, 1700))
    with ShardedTrainLoader(smaller, block_size=T, micro_batch_size=4) as loader:
        with pytest.raises(UserError, match="train_000001.bin.lz4 \\(1100 tokens\\) has 1000 tokens"):
            loader.load_state_dict(state)
    with ShardedTrainLoader(tiny, block_size=2 * T, micro_batch_size=4) as loader:
        with pytest.raises(UserError, match=f"block_size {T} but this run uses {2 * T}"):
            loader.load_state_dict(state)
    # A refused state leaves the loader usable and unchanged.
    with ShardedTrainLoader(tiny, block_size=T, micro_batch_size=4, seed=SEED) as loader:
        with pytest.raises(UserError):
            loader.load_state_dict({**state, "fingerprint": "0" * 64})
        x, _ = loader.next_batch()
        first, _ = global_steps(tiny, batch=4, accum=1, world=1, steps=1)
        assert np.array_equal(x.numpy(), first[0][:, :-1])


# ----------------------------------------------------------------------------- dynamic expansion


def test_new_shard_joins_at_the_next_epoch(tiny: Path) -> None:
    old = all_windows(tiny)
    n0 = sum(old.values())
    loader = ShardedTrainLoader(tiny, block_size=T, micro_batch_size=3, seed=SEED)
    served: list[bytes] = []

    def take(count: int) -> None:
        while len(served) < count:
            x, y = loader.next_batch()
            served.extend(r.tobytes() for r in torch.cat([x, y[:, -1:]], 1).numpy())

    take(30)
    new_file = add_train_shard(tiny, tokens=800, seed=7)  # appears in the middle of epoch 0
    grown = all_windows(tiny)
    n1 = sum(grown.values())
    assert n1 == n0 + (800 - 1) // T
    take(n0 + n1)
    state = loader.state_dict()
    loader.close()
    assert Counter(served[:n0]) == old  # epoch 0 kept its shard list
    assert Counter(served[n0:n0 + n1]) == grown  # epoch 1 includes the new shard, each window once
    assert (state["epoch"], state["position"]) == (2, len(served) - n0 - n1) if len(served) > n0 + n1 else (
        1, len(served) - n0)
    assert state["samples_per_epoch"] == n1
    assert new_file in [s["file"] for s in state["shards"]]


# ----------------------------------------------------------------------------- validation


def test_val_reader_gives_fixed_windows_split_by_rank(prepared_data: Path) -> None:
    block, batch = 32, 4
    val_tokens = np.concatenate([np.asarray(read_shard(prepared_data / s.file), dtype=np.int64)
                                 for s in DatasetIndex.open(prepared_data).val_shards])
    one = ValReader(prepared_data, block_size=block, micro_batch_size=batch, max_batches=6)
    assert len(one) == 6
    rows = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in one]).numpy()
    expected = np.stack([val_tokens[w * block: w * block + block + 1] for w in range(6 * batch)])
    assert np.array_equal(rows, expected)  # the first windows in file order
    assert np.array_equal(torch.cat([x for x, _ in one]).numpy(), expected[:, :-1])  # again: same windows
    ranks = [list(ValReader(prepared_data, block_size=block, micro_batch_size=batch, rank=r, world_size=2,
                            max_batches=3)) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]
    interleaved = torch.cat([torch.cat([ranks[r][j][0] for r in range(2)]) for j in range(3)]).numpy()
    assert np.array_equal(interleaved, expected[:, :-1])
    with pytest.raises(UserError, match="fewer than one batch"):
        ValReader(prepared_data, block_size=block, micro_batch_size=10_000)


def test_val_reader_is_built_once_from_an_open_index(tiny: Path) -> None:
    index = DatasetIndex.open(tiny)
    (tiny / "train_000001.bin.lz4").unlink()  # a reader given the index does not open the directory again
    reader = ValReader(index, block_size=T, micro_batch_size=4)
    (tiny / "val_000000.bin.lz4").unlink()  # its windows were read and checked when it was built
    first, again = list(reader), list(reader)
    assert len(first) == len(reader) == (900 - 1) // T // 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    with pytest.raises(UserError, match="listed in .*meta.json but missing"):
        ValReader(tiny, block_size=T, micro_batch_size=4)


def test_lz4_and_plain_directories_serve_identical_batches(prepared_data: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    meta = read_meta(prepared_data)
    for entry in meta["shards"]:
        entry.update(write_shard(plain / entry["file"].removesuffix(".lz4"), read_shard(prepared_data / entry["file"])))
    write_meta(plain, meta)
    a, _ = global_steps(prepared_data, batch=4, accum=2, world=1, steps=5, block=32)
    b, _ = global_steps(plain, batch=4, accum=2, world=1, steps=5, block=32)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_data_module_does_not_import_torch_for_prepare() -> None:
    """prepare_data.py imports the data modules; torch (seconds to import) must stay out of that path."""
    code = ("import sys, common.data, common.shards, common.dataset_writer, common.tokenizer; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env=env(), cwd=SRC).returncode == 0


# ----------------------------------------------------------------------------- what is trusted


META_DAMAGE = {  # case -> (meta.json bytes, or a change to the parsed meta; a fragment of the one-line error)
    "not_utf8": (b'{"format_version": 1, "tokenizer": "gpt\xff2"}', "not UTF-8 text"),
    "not_json": (b'{"format_version": 1, "shards": [', "not valid JSON"),
    "not_an_object": (b"[1, 2, 3]", "holds a list, not an object"),
    "missing_field": (lambda m: m.pop("vocab_size"), "field 'vocab_size' is missing"),
    "ill_typed_field": (lambda m: m.update(vocab_size="50257"), "field 'vocab_size' must be a positive integer"),
    "boolean_count": (lambda m: m.update(expected_train_tokens=True), "field 'expected_train_tokens' must be"),
    "eot_beyond_vocab": (lambda m: m.update(eot_token=50257), "eot_token 50257 is not below vocab_size"),
    "shards_not_a_list": (lambda m: m.update(shards={"file": "train_000000.bin.lz4"}), "field 'shards' must be"),
    "entry_not_an_object": (lambda m: m["shards"].append("train_000009.bin.lz4"), "shards[4] is a string"),
    "entry_without_split": (lambda m: m["shards"][1].pop("split"), "shards[1]: field 'split' is missing"),
    "negative_tokens": (lambda m: m["shards"][1].update(tokens=-5), "shards[1]: field 'tokens' must be a token count"),
    "unknown_split": (lambda m: m["shards"][1].update(split="test"), "shards[1]: field 'split' must be 'train' or"),
    "bad_sha256": (lambda m: m["shards"][1].update(sha256="abc"), "shards[1]: field 'sha256' must be 64"),
    "listed_twice": (lambda m: m["shards"].append(dict(m["shards"][1])), "is listed twice"),
}


@pytest.mark.parametrize("case", list(META_DAMAGE))
def test_malformed_meta_json_is_one_line_naming_the_file(tiny: Path, case: str) -> None:
    damage, fragment = META_DAMAGE[case]
    if callable(damage):
        meta = read_meta(tiny)
        damage(meta)
        damage = json.dumps(meta).encode()
    (tiny / "meta.json").write_bytes(damage)
    with pytest.raises(UserError) as err:
        DatasetIndex.open(tiny)
    message = str(err.value)
    assert message.startswith(f"{tiny / 'meta.json'}: ") and fragment in message, message
    assert "\n" not in message and "prepare the data again" in message


@pytest.mark.parametrize("how", ["dot_dot", "absolute", "subdirectory", "symlink", "symlink_no_meta"])
def test_shards_outside_the_data_directory_are_refused(tmp_path: Path, how: str) -> None:
    data = make_dataset(tmp_path / "data", compress=False, meta=how != "symlink_no_meta")
    outside = tmp_path / "elsewhere" / "train_000009.bin"
    outside.parent.mkdir()
    entry = {**write_shard(outside, np.arange(500, dtype=np.uint16)), "split": "train"}
    name = {"dot_dot": "../elsewhere/train_000009.bin", "absolute": str(outside),
            "subdirectory": "elsewhere/train_000009.bin"}.get(how, "train_000009.bin")
    if how.startswith("symlink"):
        (data / name).symlink_to(outside)
    if how == "subdirectory":
        (data / "elsewhere").symlink_to(outside.parent, target_is_directory=True)
    if how != "symlink_no_meta":
        meta = read_meta(data)
        meta["shards"].append({**entry, "file": name})
        write_meta(data, meta)
    with pytest.raises(UserError) as err:
        DatasetIndex.open(data)
    message = str(err.value)
    assert name in message and ("outside" in message or "not a plain file name" in message), message


def test_changed_shard_bytes_are_refused_when_the_shard_is_loaded(tmp_path: Path) -> None:
    plain = make_dataset(tmp_path / "plain", compress=False)
    for name in ("train_000001.bin", "val_000000.bin"):
        data = bytearray((plain / name).read_bytes())
        data[1024 + 2 * 300] ^= 0x01  # token 300 changes; header and size stay intact
        (plain / name).write_bytes(data)
    index = DatasetIndex.open(plain)  # the cheap checks at open cannot see it
    with pytest.raises(UserError, match=r"val_000000\.bin: sha256 \w+\.\.\. differs from the \w+\.\.\. recorded"):
        ValReader(index, block_size=T, micro_batch_size=4)
    with pytest.raises(UserError, match=r"train_000001\.bin: sha256 .* delete it and rerun prepare_data"):
        with ShardedTrainLoader(plain, block_size=T, micro_batch_size=4) as loader:
            for _ in range(loader.samples_per_epoch // 4 + 1):  # one epoch reads every shard
                loader.next_batch()


def _put_token(directory: Path, name: str, offset: int, token: int) -> None:
    """Rewrite shard `name` with one token replaced, and meta.json to match (sha256 included)."""
    tokens = np.array(read_shard(directory / name))
    tokens[offset] = token
    meta = read_meta(directory)
    entry = next(e for e in meta["shards"] if e["file"] == name)
    entry.update(write_shard(directory / name, tokens))
    write_meta(directory, meta)


def test_token_ids_beyond_the_vocabulary_are_refused_naming_shard_and_offset(tiny: Path) -> None:
    _put_token(tiny, "train_000002.bin.lz4", 777, 50300)
    _put_token(tiny, "val_000000.bin.lz4", 5, 60000)
    DatasetIndex.open(tiny)
    expected = r"train_000002\.bin\.lz4: token id 50300 at token offset 777 is outside the vocabulary of {}"
    for vocab_size, shown in ((50257, 50257), (None, 50257)):  # None: the dataset's own vocabulary
        with pytest.raises(UserError, match=expected.format(shown)):
            with ShardedTrainLoader(tiny, block_size=T, micro_batch_size=4, vocab_size=vocab_size) as loader:
                for _ in range(loader.samples_per_epoch // 4 + 1):
                    loader.next_batch()
    with ShardedTrainLoader(tiny, block_size=T, micro_batch_size=4, vocab_size=50304) as loader:
        for _ in range(loader.samples_per_epoch // 4 + 1):  # 50300 fits a model of 50304 rows
            loader.next_batch()
    with pytest.raises(UserError, match=r"val_000000\.bin\.lz4: token id 60000 at token offset 5 .* of 50304"):
        ValReader(tiny, block_size=T, micro_batch_size=4, vocab_size=50304)

