"""Data at scale: the one image preprocessing, streamed shards (order, DDP/worker sharding, exact resume,
unreadable samples), WebDataset and Hugging Face sources, shard writing, latents encoded into shards."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffexp.config import quote_shard_patterns
from diffexp.data.streaming import ShardStream, StreamLoader, UnreadableSample, buffer_shuffle
from diffexp.data.transforms import preprocess, resize_center_crop, to_mode, to_tensor
from diffexp.data.webdataset import WebDatasetDataModule, expand_shards
from diffexp.make_shards import write_shards


# --- preprocessing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 128, 256])
def test_resize_center_crop_is_pil_bicubic_of_the_shorter_side_then_the_central_square(size):
    rng = np.random.default_rng(size)
    image = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))  # landscape, odd width
    out = resize_center_crop(image, size)
    assert out.size == (size, size)
    width = round(451 * size / 300)
    expected = image.resize((width, size), Image.BICUBIC)  # PIL: antialiased when downscaling
    left = (width - size) // 2
    assert np.array_equal(np.asarray(out), np.asarray(expected.crop((left, 0, left + size, size))))


def test_preprocess_scales_to_minus_one_one_mirrors_and_reads_16_bit_grayscale():
    image = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1)))  # a horizontal ramp
    x = preprocess(image, 64, 1)
    assert x.shape == (1, 64, 64) and x.min() == -1.0 and float(x.max()) == pytest.approx(252 / 127.5 - 1)
    assert torch.equal(preprocess(image, 64, 1, flip=True), x.flip(-1))
    assert preprocess(image, 64, 3).shape == (3, 64, 64)
    wide = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_mode(wide, 1).getextrema() == (255, 255)  # scaled, not clipped to white by accident of range
    assert torch.equal(to_tensor(Image.new("L", (2, 2), 255)), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="data.channels must be 1"):
        preprocess(image, 8, 2)


# --- the stream -------------------------------------------------------------------------------------------------
def make_stream(shards=6, per_shard=10, **options):
    """A stream over integer "samples" shard * 100 + i; decode makes {"image": tensor([value]), "flip"}."""
    data = {s: [s * 100 + i for i in range(per_shard)] for s in range(shards)}

    def decode(value, flip):
        if value < 0:
            raise UnreadableSample(f"shard{-value // 100}:{-value}", "broken")
        return {"image": torch.tensor([float(value)]), "flip": torch.tensor(flip)}

    options = {"batch_size": 4, "seed": 3, "buffer_size": 5, **options}
    return ShardStream(list(data), lambda s: iter(data[s]), decode, **options), data


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def values(batch):
    return batch["image"][:, 0].long().tolist()


def test_buffer_shuffle_is_a_permutation_fixed_by_its_generator():
    import random

    a = list(buffer_shuffle(iter(range(50)), 8, random.Random(1)))
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert a == list(buffer_shuffle(iter(range(50)), 8, random.Random(1)))


def test_stream_order_is_a_function_of_the_seed_and_every_pass_sees_every_sample():
    stream, data = make_stream()
    first = take(stream, 30)  # 120 items: two passes over the 60 samples
    again = take(make_stream()[0], 30)
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["flip"], b["flip"]) for a, b in zip(first, again))
    seen = [v for batch in first for v in values(batch)]
    everything = sorted(v for shard in data.values() for v in shard)
    assert sorted(seen[:60]) == everything and sorted(seen[60:]) == everything
    assert seen[:60] != seen[60:]  # each pass has its own order
    other = take(make_stream(seed=4)[0], 15)
    assert [values(b) for b in other] != [values(b) for b in first[:15]]


def test_ranks_read_disjoint_shards_and_together_see_all():
    per_rank = []
    for rank in range(2):
        stream, data = make_stream(rank=rank, world_size=2)
        per_rank.append([v for b in take(stream, 7) for v in values(b)][:28])
    shards = [{v // 100 for v in seen} for seen in per_rank]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(6))


def test_a_resumed_stream_continues_exactly_single_process():
    stream, _ = make_stream()
    full = take(stream, 20)
    resumed, _ = make_stream()
    resumed.start_batches = 7
    assert [values(b) for b in take(resumed, 13)] == [values(b) for b in full[7:]]


def test_a_resumed_loader_with_worker_processes_continues_exactly():
    """Two loader workers (batch k from worker k mod 2), resumed after an odd number of batches."""
    stream, _ = make_stream(shards=4, num_workers=2)
    full = [values(b) for b in take(StreamLoader(stream, None, num_workers=2, pin_memory=False), 12)]
    resumed, _ = make_stream(shards=4, num_workers=2)
    loader = StreamLoader(resumed, lambda: 5, num_workers=2, pin_memory=False)
    assert [values(b) for b in take(loader, 7)] == full[5:]
    assert len({v // 100 for b in full for v in b}) == 4


def test_unreadable_samples_are_skipped_up_to_the_limit_then_name_the_file():
    data = {0: [1, -2, 3, 4, -5, 6, 7, 8], 1: [9, 10, 11, 12]}
    decode = make_stream()[0].decode
    stream = ShardStream(list(data), lambda s: iter(data[s]), decode, batch_size=2, max_unreadable=2)
    with pytest.warns(UserWarning, match="skipping unreadable sample shard0:2"):
        seen = [v for b in take(stream, 5) for v in values(b)]
    assert sorted(seen) == [1, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    strict = ShardStream(list(data), lambda s: iter(data[s]), decode, batch_size=2, max_unreadable=0)
    with pytest.raises(RuntimeError, match=r"more than data.max_unreadable=0; the last: shard0:[25]: broken"):
        take(strict, 6)


def test_too_few_shards_for_the_streams_is_an_error_that_says_what_to_do():
    with pytest.raises(ValueError, match="3 shards for 4 data streams .2 processes x 2 loader workers."):
        make_stream(shards=3, world_size=2, num_workers=2)


# --- WebDataset shards ------------------------------------------------------------------------------------------
def png_bytes(value: int, size=(12, 10), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (value, 0, 255 - value) if mode == "RGB" else value).save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path, samples):
    """A tar of WebDataset samples: {key: {ext: bytes}}."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shard_dir(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(3):
        write_tar(folder / f"train-{s:06d}.tar",
                  {f"{s}{i:03d}": {"png": png_bytes(s * 40 + i), "txt": f"item {s} {i}".encode(), "cls": str(s).encode()}
                   for i in range(5)})
    write_tar(folder / "json-000000.tar", {f"j{i}": {"jpg": png_bytes(i), "json": json.dumps({"caption": f"c{i}"}).encode()}
                                          for i in range(3)})
    return folder


