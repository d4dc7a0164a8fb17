"""Tests for fastdarts.data: locating, verifying and loading PTB and CIFAR-10, and augmentation."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdarts.data import (
    _files,
    augment,
    batchify,
    cifar,
    get_batch,
    load_cifar10,
    load_ptb,
    normalize,
    ptb,
    search_split,
)
from fastdarts.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
# Read before the autouse fixture clears the variable for each test.
SHARED = Path(os.environ.get("FASTDARTS_DATA", REPO.parent / "shared" / "data"))
PTB_DIR = SHARED / "ptb"
CIFAR_TARBALL = SHARED / "cifar10" / cifar.TARBALL
PTB_FILES = [f"ptb.{split}.txt" for split in ptb.SPLITS]

needs_ptb = pytest.mark.skipif(
    not all((PTB_DIR / name).is_file() for name in PTB_FILES), reason=f"no PTB in {PTB_DIR}"
)
needs_cifar = pytest.mark.skipif(not CIFAR_TARBALL.is_file(), reason=f"no {CIFAR_TARBALL}")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache and no $FASTDARTS_DATA unless it sets one."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FASTDARTS_CACHE", str(folder))
    monkeypatch.delenv("FASTDARTS_DATA", raising=False)
    return folder


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail("tried to download")

    monkeypatch.setattr(_files, "download", fail)
    monkeypatch.setattr(urllib.request, "urlopen", fail)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(OSError(errno.ENETUNREACH, "network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def serve(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> list[float]:
    """Make urlopen answer with ``files[basename of url]``; returns the timeouts it was given."""
    timeouts: list[float] = []

    def fake_urlopen(request: urllib.request.Request, timeout: float) -> io.BytesIO:
        timeouts.append(timeout)
        return io.BytesIO(files[request.full_url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return timeouts


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders a download or extraction left behind."""
    return [p.name for p in folder.rglob("*") if p.name.endswith((".part", ".old", ".tmp"))]


# --- PTB ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> ptb.Corpus:
    if not PTB_DIR.is_dir():
        pytest.skip(f"no PTB in {PTB_DIR}")
    # The parent folder: --data may point at the folder that holds ptb/.
    return load_ptb(str(SHARED))


@needs_ptb
def test_ptb_counts_and_vocab(corpus: ptb.Corpus) -> None:
    assert corpus.vocab_size == 10000
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (929589, 73760, 82430)
    assert all(t.dtype == torch.int64 and t.dim() == 1 for t in (corpus.train, corpus.valid))
    eos = corpus.vocab.index("<eos>")
    assert corpus.train[-1] == eos and corpus.test[-1] == eos
    first_line = (PTB_DIR / "ptb.train.txt").read_text().splitlines()[0].split()
    assert [corpus.vocab[i] for i in corpus.train[: len(first_line)]] == first_line
    # Ids are given by first occurrence, so the first line's new words come first.
    assert corpus.vocab[0] == first_line[0]
    assert int(corpus.train.max()) < corpus.vocab_size


@needs_ptb
def test_ptb_explicit_folder_itself(corpus: ptb.Corpus, no_download: None) -> None:
    assert torch.equal(load_ptb(str(PTB_DIR)).valid, corpus.valid)


@needs_ptb
def test_ptb_from_env_does_not_download(
    corpus: ptb.Corpus, monkeypatch: pytest.MonkeyPatch, no_download: None
) -> None:
    monkeypatch.setenv("FASTDARTS_DATA", str(SHARED))
    assert torch.equal(load_ptb().test, corpus.test)


@needs_ptb
def test_ptb_md5_mismatch(tmp_path: Path, no_download: None) -> None:
    for name in PTB_FILES:
        shutil.copy(PTB_DIR / name, tmp_path / name)
    with open(tmp_path / "ptb.valid.txt", "ab") as f:
        f.write(b" extra\n")
    with pytest.raises(DataError, match="md5 mismatch") as info:
        load_ptb(str(tmp_path))
    assert str(tmp_path / "ptb.valid.txt") in str(info.value)
    assert "\n" not in str(info.value)


