"""Calibration and healing data as users have it: DataLoaders (with labels), Datasets, tensors,
iterators and folders of images, read batch by batch; held-out parts never trained on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import normswap
from models import build, input_for
from normswap.calibration.stream import input_batches, model_inputs
from normswap.errors import CalibrationError


class Counting(Dataset):
    """A map-style dataset of (x, label) that counts how often each sample is read."""

    def __init__(self, n: int = 40, shape: tuple[int, ...] = (10,)) -> None:
        self.x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
        self.reads = torch.zeros(n, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.reads[index] += 1
        return self.x[index], index  # the "label" is the index: which sample it was


def test_a_dataloader_with_labels_gives_the_inputs_and_says_so() -> None:
    stream = input_batches(DataLoader(Counting(), batch_size=8), inputs=1)
    batches = list(stream)
    assert len(batches) == 5 and all(len(b) == 1 and b[0].shape == (8, 10) for b in batches)
    assert stream.samples == 40
    assert stream.notes == [
        "the data's batches hold 2 items and the model takes 1 input(s): the last 1 (labels) are ignored"
    ]


def test_a_dataloader_is_split_by_sample_and_the_parts_never_meet() -> None:
    data = Counting()
    stream = input_batches(DataLoader(data, batch_size=8, shuffle=True), inputs=None)  # keep the index "labels"
    train, heldout, _ = stream.split(10)
    held = {int(i) for b in heldout for i in b[1]}
    trained = [int(i) for b in train for i in b[1]]
    assert len(held) == 10 and len(trained) == 30 and not held & set(trained)
    assert sorted(held | set(trained)) == list(range(40))
    assert [int(i) for b in train for i in b[1]] != trained  # shuffled again on every pass, like the user's loader


@pytest.mark.parametrize(
    "make",
    [
        lambda x: [x[i : i + 8] for i in range(0, 40, 8)],
        lambda x: x,
        lambda x: TensorDataset(x),
    ],
    ids=["list-of-batches", "tensor", "dataset"],
)
def test_every_form_of_data_yields_the_same_samples(make) -> None:
    x = torch.randn(40, 10)
    stream = input_batches(make(x), inputs=1, batch_size=8)
    assert stream.samples == 40
    assert sorted(torch.cat([b[0] for b in stream]).sum(1).tolist()) == sorted(x.sum(1).tolist())


def test_a_list_holds_out_its_last_batches() -> None:
    batches = [torch.full((8, 2), float(i)) for i in range(5)]
    split = input_batches(batches).split(16)
    assert [int(b[0][0, 0]) for b in split.heldout] == [3, 4] and [int(b[0][0, 0]) for b in split.train] == [0, 1, 2]
    assert (split.train_from, split.heldout_from) == (0, 3)  # where messages count each part from


def test_one_batch_holds_nothing_out() -> None:
    train, heldout, _ = input_batches([torch.randn(8, 2)]).split(4)
    assert heldout == [] and len(list(train)) == 1


class Stream(IterableDataset):
    def __iter__(self):
        for i in range(6):
            yield torch.full((3,), float(i))


def test_an_iterable_dataset_streams_and_skips_its_held_out_head_in_training() -> None:
    split = input_batches(Stream(), batch_size=2).split(2)
    train, heldout = split.train, split.heldout
    assert (split.heldout_from, split.train_from) == (0, 1)  # the stream's first batch is held out
    assert [b[0][:, 0].tolist() for b in heldout] == [[0.0, 1.0]]
    assert [b[0][:, 0].tolist() for b in train] == [[2.0, 3.0], [4.0, 5.0]]
    assert [b[0][:, 0].tolist() for b in train] == [[2.0, 3.0], [4.0, 5.0]]  # read again on the next pass


def test_an_iterator_is_held_in_memory_with_a_note() -> None:
    stream = input_batches(iter([torch.randn(4, 2) for _ in range(3)]))
    assert len(list(stream)) == 3 and len(list(stream)) == 3
    assert "can be read only once" in stream.notes[0]


def test_sharding_gives_each_rank_its_own_samples() -> None:
    stream = input_batches(DataLoader(Counting(), batch_size=4), inputs=None)
    ranks = [{int(i) for b in stream.sharded(rank, 2) for i in b[1]} for rank in (0, 1)]
    assert not ranks[0] & ranks[1] and len(ranks[0] | ranks[1]) == 40  # a DistributedSampler over the dataset
    batches = input_batches([torch.full((2, 1), float(i)) for i in range(6)])
    assert [int(b[0][0, 0]) for b in batches.sharded(1, 2)] == [1, 3, 5]  # batches: every other one


@pytest.mark.parametrize(
    "data,message",
    [
        ([{"x": torch.randn(2, 3)}], "is a dict"),
        (["text"], "is a str"),
        ([torch.full((2, 3), float("nan"))], "NaN or infinite"),
        (torch.zeros(0, 3), "empty tensor"),
    ],
    ids=["dict", "string", "nan", "empty"],
)
def test_bad_batches_are_one_sentence(data, message: str) -> None:
    with pytest.raises(CalibrationError, match=message):
        list(input_batches(data))


def test_the_model_inputs_are_read_off_forward() -> None:
    class Two(torch.nn.Module):
        def forward(self, x, mask, scale=1.0):
            return x

    class Many(torch.nn.Module):
        def forward(self, *inputs):
            return inputs[0]

    assert model_inputs(Two()) == 2 and model_inputs(Many()) is None and model_inputs(build("mlp")) == 1


def test_heal_streams_a_dataloader_with_labels_and_reads_each_sample_once_per_pass() -> None:
    model = build("mlp")
    data = Counting(64)
    converted = normswap.convert(model, input_for("mlp"), to="layernorm").model
    result = normswap.heal(converted, model, DataLoader(data, batch_size=8), steps=7, eval_every=7, progress=False)
    # 12 samples held out (a fifth), read once for the judge; the other 52 make one pass of 7 batches
    assert result.steps == 7 and result.images == 52 and result.heldout_samples == 12
    assert data.reads.tolist() == [1] * 64  # every sample read once: nothing held in memory and read again
    assert [p.step for p in result.curve] == [0, 7]


def test_convert_reads_each_calibration_sample_once() -> None:
    """Without a search, convert leaves reading to calibration: an image folder decodes each image once."""
    torch.manual_seed(0)
    model = build("mlp").eval()
    data = Counting(n=200)
    conversion = normswap.convert(
        model, input_for("mlp"), to="layernorm", calibration_data=DataLoader(data, batch_size=16, shuffle=True)
    )
    assert conversion.drift["calibrated"].samples == 40  # a fifth held out
    assert int(data.reads.max()) == 1 and int(data.reads.sum()) == 200


def test_a_budget_stops_healing_and_says_so() -> None:
    model = build("mlp")
    converted = normswap.convert(model, input_for("mlp"), to="layernorm").model
    batches = [torch.randn(16, 10) for _ in range(5)]
    result = normswap.heal(converted, model, batches, budget=1e-6, progress=False)
    assert result.stopped == "budget" and result.steps == 1  # the first step already passes a 60-microsecond budget


def test_class_scores_are_judged_by_agreement() -> None:
    model = build("resnet").eval()
    converted = normswap.convert(model, input_for("resnet"), to="groupnorm").model
    batches = [input_for("resnet", batch=8) * (1 + i / 4) for i in range(5)]
    result = normswap.heal(converted, model, batches, steps=4, eval_every=2, progress=False)
    scores = [p.score for p in result.curve]
    assert all(s.agreement is not None and 0 <= s.agreement <= 1 for s in scores)
    assert result.best == max(scores, key=lambda s: (s.agreement, -s.loss))  # the best is what it kept


def test_cli_reads_a_folder_of_images(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner
    from PIL import Image

    from normswap.cli import main

    examples = Path(__file__).resolve().parent.parent / "examples" / "synthetic.py"
    import sys

    sys.path.insert(0, str(examples.parent))
    from synthetic import ShapesNet

    torch.manual_seed(0)
    torch.save(ShapesNet(width=8).eval().state_dict(), tmp_path / "ckpt.pt")
    folder = tmp_path / "images" / "cats"  # a labelled tree: the class folders are read as they are
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(20):
        size = (20 + i, 24)  # every size: resized and cropped to 16x16 by --image-size
        pixels = torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(
        main,
        [
            *("convert", str(tmp_path / "ckpt.pt"), "--model", f"{examples}:ShapesNet", "-k", "width=8"),
            *("--input-shape", "2,3,16,16", "--out", str(tmp_path / "out"), "--no-onnx", "--to", "groupnorm"),
            *("--calibration-data", str(tmp_path / "images"), "--image-size", "16"),
            *("--image-mean", "0.5,0.5,0.5", "--image-std", "0.25,0.25,0.25", "--calibration-batch-size", "4"),
            *("--attribution-samples", "0"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())["reports"][0]
    assert report["drift"]["swap"]["samples"] == 4  # a fifth of the 20 images held out
    assert report["calibration"][0]["samples"] == 16 * 16 * 16  # the other 16 images, 16x16 each


def test_cli_refuses_an_image_it_cannot_read(tmp_path: Path) -> None:
    from normswap.calibration.images import ImageFolder, ImagePreprocessing

    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CalibrationError, match=r"broken.jpg' cannot be read"):
        ImageFolder(tmp_path, ImagePreprocessing())[0]