def test_webdataset_items_carry_captions_labels_and_come_in_file_order(shard_dir):
    dm = WebDatasetDataModule(str(shard_dir / "train-{000000..000002}.tar"), captions=True, labels=True, num_classes=3,
                              image_size=8, batch_size=4, num_workers=0)
    items = list(dm.iter_items("train"))
    assert [it["caption"] for it in items[:2]] == ["item 0 0", "item 0 1"] and len(items) == 15
    assert [it["label"] for it in items[::5]] == [0, 1, 2]
    assert items[0]["image"].shape == (3, 8, 8)
    assert dm.shards("train") == expand_shards(str(shard_dir / "train-{000000..000002}.tar"))
    batch = next(iter(dm.stream()))
    assert batch["image"].shape == (4, 3, 8, 8) and len(batch["caption"]) == 4 and batch["label"].dtype == torch.long
    from_json = WebDatasetDataModule(str(shard_dir / "json-000000.tar"), captions=True, image_size=8, num_workers=0)
    assert [it["caption"] for it in from_json.iter_items()] == ["c0", "c1", "c2"]
    # classes outside 0..num_classes-1 are unreadable samples (num_classes is the null class of CFG)
    two = WebDatasetDataModule(str(shard_dir / "train-{000000..000002}.tar"), labels=True, num_classes=2, image_size=8,
                               num_workers=0, val_size=4)
    with pytest.warns(UserWarning, match=r"train-000002.tar:2000.cls: class '2' is not one of 0..1"):
        assert len(list(two.iter_items())) == 10
    assert len(list(two.iter_items("val"))) == 4  # no held-out shards: at most val_size training items


def test_webdataset_setup_holds_a_preview_and_validation_in_memory(shard_dir):
    dm = WebDatasetDataModule(str(shard_dir / "train-{000000..000001}.tar"), val_shards=str(shard_dir / "train-000002.tar"),
                              captions=True, image_size=8, num_workers=0, preview_size=7, val_size=3)
    dm.setup()
    assert len(dm.dataset("train")) == 7 and len(dm.dataset("val")) == 3
    assert dm.captions("val") == ["item 2 0", "item 2 1", "item 2 2"]
    assert len(dm.val_dataloader()) == 1