@needs_ptb
def test_ptb_missing_file_with_explicit_data(tmp_path: Path, no_download: None) -> None:
    for name in PTB_FILES[:2]:
        shutil.copy(PTB_DIR / name, tmp_path / name)
    with pytest.raises(DataError) as info:
        load_ptb(str(tmp_path))
    assert str(tmp_path / "ptb.test.txt") in str(info.value)


def test_ptb_explicit_data_not_there(tmp_path: Path, no_download: None) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_ptb(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"ptb\.train\.txt"):
        load_ptb(str(tmp_path))


def test_ptb_offline_says_where_to_put_files(cache: Path, offline: None) -> None:
    with pytest.raises(DataError, match="could not download PTB") as info:
        load_ptb()
    message = str(info.value)
    assert str(cache / "ptb") in message and "ptb.train.txt" in message and "--data" in message
    assert "network is unreachable" in message and "offline?" in message
    assert not (cache / "ptb").exists() or not any((cache / "ptb").iterdir())


def test_ptb_http_error_is_not_called_offline(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(request: urllib.request.Request, timeout: float) -> None:
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", None, None)

    monkeypatch.setattr(urllib.request, "urlopen", not_found)
    with pytest.raises(DataError, match="HTTP Error 404") as info:
        load_ptb()
    assert "offline" not in str(info.value)


@needs_ptb
def test_ptb_download_verifies_and_caches(
    corpus: ptb.Corpus, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeouts = serve(monkeypatch, {name: (PTB_DIR / name).read_bytes() for name in PTB_FILES})
    downloaded = load_ptb()
    assert timeouts == [_files.TIMEOUT_S] * 3
    assert torch.equal(downloaded.train, corpus.train) and downloaded.vocab == corpus.vocab
    umask = os.umask(0o022)
    os.umask(umask)
    for name in PTB_FILES:
        assert (cache / "ptb" / name).read_bytes() == (PTB_DIR / name).read_bytes()
        # Readable by the cache's other users, as a plain open() makes it (not mkstemp's 0600).
        assert (cache / "ptb" / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert leftovers(cache) == []
    # Now the cache is used without the network.
    monkeypatch.setattr(urllib.request, "urlopen", None)
    assert torch.equal(load_ptb().valid, corpus.valid)


def test_a_download_cut_short_says_so(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Short(io.BytesIO):
        length = 100  # what the server announced; 8 bytes come

    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: Short(b"not ptb\n"))
    with pytest.raises(DataError, match="connection dropped after 8 of 100 bytes"):
        load_ptb()
    assert leftovers(cache) == [] and not (cache / "ptb" / "ptb.train.txt").exists()


@needs_ptb
def test_ptb_corrupt_download_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(monkeypatch, {name: b"not ptb\n" for name in PTB_FILES})
    with pytest.raises(DataError, match="md5 mismatch"):
        load_ptb()
    assert not (cache / "ptb" / "ptb.train.txt").exists()
    assert leftovers(cache) == []


@needs_ptb
def test_ptb_corrupt_env_copy_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    (tmp_path / "data" / "ptb").mkdir(parents=True)
    for name in PTB_FILES:
        (tmp_path / "data" / "ptb" / name).write_text("wrong\n")
    monkeypatch.setenv("FASTDARTS_DATA", str(tmp_path / "data"))
    with pytest.warns(UserWarning, match="md5 mismatch"), pytest.raises(DataError) as info:
        load_ptb()
    # The error names the skipped copy, the thing to fix, not only the failed download.
    message = str(info.value)
    assert "could not download PTB" in message
    assert f"skipped the copy in {tmp_path / 'data' / 'ptb'}: " in message and "md5" in message


def test_batchify_columns_are_contiguous_chunks() -> None:
    source = batchify(torch.arange(11), 3)
    assert source.shape == (3, 3)
    # Column b is the b-th chunk; the two tokens past 3 * 3 are dropped.
    assert source.t().tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert source.is_contiguous()
    with pytest.raises(ValueError, match="fewer than batch_size"):
        batchify(torch.arange(2), 3)


def test_a_run_batch_size_past_the_split_is_a_config_error() -> None:
    """A column needs an input and its target: two tokens; the error names the option."""
    assert ptb.batchify_split(torch.arange(11), 5, "--batch-size", "valid").shape == (2, 5)
    for n in (9, 3):
        with pytest.raises(ConfigError, match="--eval-batch-size 5: PTB's valid split") as info:
            ptb.batchify_split(torch.arange(n), 5, "--eval-batch-size", "valid")
        assert f"({n:,} tokens) leaves fewer than 2 tokens a column" in str(info.value)
    # Training needs 3 rows: its epochs end 2 before the end.
    assert ptb.batchify_split(torch.arange(15), 5, "--batch-size", "train", 3).shape == (3, 5)
    with pytest.raises(ConfigError, match="leaves fewer than 3 tokens a column"):
        ptb.batchify_split(torch.arange(14), 5, "--batch-size", "train", 3)


def test_check_bptt_bound() -> None:
    """A training split of 10 rows: epochs step over its first 8, so bptt 8 is the longest
    accepted and 9 the shortest refused, in one line naming the batch size's option."""
    train = batchify(torch.arange(50), 5)
    assert train.shape == (10, 5)
    ptb.check_bptt(8, train, "--batch-size")
    for bptt in (9, 10):
        with pytest.raises(ConfigError) as info:
            ptb.check_bptt(bptt, train, "--batch-size")
        assert str(info.value) == (
            f"--bptt {bptt}: longer than the training split's columns "
            "(8 tokens to step over at this --batch-size)"
        )


def test_get_batch_shapes_and_tail() -> None:
    source = batchify(torch.arange(20), 2)  # (10, 2)
    data, target = get_batch(source, 0, 4)
    assert data.shape == target.shape == (4, 2)
    assert torch.equal(data, source[0:4]) and torch.equal(target, source[1:5])
    # Near the end the sequence is shortened so every input has a target.
    data, target = get_batch(source, 7, 4)
    assert data.shape == (2, 2)
    assert torch.equal(data, source[7:9]) and torch.equal(target, source[8:10])
    with pytest.raises(ValueError):
        get_batch(source, 9, 4)


# --- CIFAR-10 -------------------------------------------------------------------------------


def colour(split: str, label: int, k: int) -> tuple[int, int, int]:
    return (label * 25, 40 + k * 60, 200 if split == "train" else 100)


def make_tree(
    root: Path,
    per_class: int = 2,
    classes: tuple[str, ...] = cifar.CLASSES,
    splits: tuple[str, ...] = ("train", "test"),
) -> Path:
    """An ImageFolder tree of solid-colour 32x32 JPEGs (solid colours survive JPEG closely)."""
    for split in splits:
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                image = Image.new("RGB", (32, 32), colour(split, label, k))
                image.save(root / split / name / f"{k:04d}.jpg", quality=95)
    return root


def make_tarball(path: Path, tree: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tree / split, arcname=split)
    return path


def assert_matches_colours(split_data: cifar.CIFAR10Split, split: str, per_class: int) -> None:
    """A tree's images in the loader's order: the classes interleaved (image i is image
    i // 10 of class i mod 10)."""
    n = len(split_data)
    assert n == per_class * 10
    images, labels = split_data.get(list(range(n)))
    assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert labels.tolist() == [i % 10 for i in range(n)]
    expected = torch.tensor([colour(split, i % 10, i // 10) for i in range(n)])
    assert (images.float().mean((2, 3)) - expected).abs().max() <= 3


def test_cifar_tree(tmp_path: Path, no_download: None) -> None:
    root = make_tree(tmp_path / "cifar10")
    for data in (root, tmp_path):  # the folder itself, or its parent
        train = load_cifar10(str(data), train=True)
        assert train.classes == list(cifar.CLASSES)
        assert_matches_colours(train, "train", 2)
        assert_matches_colours(load_cifar10(str(data), train=False), "test", 2)
    images, labels = train.get(torch.tensor([19, 0]))
    assert labels.tolist() == [9, 0] and images.shape == (2, 3, 32, 32)
    with pytest.raises(IndexError):
        train.get([20])


def test_cifar_get_refuses_indices_outside_the_split(tmp_path: Path) -> None:
    """Only integers in 0..len-1: a negative index is refused like one past the end (not
    Python's wrap to the last image), before anything is decoded, in the lazy tree and the
    binary batches alike."""
    images = torch.arange(4 * 3 * 32 * 32).reshape(4, 3, 32, 32).to(torch.uint8)
    split = cifar.CIFAR10Split(images, torch.tensor([3, 1, 4, 1]))
    got, labels = split.get([3, 0])
    assert torch.equal(got, images[[3, 0]]) and labels.tolist() == [1, 3]
    missing = [str(tmp_path / f"{i}.jpg") for i in range(4)]  # decoding any would fail
    lazy = cifar.CIFAR10Split(torch.empty_like(images), torch.tensor([3, 1, 4, 1]), missing)
    outside = ([-1], [0, -4], [4], torch.tensor([[1, -1]]))
    # A mask or floats would otherwise read images 0/1 or truncate.
    not_integers = (torch.tensor([False, True, False, True]), [1.7], torch.tensor([0.0]))
    for data in (split, lazy):
        for bad in outside:
            with pytest.raises(IndexError, match=r"indices must lie in \[0, 4\)"):
                data.get(bad)
        for bad in not_integers:
            with pytest.raises(IndexError, match="indices must be integers"):
                data.get(bad)
    assert not lazy._decoded.any()
    assert split.get([])[0].shape == (0, 3, 32, 32)


def test_cifar_tree_search_halves_hold_every_class_equally(tmp_path: Path) -> None:
    """The tree lists its images class by class; the loader interleaves them, so that the
    search's halves (the first for the weights, the second for α) hold every class, in equal
    numbers, and the order within a class is the files'."""
    make_tree(tmp_path, per_class=4, splits=("train",))
    train = load_cifar10(str(tmp_path))
    for half in search_split(len(train)):
        assert torch.bincount(train.get(half)[1], minlength=10).tolist() == [2] * 10
    images, labels = train.get(list(range(len(train))))
    for label in range(10):
        seen = images[labels == label].float().mean((2, 3))
        want = torch.tensor([colour("train", label, k) for k in range(len(seen))])
        assert (seen - want).abs().max() <= 3


def test_cifar_tree_decodes_lazily_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path)
    opened: list[str] = []
    real_open = Image.open

    def counting_open(path: str) -> Image.Image:
        opened.append(path)
        return real_open(path)

    monkeypatch.setattr(cifar.Image, "open", counting_open)
    train = load_cifar10(str(tmp_path))
    assert opened == []
    first, _ = train.get([3, 5])
    assert len(opened) == 2
    again, _ = train.get([5, 3, 5])
    assert len(opened) == 2
    assert torch.equal(again[1], first[0]) and torch.equal(again[0], first[1])


def test_cifar_tree_with_wrong_classes(tmp_path: Path) -> None:
    make_tree(tmp_path, per_class=1, classes=("cat", "dog"))
    with pytest.raises(DataError, match="class folders are cat, dog") as info:
        load_cifar10(str(tmp_path))
    assert str(tmp_path / "train") in str(info.value)


def test_cifar_tree_without_requested_split(tmp_path: Path) -> None:
    make_tree(tmp_path, per_class=1, splits=("train",))
    with pytest.raises(DataError, match="missing"):
        load_cifar10(str(tmp_path), train=False)


def test_cifar_explicit_data_not_there(tmp_path: Path, no_download: None) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_cifar10(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no CIFAR-10"):
        load_cifar10(str(tmp_path))


def test_cifar_tarball_extracted_once(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, no_download: None
) -> None:
    archive = make_tarball(tmp_path / "data" / "tiny.tar.gz", make_tree(tmp_path / "tree"))
    assert_matches_colours(load_cifar10(str(archive)), "train", 2)
    assert (cache / "cifar10-jpeg" / "train" / "bird").is_dir()
    assert leftovers(cache) == []

    def no_extract(*args: object, **kwargs: object) -> None:
        pytest.fail("extracted again")

    with monkeypatch.context() as patch:
        patch.setattr(tarfile, "open", no_extract)
        assert_matches_colours(load_cifar10(str(archive), train=False), "test", 2)

    # A different archive replaces the extracted tree instead of reusing it.
    other = make_tarball(tmp_path / "data2" / "tiny.tar.gz", make_tree(tmp_path / "t2", 1))
    assert_matches_colours(load_cifar10(str(other)), "train", 1)
    assert leftovers(cache) == []


def test_cifar_tree_from_env(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, no_download: None
) -> None:
    make_tree(tmp_path / "data" / "cifar10", per_class=1)
    monkeypatch.setenv("FASTDARTS_DATA", str(tmp_path / "data"))
    assert_matches_colours(load_cifar10(), "train", 1)
    assert not cache.exists()


def test_cifar_tarball_wrong_sha256(tmp_path: Path, cache: Path, no_download: None) -> None:
    archive = make_tarball(tmp_path / "data" / cifar.TARBALL, make_tree(tmp_path / "tree", 1))
    with pytest.raises(DataError, match="sha256 mismatch") as info:
        load_cifar10(str(tmp_path / "data"))
    assert str(archive) in str(info.value)
    assert not (cache / "cifar10-jpeg").exists()


def test_cifar_tarball_with_unsafe_member(tmp_path: Path, cache: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        payload = b"x"
        member = tarfile.TarInfo("../escaped.jpg")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(DataError, match="cannot extract"):
        load_cifar10(str(archive))
    assert not (cache / "escaped.jpg").exists() and not (cache / "cifar10-jpeg").exists()
    assert leftovers(cache) == []


def test_a_python_without_tar_filters_refuses_to_extract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python before 3.10.12 / 3.11.4 has no extraction filter: one line, nothing written."""
    monkeypatch.delattr(tarfile, "data_filter")
    with pytest.raises(DataError, match="cannot extract an archive safely; use Python"):
        _files.extract_all(tmp_path / "any.tar.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cifar_broken_env_copy_is_named_when_offline(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    make_tree(tmp_path / "data" / "cifar10", per_class=1, classes=cifar.CLASSES[:9])
    monkeypatch.setenv("FASTDARTS_DATA", str(tmp_path / "data"))
    with pytest.warns(UserWarning, match="ignoring CIFAR-10"), pytest.raises(DataError) as info:
        load_cifar10()
    message = str(info.value)
    assert "could not download CIFAR-10" in message
    assert f"skipped the copy in {tmp_path / 'data' / 'cifar10'}: " in message


def test_an_env_folder_without_the_data_is_named_when_offline(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    """$FASTDARTS_DATA pointing where there is nothing: the offline error says so."""
    monkeypatch.setenv("FASTDARTS_DATA", str(tmp_path / "nowhere"))
    for load, name in ((load_ptb, "ptb"), (load_cifar10, "cifar10")):
        with pytest.raises(DataError, match="could not download") as info:
            load()
        assert f"skipped the copy in {tmp_path / 'nowhere' / name} ($FASTDARTS_DATA): no " in str(
            info.value
        )


def test_cifar_offline_says_where_to_put_files(cache: Path, offline: None) -> None:
    with pytest.raises(DataError, match="could not download CIFAR-10") as info:
        load_cifar10()
    message = str(info.value)
    assert str(cache / "cifar10") in message and "--data" in message
    assert cifar.TARBALL in message
    assert leftovers(cache) == []


def fake_binary_archive(monkeypatch: pytest.MonkeyPatch, per_batch: int = 3) -> bytes:
    """torchvision's cifar-10-python.tar.gz in miniature (image i of a batch all value i),
    with torchvision's checksums patched to match it."""
    import hashlib
    import pickle

    from torchvision.datasets import CIFAR10

    files, lists = {}, {"train_list": [], "test_list": []}
    for name, which in [*((f"data_batch_{k}", "train_list") for k in range(1, 6)),
                        ("test_batch", "test_list")]:  # fmt: skip
        data = torch.arange(per_batch, dtype=torch.uint8)[:, None].expand(per_batch, 3072)
        blob = {"data": data.numpy().copy(), "labels": list(range(per_batch))}
        files[name] = pickle.dumps(blob)
        lists[which].append([name, hashlib.md5(files[name]).hexdigest()])
    files["batches.meta"] = pickle.dumps({"label_names": list(cifar.CLASSES)})
    meta = {**CIFAR10.meta, "md5": hashlib.md5(files["batches.meta"]).hexdigest()}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, blob in files.items():
            member = tarfile.TarInfo(f"{cifar.BINARY}/{name}")
            member.size = len(blob)
            tar.addfile(member, io.BytesIO(blob))
    payload = archive.getvalue()
    for attr, value in (*lists.items(), ("meta", meta)):
        monkeypatch.setattr(CIFAR10, attr, value)
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(payload).hexdigest())
    return payload


def test_cifar_download_by_processes_started_together_happens_once(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two loaders at once (threads here; the lock is a file lock, as between torchrun's
    ranks): one downloads and unpacks, the other waits and finds the batches."""
    from torchvision.datasets import CIFAR10

    payload = fake_binary_archive(monkeypatch)
    fetched = serve(monkeypatch, {CIFAR10.filename: payload})
    barrier = threading.Barrier(2)
    results: list[cifar.CIFAR10Split | BaseException] = []

    def load() -> None:
        barrier.wait()
        try:
            results.append(load_cifar10())
        except BaseException as e:  # reported by the assertion below
            results.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(r, cifar.CIFAR10Split) for r in results), results
    assert len(fetched) == 1
    for split in results:
        images, labels = split.get(list(range(15)))
        assert labels.tolist() == [0, 1, 2] * 5
        assert images[:, 0, 0, 0].tolist() == [0, 1, 2] * 5
    assert not (cache / "cifar10" / CIFAR10.filename).exists()
    assert leftovers(cache) == []


def test_cifar_download_moves_the_batches_into_place_whole(
    cache: Path, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    """Unpacked beside the cache entry, so a process looking without the lock never finds
    half the batches (it used to warn that it was ignoring them, then wait); an unpack that
    fails leaves neither batches nor temporary folders, and keeps the verified archive."""
    from torchvision.datasets import CIFAR10

    payload = fake_binary_archive(monkeypatch)
    fetched = serve(monkeypatch, {CIFAR10.filename: payload})
    batches = cache / "cifar10" / cifar.BINARY
    extract_all, seen = _files.extract_all, []

    def watched(archive: Path, folder: Path) -> None:
        extract_all(archive, folder)
        seen.append((batches.exists(), (folder / cifar.BINARY / "data_batch_5").is_file()))

    monkeypatch.setattr(_files, "extract_all", watched)
    assert len(load_cifar10()) == 15
    assert seen == [(False, True)]
    assert len(fetched) == 1 and recwarn.list == []
    assert not (cache / "cifar10" / CIFAR10.filename).exists() and leftovers(cache) == []

    shutil.rmtree(batches)

    def killed(archive: Path, folder: Path) -> None:
        extract_all(archive, folder)
        raise DataError("killed")

    monkeypatch.setattr(_files, "extract_all", killed)
    with pytest.raises(DataError, match="killed"):
        load_cifar10()
    assert not batches.exists() and leftovers(cache) == []
    assert (cache / "cifar10" / CIFAR10.filename).is_file()


def test_a_corrupt_binary_folder_is_named_without_torchvisions_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: None
) -> None:
    payload = fake_binary_archive(monkeypatch)
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        tar.extractall(tmp_path, filter="data")
    batch = tmp_path / cifar.BINARY / "data_batch_2"
    assert len(load_cifar10(str(tmp_path))) == 15  # intact: 5 batches of 3
    batch.write_bytes(batch.read_bytes()[:-1])
    with pytest.raises(DataError) as info:
        load_cifar10(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / cifar.BINARY}: a file is missing or its md5")
    assert "download=True" not in message


def test_cache_lock_makes_a_second_holder_wait(cache: Path) -> None:
    entry, order = cache / "entry", []
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        with _files.cache_lock(entry):
            held.set()
            release.wait(10)
            order.append("first out")

    def second() -> None:
        held.wait(10)
        with _files.cache_lock(entry):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    held.wait(10)
    time.sleep(0.2)
    assert order == []  # the second is still waiting
    release.set()
    for thread in threads:
        thread.join()
    assert order == ["first out", "second in"]


def test_an_unwritable_cache_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.setenv("FASTDARTS_CACHE", str(afile))
    archive = make_tarball(tmp_path / "data" / "tiny.tar.gz", make_tree(tmp_path / "tree", 1))
    for load in (lambda: load_cifar10(str(archive)), load_cifar10, load_ptb):
        with pytest.raises(DataError, match=f"cannot write the cache folder {afile}") as info:
            load()
        assert "FASTDARTS_CACHE" in str(info.value) and "\n" not in str(info.value)


def test_an_unpacked_tarball_is_found_without_data_and_a_killed_unpack_is_cleared(
    tmp_path: Path, cache: Path, no_download: None
) -> None:
    left = cache / ".cifar10-jpeg.x1.part" / "train"
    left.mkdir(parents=True)
    archive = make_tarball(tmp_path / "data" / "tiny.tar.gz", make_tree(tmp_path / "tree", 1))
    load_cifar10(str(archive))
    assert leftovers(cache) == []
    assert_matches_colours(load_cifar10(train=False), "test", 1)


@needs_cifar
def test_real_tarball_checksum() -> None:
    assert _files.file_digest(CIFAR_TARBALL, "sha256") == cifar.TARBALL_SHA256


@pytest.mark.slow
@needs_cifar
def test_real_cifar_tarball(monkeypatch: pytest.MonkeyPatch, no_download: None) -> None:
    monkeypatch.setenv("FASTDARTS_DATA", str(SHARED))
    train, test = load_cifar10(), load_cifar10(train=False)
    assert (len(train), len(test)) == (50000, 10000)
    images, labels = train.get(torch.arange(0, 50000, 997))
    assert images.shape == (len(labels), 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(train.get(torch.arange(0, 50000, 50))[1]).tolist() == [100] * 10
    assert 60 < images.float().mean() < 200


# --- search split and augmentation ----------------------------------------------------------


def test_search_split() -> None:
    train, arch = search_split(10)
    assert train.tolist() == [0, 1, 2, 3, 4] and arch.tolist() == [5, 6, 7, 8, 9]
    train, arch = search_split(10, portion=0.75)
    assert (len(train), len(arch)) == (7, 3)
    with pytest.raises(ValueError):
        search_split(10, portion=1.0)


def random_images(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_normalize_values() -> None:
    images = torch.zeros(2, 3, 4, 5, dtype=torch.uint8)
    images[1] = 255
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 5)
    for c in range(3):
        assert torch.allclose(out[0, c], torch.tensor(-cifar.MEAN[c] / cifar.STD[c]))
        assert torch.allclose(out[1, c], torch.tensor((1 - cifar.MEAN[c]) / cifar.STD[c]))
    assert normalize(images, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="uint8"):
        normalize(images.float())


def test_augment_shape_dtype_and_determinism() -> None:
    images = random_images(16)
    out = augment(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.float32
    # (B, C, H, W) in memory too: a channels-last batch takes the network's convolutions to
    # oneDNN's channels-last kernels (see augment; test_engine checks the α-gradients).
    assert out.is_contiguous()
    # Only the given generator is used: the global seed makes no difference.
    torch.manual_seed(123)
    assert torch.equal(augment(images, torch.Generator().manual_seed(1)), out)
    assert not torch.equal(augment(images, torch.Generator().manual_seed(2)), out)
    half = augment(images, torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    non_square = augment(random_images(4, size=12)[..., :7], torch.Generator().manual_seed(0))
    assert non_square.shape == (4, 3, 12, 7)


def test_augment_outputs_are_crops_and_flips_of_the_padded_input() -> None:
    images = random_images(64)
    out = augment(images, torch.Generator().manual_seed(0))
    padded = F.pad(images, (4, 4, 4, 4))  # black padding, as torchvision's RandomCrop
    seen = set()
    for b in range(len(images)):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(out[b], normalize(crop(padded[b], dy, dx, flip))[0])
        ]
        assert len(matches) == 1, f"image {b} is not one crop/flip of its padded input"
        seen.add(matches[0])
    assert len({flip for _, _, flip in seen}) == 2
    assert len({(dy, dx) for dy, dx, _ in seen}) > 10
    assert not torch.equal(out, normalize(images))


def crop(padded: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    window = padded[None, :, dy : dy + 8, dx : dx + 8]
    return window.flip(-1) if flip else window


def test_augment_without_padding_only_flips() -> None:
    images = random_images(32)
    out = augment(images, torch.Generator().manual_seed(0), padding=0)
    plain, flipped = normalize(images), normalize(images.flip(-1))
    is_plain = [torch.equal(out[b], plain[b]) for b in range(32)]
    is_flipped = [torch.equal(out[b], flipped[b]) for b in range(32)]
    assert all(p or f for p, f in zip(is_plain, is_flipped))
    assert any(is_plain) and any(is_flipped)