def test_webdataset_bad_samples_and_bad_options(shard_dir, tmp_path):
    write_tar(tmp_path / "bad.tar", {"a": {"png": png_bytes(1), "txt": b"ok"}, "b": {"png": b"not a png", "txt": b"x"},
                                     "c": {"txt": b"no image"}})
    dm = WebDatasetDataModule(str(tmp_path / "bad.tar"), captions=True, image_size=8, num_workers=0)
    with pytest.warns(UserWarning) as caught:
        items = list(dm.iter_items())
    assert len(items) == 1
    messages = " ".join(str(w.message) for w in caught)
    assert "bad.tar:b.png" in messages and "bad.tar:c: no image member" in messages
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes((shard_dir / "train-000000.tar").read_bytes()[:3000])
    with pytest.warns(UserWarning, match="cut.tar"):
        assert 0 < len(list(WebDatasetDataModule(str(truncated), image_size=8, num_workers=0).iter_items())) < 5
    with pytest.raises(FileNotFoundError, match="2 of 5 shards do not exist"):
        WebDatasetDataModule(str(shard_dir / "train-{000000..000004}.tar"))
    with pytest.raises(ValueError, match="data.labels=true needs data.num_classes"):
        WebDatasetDataModule(str(shard_dir), labels=True)
    with pytest.raises(ValueError, match="data.shuffle_buffer must be an integer >= 1"):
        WebDatasetDataModule(str(shard_dir), shuffle_buffer=0)


def test_shard_patterns_reach_hydra_quoted_and_an_expanded_pattern_is_refused(capsys):
    assert quote_shard_patterns(["data.shards=D/train-{000000..000009}.tar", "data.batch_size=4"]) == \
        ["data.shards='D/train-{000000..000009}.tar'", "data.batch_size=4"]
    assert quote_shard_patterns(["data.shards='D/{0..1}.tar'"]) == ["data.shards='D/{0..1}.tar'"]
    with pytest.raises(SystemExit) as exit_info:
        quote_shard_patterns(["data.shards=D/a-0.tar", "data.shards=D/a-1.tar"])
    assert exit_info.value.code == 2 and "shell expanded the braces" in capsys.readouterr().err


def test_write_shards_round_trips_through_the_webdataset_module(tmp_path):
    from diffexp.data import DigitsDataModule

    digits = DigitsDataModule(batch_size=8)
    items = list(digits.iter_items("val"))[:25]
    paths = write_shards(items, tmp_path / "train", shard_size=10)
    assert [p.name for p in paths] == ["000000.tar", "000001.tar", "000002.tar"]
    dm = WebDatasetDataModule(str(tmp_path / "train"), labels=True, num_classes=10, image_size=16, channels=1,
                              num_workers=0)
    back = list(dm.iter_items())
    assert len(back) == 25
    for a, b in zip(items, back):  # PNG is lossless: only the uint8 rounding
        assert (a["image"] - b["image"]).abs().max() <= 1 / 127.5 and int(a["label"]) == b["label"]


# --- Hugging Face datasets --------------------------------------------------------------------------------------
@pytest.fixture
def hf_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (10, 14), (i * 9, 0, 0)) for i in range(24)]
    table = datasets.Dataset.from_dict({"img": images, "text": [f"caption {i}" for i in range(24)],
                                        "y": [i % 3 for i in range(24)]},
                                       features=datasets.Features({"img": datasets.Image(), "text": datasets.Value("string"),
                                                                   "y": datasets.ClassLabel(num_classes=3)}))
    folder = tmp_path / "hf"
    table.save_to_disk(str(folder))
    return folder


def test_hf_dataset_random_access_reads_columns_and_classes(hf_folder):
    from diffexp.data import HFDataModule

    dm = HFDataModule(str(hf_folder), image_column="img", caption_column="text", label_column="y", image_size=8,
                      num_workers=0, batch_size=4, val_fraction=0.25)
    dm.setup()
    assert dm.num_classes == 3 and len(dm.dataset("train")) == 18 and len(dm.dataset("val")) == 6
    item = dm.dataset("val")[0]
    assert item["image"].shape == (3, 8, 8) and item["caption"].startswith("caption ") and item["label"] in (0, 1, 2)
    with pytest.raises(ValueError, match=r"data.caption_column='caption' is not a column of the dataset; its columns: "
                                         r"\['img', 'text', 'y'\]"):
        HFDataModule(str(hf_folder), image_column="img", caption_column="caption").setup()
    with pytest.raises(ValueError, match="one dataset without splits"):
        HFDataModule(str(hf_folder), image_column="img", split="validation").setup()
    capped = HFDataModule(str(hf_folder), image_column="img", image_size=8, val_fraction=0.5, val_size=3)
    capped.setup()
    assert len(capped.dataset("val")) == 3


def test_hf_dataset_streaming_is_sharded_and_resumes_exactly(hf_folder):
    from diffexp.data import HFDataModule

    def module():
        return HFDataModule(str(hf_folder), image_column="img", caption_column="text", streaming=True, image_size=8,
                            num_workers=0, batch_size=4, shuffle_buffer=4)

    dm = module()
    assert len(dm.shards("train")) >= 1
    full = take(dm.stream(), 9)
    resumed = module().stream()
    resumed.start_batches = 4
    assert [b["caption"] for b in take(resumed, 5)] == [b["caption"] for b in full[4:]]
    assert sorted(c for b in full[:6] for c in b["caption"]) == sorted(f"caption {i}" for i in range(24))


def test_hf_dataset_reads_parquet_files(tmp_path, hf_folder):
    datasets = pytest.importorskip("datasets")
    from diffexp.data import HFDataModule

    datasets.load_from_disk(str(hf_folder)).to_parquet(str(tmp_path / "part-0.parquet"))
    dm = HFDataModule("parquet", data_files=str(tmp_path / "*.parquet"), image_column="img", caption_column="text",
                      image_size=8, num_workers=0)
    assert [it["caption"] for it in dm.iter_items("train", 3)] != []
    with pytest.raises(ValueError, match="data.path='no-such-builder-xyz'"):
        HFDataModule("no-such-builder-xyz", image_size=8).setup()


def test_random_flips_are_drawn_by_the_sampler_with_the_order(tmp_path):
    """EpochSeededSampler(flips=True) keeps the order of flips=False and adds a flip per position from the same
    (seed, epoch) generator, so a resumed run flips the same items; folder items decode the key."""
    from diffexp.data.base import EpochSeededSampler, flip_key
    from diffexp.data.image_folder import FolderDataset

    plain = EpochSeededSampler(10, seed=3, num_replicas=2, rank=1)
    flipping = EpochSeededSampler(10, seed=3, num_replicas=2, rank=1, flips=True)
    keys = list(flipping)
    assert [flip_key(k, 10)[0] for k in keys] == list(plain) and keys == list(flipping)
    many = list(EpochSeededSampler(2000, seed=0, flips=True))
    assert 900 < sum(flip_key(k, 2000)[1] for k in many) < 1100
    folder = tmp_path / "imgs"
    folder.mkdir()
    ramp = np.tile(np.arange(0, 240, 30, dtype=np.uint8), (8, 1))
    Image.fromarray(np.stack([ramp] * 3, -1)).save(folder / "ramp.png")
    dataset = FolderDataset([folder / "ramp.png"], None, image_size=8, channels=3, random_flip=True)
    assert torch.equal(dataset[1]["image"], dataset[0]["image"].flip(-1))  # key 1 = index 0, mirrored


def test_a_stream_whose_shards_hold_nothing_fails_instead_of_looping(tmp_path):
    from diffexp.data import ShapesDataModule, WebDatasetDataModule
    from diffexp.make_shards import write_shards

    write_shards(ShapesDataModule(num_train=8, num_val=4).iter_items("train"), tmp_path / "shards", shard_size=8)
    (tmp_path / "shards" / "empty-000000.tar").write_bytes(b"\0" * 1024)  # a valid, empty tar archive
    dm = WebDatasetDataModule(str(tmp_path / "shards" / "empty-000000.tar"), image_size=32, batch_size=2, num_workers=0,
                              preview_size=1, val_size=1)
    with pytest.raises(RuntimeError, match="read no sample from any shard"):
        next(iter(dm.train_dataloader()))


def test_a_stream_with_some_empty_shards_keeps_streaming():
    """Passes reshuffle the shards over the streams: a pass may hand one stream only empty shards; it goes on."""
    from itertools import islice

    from diffexp.data.streaming import ShardStream

    data = {"a": [1, 2, 3], "b": [4, 5, 6], "e1": [], "e2": []}
    stream = ShardStream(list(data), lambda shard: iter(data[shard]), lambda x, flip: x, batch_size=2, buffer_size=2,
                         rank=0, world_size=2)
    assert len(list(islice(stream.items(0, 2), 3000))) == 3000
    with pytest.raises(IndexError):
        from diffexp.data.base import flip_key

        flip_key(20, 10)
